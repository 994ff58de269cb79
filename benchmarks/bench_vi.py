"""VI benchmark: the ELBO and the Pareto k̂ that flow guides reach per wall-clock second.

pyro_flows' ``pf.infer.AutoFlowGuide`` against Pyro's own flow guides, with
``AutoNormal`` as the mean-field reference. Every guide gets the same model, the
same optimiser and learning rate, the same ELBO estimator and the same wall-clock
training budget, in one process:

* models (all small, no data downloads):

  - ``funnel``: Neal's funnel in 10 dimensions, :math:`v \\sim \\mathcal{N}(0, 3^2)`,
    :math:`x_i \\mid v \\sim \\mathcal{N}(0, e^{v})`, i = 1..9. It is normalised, so
    :math:`\\log Z = 0`: the ELBO is :math:`-\\mathrm{KL}(q \\| p)` and the
    importance-weighted ELBO tends to 0 from below;
  - ``eight_schools``: the centred eight-schools model (Rubin 1981), 10 latents;
  - ``logistic``: Bayesian logistic regression, weights and intercept with
    :math:`\\mathcal{N}(0, 1)` priors, 200 synthetic rows and 4 correlated
    features (seed 0), 5 latents;

* guides (the flows all with ``--transforms`` layers and MADE conditioners of
  ``--hidden`` widths):

  - ``AutoNormal``: Pyro's mean-field Gaussian (reference);
  - ``AutoIAFNormal``: Pyro's affine inverse autoregressive flow;
  - ``AutoNormalizingFlow``: Pyro's flow guide with ``SplineAutoregressive``
    layers (rational-quadratic splines, ``order="quadratic"``, 8 bins on
    [-5, 5], orders alternating), i.e. Pyro's neural spline flow;
  - ``pf-IAF``, ``pf-NSF``: ``pf.infer.AutoFlowGuide(model, flow="iaf" | "nsf")``,
    the same layer counts, widths, bins and bound;
  - ``pf-CNF`` (not run unless named in ``--guides``): ``AutoFlowGuide(flow="cnf")``;

* training: ``pyro.infer.SVI`` with ``Trace_ELBO(num_particles=--particles)``
  and ``ClippedAdam(lr=--lr)``, for ``--seconds`` of wall-clock time per run
  (guide construction and the first step, which builds the guide's parameters,
  included). The clock is paused at ``--checkpoints`` marks, T/2^(c-1), ..., T/2,
  T, to evaluate the guide. Before its first run, each guide takes 3 untimed
  steps on each model (one-time costs of the process: first traces, lazy imports);
* evaluation (not timed), the same function for every guide:
  ``pf.diagnostics.psis(model, guide, *args, num_samples=--eval-samples)``,
  i.e. ``log p(x, z) - log q(z)`` on draws of the guide and ArviZ's Pareto-smoothed
  importance sampling: the ELBO (mean log weight), k̂ (< 0.5 good, 0.5-0.7 usable,
  > 0.7 do not trust the guide) and the importance-weighted ELBO;
* repeats: ``--repeats`` runs per (model, guide), seed = repeat index for
  initialisation and training, the guides in turn inside each repeat and their
  order rotated from repeat to repeat, so that slow drifts of a busy machine hit
  every guide alike; tables show medians over repeats. Torch threads are fixed
  (``--threads``, default 1).

ELBOs are log-scale quantities: the comparison lines print differences (nats),
not ratios; throughput (steps/s) is compared by ratio.

Usage::

    python benchmarks/bench_vi.py                       # 3 models x 5 guides x 3 repeats x 20 s, ~20 min
    python benchmarks/bench_vi.py --models funnel --guides AutoNormal pf-NSF pf-CNF --seconds 30
    python benchmarks/bench_vi.py --quick               # a few seconds per model (the smoke test)
    python benchmarks/bench_vi.py --reference --nuts-cache nuts/   # fixed schedule, k̂ and moments against NUTS
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow
from pyro.poutine.util import site_is_subsample
from torch import Tensor

import pyro_flows as pf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import load_line, machine_line, markdown_table  # noqa: E402

MODELS = ("funnel", "eight_schools", "logistic")
REFERENCE_MODELS = ("eight_schools", "eight_schools_nc", "linreg", "funnel")
GUIDES = ("AutoNormal", "AutoIAFNormal", "AutoNormalizingFlow", "pf-IAF", "pf-NSF", "pf-CNF")
DEFAULT_GUIDES = GUIDES[:-1]
PYRO_FLOWS = ("AutoIAFNormal", "AutoNormalizingFlow")
OURS = ("pf-IAF", "pf-NSF", "pf-CNF")


@dataclass(frozen=True)
class Config:
    """The recipe shared by every guide."""

    seconds: float = 20.0
    checkpoints: int = 4
    repeats: int = 3
    transforms: int = 4
    hidden: tuple[int, ...] = (32, 32)
    bins: int = 8
    bound: float = 5.0
    lr: float = 1e-2
    particles: int = 1
    eval_samples: int = 4000


QUICK = Config(seconds=0.5, checkpoints=2, repeats=1, hidden=(16, 16), eval_samples=200)


# -- models ---------------------------------------------------------------------------------------


def funnel(dim: int = 10) -> None:
    """Neal's funnel: v ~ N(0, 3^2), x_i | v ~ N(0, exp(v)), i = 1..dim-1 (normalised: log Z = 0)."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("dim", dim - 1):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


EIGHT_SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma: Tensor, y: Optional[Tensor] = None) -> None:
    """Centred eight schools: mu ~ N(0, 5^2), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau^2),
    y_j ~ N(theta_j, sigma_j^2)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def logistic_data(rows: int = 200, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Four standardised features (the first two correlated, rho = 0.8) and Bernoulli labels."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 4, generator=generator)
    x = torch.stack([z[:, 0], 0.8 * z[:, 0] + 0.6 * z[:, 1], z[:, 2], z[:, 3]], dim=-1)
    logits = x @ torch.tensor([1.5, -1.0, 0.5, 0.0]) + 0.3
    return x, torch.bernoulli(torch.sigmoid(logits), generator=generator)


def logistic(x: Tensor, y: Optional[Tensor] = None) -> None:
    """Bayesian logistic regression: w ~ N(0, I), b ~ N(0, 1), y_n ~ Bernoulli(sigmoid(x_n . w + b))."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    w = w.reshape(b.shape + w.shape[-1:])  # b's batch shape, as in linreg (Predictive gives (S, 4), psis (S, 1, 4))
    with pyro.plate("data", x.shape[0]):
        logits = (x * w).sum(-1) + b
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def funnel_nc(dim: int = 10) -> None:
    """Neal's funnel, non-centred: v ~ N(0, 3^2), z_i ~ N(0, 1); the funnel's x_i = z_i exp(v / 2)."""
    pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("dim", dim - 1):
        pyro.sample("z", dist.Normal(0.0, 1.0))


def eight_schools_nc(sigma: Tensor, y: Optional[Tensor] = None) -> None:
    """Non-centred eight schools: theta_j = mu + tau * theta_tilde_j, theta_tilde_j ~ N(0, 1) (same posterior)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def linreg_data(rows: int = 30, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Three features (the first two correlated, rho = 0.9), y = x . (1, -1, 0.5) + 0.5 + N(0, 1) noise."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 3, generator=generator)
    x = torch.stack([z[:, 0], 0.9 * z[:, 0] + math.sqrt(1 - 0.81) * z[:, 1], z[:, 2]], dim=-1)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.5 + torch.randn(rows, generator=generator)
    return x, y


def linreg(x: Tensor, y: Optional[Tensor] = None) -> None:
    """Bayesian linear regression: w ~ N(0, I), b ~ N(0, 1), sigma ~ HalfNormal(2), y_n ~ N(x_n . w + b, sigma^2)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    # under a particle plate at dim -2, b and sigma are (S, 1) and w is (S, 1, 3) (psis) or (S, 3) (Predictive):
    # w takes b's batch shape, so the mean is (S, rows), never (S, S, rows)
    w = w.reshape(b.shape + w.shape[-1:])
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1) + b, sigma), obs=y)


def problem(name: str) -> tuple[Callable, tuple]:
    """``(model, args)`` of a benchmark model."""
    if name == "funnel":
        return funnel, ()
    if name == "funnel_nc":
        return funnel_nc, ()
    if name == "eight_schools":
        return eight_schools, (EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y)
    if name == "eight_schools_nc":
        return eight_schools_nc, (EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y)
    if name == "logistic":
        return logistic, logistic_data()
    if name == "linreg":
        return linreg, linreg_data()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS + REFERENCE_MODELS}")


# -- guides ---------------------------------------------------------------------------------------


def pyro_spline_flow(dim: int, cfg: Config):
    """Pyro's neural spline flow: ``cfg.transforms`` quadratic ``SplineAutoregressive`` layers, orders alternating.

    Built directly, because Pyro's ``spline_autoregressive`` helper sizes the network for the linear spline only.
    """
    from pyro.distributions.transforms import ComposeTransformModule, SplineAutoregressive
    from pyro.nn import AutoRegressiveNN

    k = cfg.bins
    layers = []
    for i in range(cfg.transforms):
        order = torch.arange(dim) if i % 2 == 0 else torch.arange(dim).flip(0)
        arn = AutoRegressiveNN(dim, list(cfg.hidden), param_dims=[k, k, k - 1], permutation=order)
        layers.append(SplineAutoregressive(dim, arn, count_bins=k, bound=cfg.bound, order="quadratic"))
    return ComposeTransformModule(layers)


def make_guide(name: str, model: Callable, cfg: Config):
    """A fresh guide; flows share layer count, MADE widths, spline bins and bound."""
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoIAFNormal":
        return AutoIAFNormal(model, hidden_dim=list(cfg.hidden), num_transforms=cfg.transforms)
    if name == "AutoNormalizingFlow":
        return AutoNormalizingFlow(model, functools.partial(pyro_spline_flow, cfg=cfg))
    if name == "pf-IAF":
        return pf.infer.AutoFlowGuide(model, flow="iaf", transforms=cfg.transforms, hidden=cfg.hidden)
    if name == "pf-NSF":
        return pf.infer.AutoFlowGuide(
            model, flow="nsf", transforms=cfg.transforms, hidden=cfg.hidden, bins=cfg.bins, bound=cfg.bound
        )
    if name == "pf-CNF":
        return pf.infer.AutoFlowGuide(model, flow="cnf", hidden=cfg.hidden)
    raise ValueError(f"unknown guide {name!r}; choose from {GUIDES}")


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """The guide after ``seconds`` of training (``steps`` SVI steps)."""

    seconds: float
    steps: int
    elbo: float
    khat: float
    iw_elbo: float


def evaluate(model: Callable, guide, args: tuple, num_samples: int, seed: int) -> tuple[float, float, float]:
    """(ELBO, k̂, importance-weighted ELBO) from ``pf.diagnostics.psis``, with a fixed sampling seed.

    All three are NaN when a draw of the guide has a non-finite log-weight (psis raises a ValueError).
    """
    pyro.set_rng_seed(seed)
    try:
        with torch.no_grad():
            report = pf.diagnostics.psis(model, guide, *args, num_samples=num_samples)
    except ValueError:
        return math.nan, math.nan, math.nan
    return float(report.elbo), float(report.khat), float(report.iw_elbo)


def marks(cfg: Config) -> list[float]:
    """Checkpoint times T / 2^(c-1), ..., T / 2, T."""
    return [cfg.seconds / 2**k for k in reversed(range(cfg.checkpoints))]


def _svi(model: Callable, guide, cfg: Config) -> SVI:
    elbo = Trace_ELBO(num_particles=cfg.particles, vectorize_particles=cfg.particles > 1, max_plate_nesting=1)
    return SVI(model, guide, pyro.optim.ClippedAdam({"lr": cfg.lr}), elbo)


def warm_up(model_name: str, guide_name: str, cfg: Config, steps: int = 3) -> None:
    """A few untimed steps of a throw-away guide: one-time costs of the process (first traces, lazy imports)."""
    model, args = problem(model_name)
    pyro.clear_param_store()
    svi = _svi(model, make_guide(guide_name, model, cfg), cfg)
    for _ in range(steps):
        svi.step(*args)


def train(model_name: str, guide_name: str, cfg: Config, seed: int) -> list[Checkpoint]:
    """Train a fresh guide for ``cfg.seconds`` of wall-clock time, evaluating it at :func:`marks`."""
    model, args = problem(model_name)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    svi = _svi(model, make_guide(guide_name, model, cfg), cfg)
    guide = svi.guide
    elapsed, steps, out = time.perf_counter() - start, 0, []
    for mark in marks(cfg):
        while elapsed < mark:
            start = time.perf_counter()
            svi.step(*args)
            elapsed += time.perf_counter() - start
            steps += 1
        out.append(Checkpoint(elapsed, steps, *evaluate(model, guide, args, cfg.eval_samples, seed=10_000 + seed)))
    return out


@dataclass
class Result:
    """One guide on one model: the checkpoints of every repeat, or why it is n/a."""

    model: str
    guide: str
    runs: list[list[Checkpoint]] = field(default_factory=list)
    error: Optional[str] = None

    def median(self, attribute: str, checkpoint: int = -1) -> Optional[float]:
        values = [getattr(run[checkpoint], attribute) for run in self.runs]
        values = [v for v in values if not math.isnan(v)]
        return statistics.median(values) if values else None

    @property
    def steps_per_second(self) -> Optional[float]:
        return statistics.median(run[-1].steps / run[-1].seconds for run in self.runs) if self.runs else None


def run(
    models: Sequence[str] = MODELS,
    guides: Sequence[str] = DEFAULT_GUIDES,
    cfg: Config = Config(),
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Every (model, guide), ``cfg.repeats`` times, guides interleaved and rotated; threads restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = {(m, g): Result(m, g) for m in models for g in guides}
    try:
        for repeat in range(cfg.repeats):
            order = list(guides[repeat % len(guides) :]) + list(guides[: repeat % len(guides)])
            for m in models:
                for g in order:
                    result = results[m, g]
                    if result.error is not None:
                        continue
                    try:
                        if repeat == 0:
                            warm_up(m, g, cfg)
                        result.runs.append(train(m, g, cfg, seed=repeat))
                    except Exception as e:  # a guide that fails is reported n/a, the others go on
                        result.error = f"{type(e).__name__}: {e}"
                        log(f"{m} {g}: FAILED {result.error}")
                        continue
                    last = result.runs[-1][-1]
                    log(
                        f"repeat {repeat} {m:13s} {g:19s} {last.steps:6d} steps in {last.seconds:5.1f} s: "
                        f"ELBO {last.elbo:9.3f}  k̂ {last.khat:5.2f}  IW-ELBO {last.iw_elbo:9.3f}  [{load_line()}]"
                    )
    finally:
        torch.set_num_threads(previous)
    return list(results.values())


# -- report ---------------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(results: Sequence[Result], cfg: Config) -> str:
    """Markdown: steps/s, the ELBO at every checkpoint, and k̂ and IW-ELBO at the end (medians over repeats)."""
    times = [f"ELBO @{t:g}s" for t in marks(cfg)]
    rows = []
    for r in results:
        elbos = [_fmt(r.median("elbo", c)) for c in range(cfg.checkpoints)]
        rows.append(
            [r.model, r.guide, _fmt(r.steps_per_second, 0), *elbos, _fmt(r.median("khat")), _fmt(r.median("iw_elbo"))]
        )
    header = ["model", "guide", "steps/s", *times, "k̂", "IW-ELBO"]
    return markdown_table(header, rows, align="ll" + "r" * (len(header) - 2))


def comparisons(results: Sequence[Result]) -> list[str]:
    """For each model and each pyro_flows guide run: final ELBO and k̂ against the best Pyro flow guide."""
    lines = []
    for m in dict.fromkeys(r.model for r in results):
        by = {r.guide: r for r in results if r.model == m and r.runs}
        peers = [by[g] for g in PYRO_FLOWS if g in by and by[g].median("elbo") is not None]
        if not peers:
            continue
        best = max(peers, key=lambda r: r.median("elbo"))
        for g in OURS:
            ours = by.get(g)
            if ours is None or ours.median("elbo") is None:
                continue
            delta = ours.median("elbo") - best.median("elbo")
            speed = ours.steps_per_second / best.steps_per_second
            lines.append(
                f"{m}: {g} vs {best.guide}: ELBO {delta:+.3f} nats, "
                f"k̂ {_fmt(ours.median('khat'))} vs {_fmt(best.median('khat'))}, steps/s x{speed:.2f}"
            )
    return lines


# -- against reference draws: a fixed SVI schedule, moments and k̂ against NUTS -------------------

REFERENCE_GUIDES = (
    "AutoNormal",
    "AutoMultivariateNormal",
    "pf-NSF-diagonal",
    "pf-NSF-unscaled",
    "pf-NSF-total",
    "pf-NSF",
    "pf-IAF-total",
    "pf-IAF-path",
    "pf-IAF-path-unscaled",
    "pf-RealNVP-total",
    "pf-RealNVP-path",
)
NON_CENTRED = {"eight_schools": "eight_schools_nc", "funnel": "funnel_nc"}


@dataclass(frozen=True)
class ReferenceConfig:
    """The fixed schedule of ``--reference``: every guide gets ``steps`` SVI steps, in float64.

    ``ClippedAdam`` with the step size decaying geometrically from ``lr`` to ``final_lr``
    (``lrd = (final_lr / lr)^(1/steps)``), one-draw ``Trace_ELBO``; NUTS reference draws:
    ``chains`` chains of ``warmup`` + ``draws`` iterations.
    """

    steps: int = 3000
    lr: float = 1e-2
    final_lr: float = 1e-3
    repeats: int = 3
    eval_samples: int = 4000
    warmup: int = 1000
    draws: int = 2000
    chains: int = 2
    nuts_cache: str = ""  # a directory: NUTS draws are loaded from it if there, else saved to it


QUICK_REFERENCE = ReferenceConfig(steps=100, repeats=1, eval_samples=200, warmup=100, draws=200, chains=1)


def make_reference_guide(name: str, model: Callable):
    """``pf-IAF-path`` is today's default ``AutoFlowGuide(model)`` (``flow="iaf"``, path-derivative gradient);
    ``pf-NSF`` the default before it (``flow="nsf"``, total gradient; ``pf-NSF-total`` the same);
    ``pf-NSF-diagonal`` that without its unit lower-triangular layer (``full_rank=False``, the default before issue
    16.14); ``pf-NSF-unscaled`` with its conditioners' output layers not scaled down (``output_scale=1``, the
    default before). ``pf-IAF-*`` and ``pf-RealNVP-*`` are ``flow="iaf"`` and ``flow="realnvp"`` on the total or
    the path-derivative gradient (``path_gradient``); ``pf-IAF-path-unscaled`` the default with ``output_scale=1``."""
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model)
    if name == "pf-NSF-diagonal":
        return pf.infer.AutoFlowGuide(model, flow="nsf", full_rank=False)
    if name == "pf-NSF-unscaled":
        return pf.infer.AutoFlowGuide(model, flow="nsf", output_scale=1.0)
    if name in ("pf-NSF-total", "pf-NSF"):
        return pf.infer.AutoFlowGuide(model, flow="nsf", path_gradient=False)
    if name == "pf-IAF-path-unscaled":
        return pf.infer.AutoFlowGuide(model, flow="iaf", path_gradient=True, output_scale=1.0)
    for prefix, flow in (("pf-IAF-", "iaf"), ("pf-RealNVP-", "realnvp")):
        if name in (prefix + "total", prefix + "path"):
            return pf.infer.AutoFlowGuide(model, flow=flow, path_gradient=name.endswith("path"))
    raise ValueError(f"unknown guide {name!r}; choose from {REFERENCE_GUIDES}")


def _float64(args: tuple) -> tuple:
    return tuple(a.to(torch.float64) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def unconstrained(model_name: str, samples: dict) -> Tensor:
    """``(S, D)``: the latent sites of ``samples`` (model trace order), each mapped by ``biject_to(support).inv``."""
    columns = []
    for name, site in _latent_sites(model_name):
        value = samples[name]
        columns.append(biject_to(site["fn"].support).inv(value).reshape(value.shape[0], -1))
    return torch.cat(columns, dim=-1).to(torch.float64)


def _centred(model_name: str, samples: dict) -> dict:
    """Draws of a non-centred twin mapped to the centred model's sites (the same posterior)."""
    if model_name == "eight_schools":
        mu, tau, tilde = samples["mu"], samples["tau"], samples["theta_tilde"]
        return {"mu": mu, "tau": tau, "theta": mu[:, None] + tau[:, None] * tilde}
    if model_name == "funnel":
        v = samples["v"]
        return {"v": v, "x": samples["z"] * torch.exp(v[:, None] / 2)}
    return samples


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Torch's default dtype set to ``dtype`` inside the block, restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@functools.cache
def nuts_draws(model_name: str, rc: ReferenceConfig, seed: int = 0) -> dict:
    """NUTS draws (Hoffman & Gelman 2014) of every latent site, ``(chains * draws, ...)``, cached for the process
    and, with ``rc.nuts_cache``, in that directory (one file per model, run length and seed)."""
    path = None
    if rc.nuts_cache:
        name = f"nuts_{model_name}_w{rc.warmup}_d{rc.draws}_c{rc.chains}_s{seed}.pt"
        path = os.path.join(rc.nuts_cache, name)
        if os.path.exists(path):
            return torch.load(path, weights_only=True)
    model, args = problem(model_name)
    chains = []
    with _default_dtype(torch.float64):
        for chain in range(rc.chains):
            pyro.set_rng_seed(seed + chain)
            mcmc = MCMC(NUTS(model), num_samples=rc.draws, warmup_steps=rc.warmup, disable_progbar=True)
            mcmc.run(*_float64(args))
            chains.append(mcmc.get_samples())
    draws = {name: torch.cat([c[name] for c in chains]) for name in chains[0]}
    if path is not None:
        os.makedirs(rc.nuts_cache, exist_ok=True)
        torch.save(draws, path)
    return draws


def reference_draws(model_name: str, samples: dict) -> Tensor:
    """``(S, D)`` unconstrained reference draws of ``model_name`` from the NUTS draws of :func:`reference_model`."""
    return unconstrained(model_name, _centred(model_name, samples))


def reference_model(model_name: str) -> str:
    """The model NUTS samples for ``model_name``: a centred model (eight schools, the funnel) is sampled through
    its non-centred twin and mapped back by :func:`reference_draws`, the same posterior without the funnel
    geometry that makes NUTS itself diverge in the neck."""
    return NON_CENTRED.get(model_name, model_name)


@dataclass
class Fit:
    """One guide after the fixed schedule: k̂ and ELBO (``psis``), and its unconstrained draws' moments."""

    model: str
    guide: str
    seed: int
    seconds: float
    khat: float
    elbo: float
    mean: list[float]
    sd: list[float]


def fit_guide(model_name: str, guide_name: str, rc: ReferenceConfig, seed: int) -> Fit:
    """Train a fresh guide for ``rc.steps`` steps (float64), then k̂ and the moments of ``rc.eval_samples`` draws."""
    model, args = problem(model_name)
    with _default_dtype(torch.float64):
        args = _float64(args)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = make_reference_guide(guide_name, model)
        optim = pyro.optim.ClippedAdam({"lr": rc.lr, "lrd": (rc.final_lr / rc.lr) ** (1 / rc.steps)})
        svi = SVI(model, guide, optim, Trace_ELBO(max_plate_nesting=1))
        start = time.perf_counter()
        for _ in range(rc.steps):
            svi.step(*args)
        seconds = time.perf_counter() - start
        elbo, khat, _ = evaluate(model, guide, args, rc.eval_samples, seed=10_000 + seed)
        with torch.no_grad():
            predictive = Predictive(model, guide=guide, num_samples=rc.eval_samples, parallel=True)
            names = [name for name, _ in _latent_sites(model_name)]
            latent = {k: v.reshape(rc.eval_samples, -1).squeeze(-1) for k, v in predictive(*args).items() if k in names}
            draws = unconstrained(model_name, latent)
    return Fit(model_name, guide_name, seed, seconds, khat, elbo, draws.mean(0).tolist(), draws.std(0).tolist())


def _latent_sites(model_name: str) -> list:
    """``(name, site)`` of the model's latent sample sites (plates' subsample sites left out), traced in float64."""
    model, args = problem(model_name)
    with _default_dtype(torch.float64):
        trace = pyro.poutine.trace(model).get_trace(*_float64(args))
    return [(name, site) for name, site in trace.iter_stochastic_nodes() if not site_is_subsample(site)]


def moment_errors(fit: Fit, reference: Tensor) -> tuple[float, float]:
    """``(max_j |mean_q - mean_ref| / sd_ref, max_j |sd_q / sd_ref - 1|)`` over the unconstrained coordinates."""
    mean, sd = torch.tensor(fit.mean, dtype=torch.float64), torch.tensor(fit.sd, dtype=torch.float64)
    ref_mean, ref_sd = reference.mean(0), reference.std(0)
    return float(((mean - ref_mean).abs() / ref_sd).max()), float((sd / ref_sd - 1).abs().max())


def _task(task: tuple):
    """One unit of :func:`run_reference`'s work (a pool worker's entry point): NUTS draws or a guide fit."""
    torch.set_num_threads(1)
    kind, model_name, rc, *rest = task
    if kind == "nuts":
        return nuts_draws(model_name, rc)
    guide_name, seed = rest
    try:
        return fit_guide(model_name, guide_name, rc, seed)
    except Exception as e:  # a guide that fails is reported n/a, the others go on
        return f"{type(e).__name__}: {e}"


def run_reference(
    models: Sequence[str] = REFERENCE_MODELS,
    guides: Sequence[str] = REFERENCE_GUIDES,
    rc: ReferenceConfig = ReferenceConfig(),
    jobs: int = 1,
) -> tuple[dict, list]:
    """NUTS reference draws per model (one run per :func:`reference_model`), and every (model, guide, seed) fit;
    ``jobs`` > 1 runs them in processes.

    Returns ``({model: reference draws}, [Fit or (model, guide, seed, error)])``.
    """
    previous = torch.get_num_threads()
    fits_tasks = [("fit", m, rc, g, seed) for seed in range(rc.repeats) for m in models for g in guides]
    twins = list(dict.fromkeys(reference_model(m) for m in models))
    nuts_tasks = [("nuts", twin, rc) for twin in twins]
    try:
        if jobs > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                pending = pool.map_async(_task, nuts_tasks, chunksize=1)
                fitted = pool.map(_task, fits_tasks, chunksize=1)
                samples = pending.get()
        else:
            samples = [_task(t) for t in nuts_tasks]
            fitted = [_task(t) for t in fits_tasks]
    finally:
        torch.set_num_threads(previous)
    by_twin = dict(zip(twins, samples, strict=True))
    fits = [f if isinstance(f, Fit) else (t[1], t[3], t[4], f) for t, f in zip(fits_tasks, fitted, strict=True)]
    return {m: reference_draws(m, by_twin[reference_model(m)]) for m in models}, fits


def reference_table(references: dict, fits: Sequence) -> str:
    """Markdown: per (model, guide) the median over seeds of k̂, the moment errors and the ELBO, and k̂ per seed."""
    rows: list[list[object]] = []
    groups: dict = {}
    for f in fits:
        groups.setdefault((f.model, f.guide) if isinstance(f, Fit) else f[:2], []).append(f)
    for (m, g), group in groups.items():
        ok = [f for f in group if isinstance(f, Fit)]
        if not ok:
            rows.append([m, g, f"n/a ({group[0][3]})", "", "", "", "", ""])
            continue
        errors = [moment_errors(f, references[m]) for f in ok]
        khats = [f.khat for f in ok]
        rows.append(
            [
                m,
                g,
                _fmt(statistics.median(khats)),
                " ".join(_fmt(k) for k in khats),
                _fmt(statistics.median(e[0] for e in errors)),
                _fmt(statistics.median(e[1] for e in errors)),
                _fmt(statistics.median(f.elbo for f in ok), 3),
                _fmt(statistics.median(f.seconds for f in ok), 0),
            ]
        )
    header = [
        "model",
        "guide",
        "k̂ median",
        "k̂ per seed",
        "max \\|Δmean\\|/sd",
        "max \\|sd ratio − 1\\|",
        "ELBO",
        "s/fit",
    ]
    return markdown_table(header, rows, align="llrlrrrr")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=sorted({*MODELS, *REFERENCE_MODELS, "funnel_nc"}))
    p.add_argument("--guides", nargs="+", default=None, choices=[*GUIDES, *REFERENCE_GUIDES[1:]])
    p.add_argument("--reference", action="store_true", help="fixed schedule, k̂ and moments against NUTS draws")
    p.add_argument("--steps", type=int, default=None, help="--reference: SVI steps (default 3000, quick 100)")
    p.add_argument("--jobs", type=int, default=1, help="--reference: worker processes")
    p.add_argument("--nuts", type=int, nargs=3, metavar=("WARMUP", "DRAWS", "CHAINS"), help="--reference: NUTS run")
    p.add_argument("--nuts-cache", help="--reference: directory to load NUTS draws from, or save them to")
    p.add_argument("--seconds", type=float, default=None, help="training budget per run (default 20, quick 0.5)")
    p.add_argument("--checkpoints", type=int, default=None, help="evaluations at T/2^(c-1)..T (default 4, quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="default 3, quick 1")
    p.add_argument("--transforms", type=int, default=None, help="flow layers (default 4)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="MADE widths (default 32 32, quick 16 16)")
    p.add_argument("--lr", type=float, default=None, help="ClippedAdam learning rate (default 1e-2)")
    p.add_argument("--particles", type=int, default=None, help="ELBO particles per step (default 1)")
    p.add_argument("--eval-samples", type=int, default=None, help="draws for ELBO and k̂ (default 4000, quick 200)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    p.add_argument("--json", help="write every checkpoint of every repeat to this file")
    a = p.parse_args(argv)
    if a.reference:
        return main_reference(a)
    guides = a.guides or list(DEFAULT_GUIDES)
    if not set(guides) <= set(GUIDES):
        p.error(f"guides {sorted(set(guides) - set(GUIDES))} are for --reference only")
    base = QUICK if a.quick else Config()
    overrides = {
        "seconds": a.seconds,
        "checkpoints": a.checkpoints,
        "repeats": a.repeats,
        "transforms": a.transforms,
        "hidden": tuple(a.hidden) if a.hidden else None,
        "lr": a.lr,
        "particles": a.particles,
        "eval_samples": a.eval_samples,
    }
    cfg = Config(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})
    print(f"{machine_line()}; pyro {pyro.__version__}, {a.threads} thread(s) for the runs; {cfg}")
    results = run(a.models or list(MODELS), guides, cfg, a.threads)
    print()
    print(table(results, cfg))
    print()
    for line in comparisons(results):
        print(line)
    for r in results:
        if r.error:
            print(f"{r.model} {r.guide}: n/a ({r.error})")
    print(load_line())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": asdict(cfg), "results": [asdict(r) for r in results]}, f, indent=1)
    return 0


def main_reference(a: argparse.Namespace) -> int:
    """``--reference``: :func:`run_reference`, its table, and each pyro_flows guide against AutoMultivariateNormal."""
    base = QUICK_REFERENCE if a.quick else ReferenceConfig()
    overrides = {"steps": a.steps, "repeats": a.repeats, "lr": a.lr, "eval_samples": a.eval_samples}
    if a.nuts_cache:
        overrides["nuts_cache"] = a.nuts_cache
    if a.nuts:
        overrides.update(zip(("warmup", "draws", "chains"), a.nuts, strict=True))
    rc = ReferenceConfig(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})
    models, guides = a.models or list(REFERENCE_MODELS), a.guides or list(REFERENCE_GUIDES)
    unknown = sorted(set(guides) - set(REFERENCE_GUIDES))
    if unknown:
        raise SystemExit(f"--reference guides are {', '.join(REFERENCE_GUIDES)}; not {unknown}")
    print(f"{machine_line()}; pyro {pyro.__version__}, float64, {a.jobs} process(es) of 1 thread; {rc}")
    start = time.perf_counter()
    references, fits = run_reference(models, guides, rc, a.jobs)
    print(f"{time.perf_counter() - start:.0f} s")
    print()
    print(reference_table(references, fits))
    if a.json:
        with open(a.json, "w") as f:
            rows = [asdict(x) if isinstance(x, Fit) else {"error": x} for x in fits]
            json.dump({"config": asdict(rc), "fits": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
