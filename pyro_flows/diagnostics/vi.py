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

    A small :math:`\\hat k` says the importance weights are reliable *where the
    guide puts mass*; it cannot detect a mode the guide misses. The weights are
    computed only at draws of the guide, so a posterior mode where the guide has
    (almost) no mass is never visited: a guide covering one of two well separated,
    equal modes gets near-constant weights and a small :math:`\\hat k`. Check
    mode coverage separately, with :func:`mode_coverage` against reference draws
    of the posterior (e.g. MCMC) or by comparing fits from several initialisations.

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


def _draw_matrix(draws, keys: Optional[list], what: str) -> Tensor:
    """Draws as an ``(S, D)`` float64 matrix: a tensor ``(S,)`` or ``(S, ...)``, or a dict of such (``keys`` order)."""

    def matrix(value) -> Tensor:
        value = torch.as_tensor(value)
        if value.dim() == 0:
            raise ValueError(f"mode_coverage: {what} must have a leading draw dimension, got a scalar")
        return (value.flatten(1) if value.dim() > 1 else value[:, None]).to(torch.float64)

    if not isinstance(draws, dict):
        return matrix(draws)
    keys = list(draws) if keys is None else keys
    missing = [key for key in keys if key not in draws]
    if missing or not keys:
        raise ValueError(f"mode_coverage: {what} lack the sites {missing}" if missing else f"mode_coverage: no {what}")
    parts = [matrix(draws[key]) for key in keys]
    if len({part.shape[0] for part in parts}) != 1:
        raise ValueError(f"mode_coverage: the sites of the {what} have different numbers of draws")
    return torch.cat(parts, dim=1)


@dataclass
class ModeCoverage:
    """Result of :func:`mode_coverage`: per reference cluster ``j`` of ``k``.

    * ``centers``: ``(k, D)`` cluster centres, in the draws' units;
    * ``reference_mass``: ``(k,)`` fraction of reference draws nearest centre ``j``;
    * ``guide_mass``: ``(k,)`` fraction of guide draws nearest centre ``j``;
    * ``missed``: ``(k,)`` bool, ``reference_mass >= min_mass`` and
      ``guide_mass < min_fraction * reference_mass``;
    * ``ok``: no cluster missed.
    """

    centers: Tensor
    reference_mass: Tensor
    guide_mass: Tensor
    missed: Tensor

    @property
    def ok(self) -> bool:
        return not bool(self.missed.any())


@torch.no_grad()
def mode_coverage(
    guide_draws,
    reference_draws,
    clusters: int = 4,
    min_mass: float = 0.05,
    min_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
) -> ModeCoverage:
    r"""Does the guide put mass on every region the reference draws occupy? A check that PSIS cannot make.

    :math:`\hat k` of :func:`psis` sees only the importance weights at draws of
    the guide :math:`q`; a mode of the posterior where :math:`q` has (almost) no
    mass is never visited, so a guide that misses a mode can have a small
    :math:`\hat k`. This check compares the guide's draws with reference draws
    of the posterior (e.g. MCMC) instead. Prior draws are no reference: a
    posterior narrower than its prior leaves prior regions empty and is flagged.

    Each column is divided by the reference draws' standard deviation (columns
    with zero spread by 1). The reference draws are clustered into ``clusters``
    groups by k-means (k-means++ start from a generator seeded with ``seed``,
    then Lloyd's iterations until no assignment changes or ``max_iter``). With
    centres :math:`c_1..c_k`, a draw belongs to its nearest centre (Euclidean,
    standardised units), and for each cluster :math:`j`

    .. math:: m^{\mathrm{ref}}_j = \frac1R \#\{r: \text{ref}_r \to j\},\qquad
              m^{q}_j = \frac1S \#\{s: z_s \to j\}.

    Cluster :math:`j` is *missed* when :math:`m^{\mathrm{ref}}_j \ge` ``min_mass``
    and :math:`m^q_j <` ``min_fraction`` :math:`\cdot m^{\mathrm{ref}}_j`. More
    clusters than modes is harmless for a guide that matches the reference (it
    splits the same way); a flagged cluster that is not a separate mode means the
    guide leaves out a region of non-negligible reference mass (a tail, for a
    guide much narrower than the posterior). Two draw sets from the same
    distribution pass unless too few draws land in a cluster by chance: use
    hundreds of draws of each.

    Args:
        guide_draws: ``(S,)`` or ``(S, ...)`` tensor, or a dict site -> ``(S, ...)``
            (e.g. ``Predictive(model, guide=guide, num_samples=S)`` restricted to the
            latent sites); each draw is flattened (dict: sites concatenated).
        reference_draws: ``(R,)`` or ``(R, ...)`` tensor, or a dict with the
            same sites (e.g. ``MCMC.get_samples()``); its keys fix the order.
        clusters: ``k``, at most ``R``.
        min_mass: reference clusters lighter than this are never flagged.
        min_fraction: flag when the guide's share is below this fraction of the reference's.

    Example:
        >>> mixture = dist.MixtureSameFamily(
        ...     dist.Categorical(torch.tensor([0.5, 0.5])), dist.Normal(torch.tensor([-3.0, 3.0]), 0.5))
        >>> reference = mixture.sample((1000,))
        >>> one_mode = dist.Normal(3.0, 0.5).sample((1000,))
        >>> coverage = pf.diagnostics.mode_coverage(one_mode, reference, clusters=2)
        >>> coverage.ok, coverage.missed.sum().item()
        (False, 1)
        >>> pf.diagnostics.mode_coverage(mixture.sample((1000,)), reference, clusters=2).ok
        True
    """
    if isinstance(guide_draws, dict) != isinstance(reference_draws, dict):
        raise ValueError("mode_coverage: pass both draw sets as tensors or both as dicts of sites")
    reference = _draw_matrix(reference_draws, None, "reference draws")
    keys = list(reference_draws) if isinstance(reference_draws, dict) else None
    guide = _draw_matrix(guide_draws, keys, "guide draws")
    if guide.shape[1] != reference.shape[1]:
        raise ValueError(
            f"mode_coverage: guide draws have {guide.shape[1]} values per draw, reference draws {reference.shape[1]}"
        )
    if not isinstance(clusters, int) or isinstance(clusters, bool) or not 1 <= clusters <= reference.shape[0]:
        raise ValueError(f"mode_coverage: clusters must be an integer in [1, {reference.shape[0]}], got {clusters!r}")
    if guide.shape[0] < 1:
        raise ValueError("mode_coverage: no guide draws")
    if not (bool(torch.isfinite(guide).all()) and bool(torch.isfinite(reference).all())):
        raise ValueError("mode_coverage: the draws must be finite")
    if not 0.0 <= min_mass <= 1.0 or not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"mode_coverage: min_mass and min_fraction must be in [0, 1], got {min_mass}, {min_fraction}")
    guide, reference = guide.cpu(), reference.cpu()
    loc = reference.mean(0)
    scale = reference.std(0, unbiased=False) if reference.shape[0] > 1 else torch.ones_like(loc)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    ref, q = (reference - loc) / scale, (guide - loc) / scale
    generator = torch.Generator().manual_seed(seed)
    # k-means++: each next centre drawn with probability proportional to the squared distance to the nearest one
    centers = ref[torch.randint(ref.shape[0], (1,), generator=generator)]
    for _ in range(1, clusters):
        d2 = torch.cdist(ref, centers).square().min(1).values
        probs = d2 if bool((d2 > 0).any()) else torch.ones_like(d2)
        centers = torch.cat([centers, ref[torch.multinomial(probs, 1, generator=generator)]])
    assign = torch.cdist(ref, centers).argmin(1)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=clusters).to(ref.dtype)
        sums = torch.zeros_like(centers).index_add_(0, assign, ref)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        new = torch.cdist(ref, centers).argmin(1)
        if bool((new == assign).all()):
            break
        assign = new
    reference_mass = torch.bincount(assign, minlength=clusters).to(torch.float64) / ref.shape[0]
    guide_mass = torch.bincount(torch.cdist(q, centers).argmin(1), minlength=clusters).to(torch.float64) / q.shape[0]
    missed = (reference_mass >= min_mass) & (guide_mass < min_fraction * reference_mass)
    return ModeCoverage(centers * scale + loc, reference_mass, guide_mass, missed)


__all__ = ["ModeCoverage", "PSISReport", "mode_coverage", "psis", "to_inference_data"]
