"""Diagnostics for variational guides: ArviZ conversion and Pareto-smoothed importance sampling (PSIS).

Both draw from the guide and replay the model on each draw. Draws are
vectorised with a particle plate (one guide and one model pass for all draws,
as Pyro's ``vectorized_importance_weights``) when the model allows it, and
otherwise taken one by one in a loop; ``vectorize=True/False`` forces either.
"Allows" is checked, not assumed: the first vectorised draw is scored again
without the plate, and a model whose shapes fail under the plate or broadcast
wrongly against it (a different log-weight) falls back to the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.util import site_is_subsample
from torch import Tensor

if TYPE_CHECKING:  # ArviZ (with xarray, pandas, SciPy) is imported where used, not at import pyro_flows
    import arviz as az


@dataclass
class _Draws:
    log_weights: Tensor  # (S,) log p(x, z) - log q(z)
    latents: dict  # site -> (S, *shape), constrained
    log_likelihood: dict  # observed site -> (S, *batch_shape), pointwise, unscaled
    observed: dict  # observed site -> value


def _is_deterministic(site) -> bool:
    return bool(site["infer"].get("_deterministic"))


def _latent_sites(trace) -> list:
    """Latent and ``pyro.deterministic`` sites (the posterior), without plates' subsample sites."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and (not site["is_observed"] or _is_deterministic(site))
        and not site_is_subsample(site)
    ]


def _observed_sites(trace) -> list:
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"] and not _is_deterministic(site)
    ]


def _pointwise_log_likelihood(site) -> Tensor:
    return site["fn"].log_prob(site["value"])


def _one_draw(model: Callable, guide: Callable, args: tuple, kwargs: dict):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def _max_plate_nesting(trace) -> int:
    dims = [
        -frame.dim for site in trace.nodes.values() for frame in site.get("cond_indep_stack", ()) if frame.vectorized
    ]
    return max(dims, default=0)


def _draws_in_loop(model, guide, args, kwargs, num_samples: int) -> _Draws:
    traces = [_one_draw(model, guide, args, kwargs) for _ in range(num_samples)]
    first = traces[0][0]
    log_weights = torch.stack([m.log_prob_sum() - g.log_prob_sum() for m, g in traces])
    latents = {name: torch.stack([m.nodes[name]["value"] for m, _ in traces]) for name in _latent_sites(first)}
    log_likelihood = {
        name: torch.stack([_pointwise_log_likelihood(m.nodes[name]) for m, _ in traces])
        for name in _observed_sites(first)
    }
    observed = {name: first.nodes[name]["value"] for name in _observed_sites(first)}
    return _Draws(log_weights, latents, log_likelihood, observed)


def _per_draw(name: str, value: Tensor, shape: torch.Size, num_samples: int) -> Tensor:
    """A site's value under the particle plate as ``(num_samples, *shape)`` (``shape``: its unvectorised shape)."""
    if value.numel() != num_samples * shape.numel():
        raise ValueError(f"site '{name}' has shape {tuple(value.shape)} under the particle plate")
    return value.reshape((num_samples,) + shape)


def _rescore_first_draw(model, guide, args, kwargs, guide_trace, guide_prototype, num_samples: int) -> Tensor:
    """The log-weight of the first vectorised draw, recomputed without the particle plate.

    The guide is replayed on that draw's values (``Delta`` sites are left to
    be recomputed from the others, as autoguides do) and the model on the guide.
    """
    first = guide_prototype.copy()
    for name, site in guide_prototype.nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], dist.Delta):
            first.remove_node(name)
        elif not site_is_subsample(site):
            value = guide_trace.nodes[name]["value"]
            first.nodes[name]["value"] = _per_draw(name, value, site["value"].shape, num_samples)[0]
    model_trace, guide_trace = _one_draw(model, poutine.replay(guide, trace=first), args, kwargs)
    return model_trace.log_prob_sum() - guide_trace.log_prob_sum()


def _reject_subsampling(trace) -> None:
    """Importance weights and pointwise log-likelihoods need every datum, not a random subsample per draw."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"site '{name}' is in plate '{frame.name}', subsampled ({frame.size} of {frame.full_size}): "
                    "the diagnostics need the full likelihood. Call them with the model (and guide) arguments "
                    "that turn subsampling off (a plate without subsample_size)."
                )


def _draws_vectorized(model, guide, args, kwargs, num_samples: int, prototypes) -> _Draws:
    prototype, guide_prototype = prototypes
    log_weights, model_trace, guide_trace = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=_max_plate_nesting(prototype), **kwargs
    )
    if log_weights.shape != (num_samples,):
        raise ValueError(f"vectorised log-weights have shape {tuple(log_weights.shape)}, not ({num_samples},)")
    first = _rescore_first_draw(model, guide, args, kwargs, guide_trace, guide_prototype, num_samples)
    if not torch.isclose(first, log_weights[0], rtol=1e-4, atol=1e-3):
        raise ValueError(
            f"the vectorised log-weight of a draw ({float(log_weights[0]):.6g}) differs from the same draw "
            f"scored alone ({float(first):.6g}): the model does not broadcast over a leading particle dim"
        )

    def per_draw(name: str, value: Tensor, shape: torch.Size) -> Tensor:
        return _per_draw(name, value, shape, num_samples)

    latents = {
        name: per_draw(name, model_trace.nodes[name]["value"], prototype.nodes[name]["value"].shape)
        for name in _latent_sites(prototype)
    }
    log_likelihood = {}
    for name in _observed_sites(prototype):
        pointwise = _pointwise_log_likelihood(model_trace.nodes[name])
        shape = _pointwise_log_likelihood(prototype.nodes[name]).shape
        log_likelihood[name] = per_draw(name, pointwise, shape)
    observed = {name: prototype.nodes[name]["value"] for name in _observed_sites(prototype)}
    return _Draws(log_weights, latents, log_likelihood, observed)


@torch.no_grad()
def _draw(model, guide, args, kwargs, num_samples: int, vectorize: Optional[bool]) -> _Draws:
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    prototypes = _one_draw(model, guide, args, kwargs)
    _reject_subsampling(prototypes[0])
    if vectorize is False:
        return _draws_in_loop(model, guide, args, kwargs, num_samples)
    try:
        return _draws_vectorized(model, guide, args, kwargs, num_samples, prototypes)
    except (ValueError, RuntimeError, IndexError):
        if vectorize:
            raise
        return _draws_in_loop(model, guide, args, kwargs, num_samples)


def _numpy(value: Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def to_inference_data(
    model: Callable, guide: Callable, *args, num_samples: int = 1000, vectorize: Optional[bool] = None, **kwargs
) -> az.InferenceData:
    """Draws of a fitted guide as an :class:`arviz.InferenceData`.

    ``posterior``: the guide's constrained draws of every latent site of the
    model, named and shaped as in the model, with dims ``(chain=1, draw)``;
    ``log_likelihood``: per observed site, the pointwise (per datum, unscaled)
    log-likelihood at each draw; ``observed_data``: the observed values.
    ``args``/``kwargs`` are the model's; ``vectorize`` as in the module docstring.
    A model whose plates subsample the data is rejected (both diagnostics need
    the full likelihood at every draw).

    Example:
        >>> idata = to_inference_data(model, guide, data, num_samples=2000)  # doctest: +SKIP
        >>> az.summary(idata)  # doctest: +SKIP
    """
    import arviz as az

    draws = _draw(model, guide, args, kwargs, num_samples, vectorize)
    return az.from_dict(
        posterior={name: _numpy(value)[None] for name, value in draws.latents.items()},
        log_likelihood={name: _numpy(value)[None] for name, value in draws.log_likelihood.items()},
        observed_data={name: _numpy(value) for name, value in draws.observed.items()},
    )


@dataclass
class PSISReport:
    r"""Pareto-smoothed importance sampling diagnostic of a guide (Yao et al. 2018, Vehtari et al. 2024).

    With :math:`\log w_s = \log p(x, z_s) - \log q(z_s)`, :math:`z_s \sim q`:

    * ``khat``: the fitted Pareto shape of the largest weights; :math:`\hat k < 0.5`
      good, :math:`0.5`–:math:`0.7` usable, :math:`> 0.7` do not trust the guide;
    * ``ess``: :math:`1 / \sum_s \tilde w_s^2` of the smoothed normalised weights;
    * ``elbo``: :math:`\frac1S \sum_s \log w_s`;
    * ``iw_elbo``: :math:`\log \frac1S \sum_s w_s` (importance-weighted bound, raw weights);
    * ``log_weights``: ``(S,)`` smoothed, normalised log-weights (``logsumexp = 0``);
    * ``samples``: importance-resampled constrained draws per latent site (``resample=True`` only).
    """

    khat: float
    ess: float
    elbo: float
    iw_elbo: float
    log_weights: Tensor
    samples: Optional[dict] = field(default=None)


def psis(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    resample: bool = False,
    vectorize: Optional[bool] = None,
    **kwargs,
) -> PSISReport:
    """Pareto-smoothed importance sampling of the model's posterior with the guide as proposal.

    Smoothing and :math:`\\hat k` come from :func:`arviz.psislw`. With
    ``resample=True``, ``num_samples`` draws are resampled (with replacement)
    in proportion to the smoothed weights. ``args``/``kwargs`` are the model's.

    Example:
        >>> report = psis(model, guide, data, num_samples=5000)  # doctest: +SKIP
        >>> report.khat < 0.7  # doctest: +SKIP
    """
    draws = _draw(model, guide, args, kwargs, num_samples, vectorize)
    log_w = draws.log_weights.to(torch.float64)
    if not bool(torch.isfinite(log_w).all()):
        bad = int((~torch.isfinite(log_w)).sum())
        raise ValueError(f"psis: {bad} of {num_samples} log-weights are not finite (draws outside the support?)")
    import arviz as az

    smoothed, khat = az.psislw(log_w.cpu().numpy(), reff=1.0)
    smoothed = torch.as_tensor(np.asarray(smoothed), dtype=torch.float64)
    weights = smoothed.exp()
    samples = None
    if resample:
        index = torch.multinomial(weights, num_samples, replacement=True)
        samples = {name: value[index.to(value.device)] for name, value in draws.latents.items()}
    return PSISReport(
        khat=float(khat),
        ess=float(1.0 / weights.square().sum()),
        elbo=float(log_w.mean()),
        iw_elbo=float(torch.logsumexp(log_w, 0) - math.log(num_samples)),
        log_weights=smoothed,
        samples=samples,
    )


__all__ = ["PSISReport", "psis", "to_inference_data"]
