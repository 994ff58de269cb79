"""Density-estimation benchmark: held-out log-likelihood and training time at an equal budget.

pyro_flows' :class:`~pyro_flows.DensityEstimator` against zuko and nflows, fitted
the same way on the same data in one process:

* data: two moons (10 000 points, noise 0.1) and scikit-learn's 8x8 digits
  (64-D, dequantised as ``(x + u) / 17``), each split once 80/20 into training
  and test rows with seed 0;
* architecture: autoregressive neural spline flow (MAF direction: densities in
  one pass), 5 layers, MADE conditioners with hidden widths (128, 128) and
  ReLU, rational-quadratic splines with 8 bins on [-5, 5] (identity tails),
  orders reversed between layers; all three libraries end up with exactly the
  same number of parameters (printed);
* standardisation: every library models the training rows standardised with
  the same column means and standard deviations (``N - 1``); pyro_flows'
  estimator does it itself (a fixed last layer with its log-det), for the peers
  the script applies the same map and adds ``-sum(log std)``, so every
  log-likelihood is in the data's units;
* training: the same number of Adam steps (``--steps``), batch size, learning
  rate and gradient clipping (global norm 5, pyro_flows' default), epochs of
  shuffled training rows, no validation split and no early stopping;
* metrics: mean test log-likelihood per dimension in nats (higher is better;
  ``lib − pf`` is a library's minus pyro_flows', so negative means pyro_flows
  is better), and the training wall time (model construction included).
  ``pf time / time`` below 1 and ``pf speed`` above 1 mean pyro_flows was faster.

Each library is warmed up once on each data set (a few steps, untimed). Then
the fits run ``--repeats`` times (initialisation and shuffling seed = repeat
index), the libraries in turn inside each repeat and the order rotated from
repeat to repeat, so that slow drifts of a busy machine hit every library
alike; the table shows the mean log-likelihood (± standard deviation over
repeats) and the median time. The torch thread count is fixed (``--threads``).

A peer that is not installed is reported as ``n/a``.

Usage::

    python benchmarks/bench_density.py                        # everything (about 15 minutes on 2 CPU cores)
    python benchmarks/bench_density.py --data moons --repeats 1
    python benchmarks/bench_density.py --quick --libs pyro_flows   # seconds (the test)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timing, interleave, load_line, machine_line, markdown_table, set_threads  # noqa: E402

LIBS = ("pyro_flows", "zuko", "nflows")
DATASETS = ("moons", "digits")
STEPS = {"moons": 2000, "digits": 250}  # digits: held-out likelihood peaks near 200-250 steps, then overfits
QUICK_STEPS = {"moons": 30, "digits": 20}


@dataclass(frozen=True)
class Config:
    """The architecture and the training recipe shared by every library."""

    transforms: int = 5
    hidden: tuple[int, ...] = (128, 128)
    bins: int = 8
    bound: float = 5.0
    batch_size: int = 256
    lr: float = 1e-3
    clip_grad: float = 5.0
    moons_rows: int = 10_000


QUICK = Config(moons_rows=2000)


@dataclass
class Result:
    """One library on one data set: a (seconds, test nats/dim) pair per repeat, or why it is n/a."""

    dataset: str
    lib: str
    dims: int
    steps: int
    seconds: list[float] = field(default_factory=list)
    log_likelihood: list[float] = field(default_factory=list)  # mean test log-density per dimension, nats
    params: Optional[int] = None
    error: Optional[str] = None

    @property
    def time(self) -> Optional[float]:
        return Timing(self.seconds).median

    @property
    def ll(self) -> Optional[float]:
        return statistics.fmean(self.log_likelihood) if self.log_likelihood else None

    @property
    def ll_std(self) -> float:
        return statistics.stdev(self.log_likelihood) if len(self.log_likelihood) > 1 else 0.0


# -- data -------------------------------------------------------------------------------------------


def load(dataset: str, cfg: Config) -> tuple[Tensor, Tensor]:
    """Training and test rows (float64), split 80/20 by a permutation seeded 0."""
    from pyro_flows.data import digits, two_moons

    generator = torch.Generator().manual_seed(0)
    if dataset == "moons":
        x = two_moons(cfg.moons_rows, noise=0.1, generator=generator).double()
    elif dataset == "digits":
        x = digits(dequantize=True, generator=generator)[0].double()
    else:
        raise ValueError(f"unknown data set {dataset!r}; choose from {DATASETS}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = len(x) - round(0.2 * len(x))
    return x[order[:cut]], x[order[cut:]]


def standardization(train: Tensor, min_scale: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Column means and standard deviations (``N - 1``) of ``train``, floored as pyro_flows' ``Standardize`` does."""
    std, mean = torch.std_mean(train.double(), dim=0)
    return mean, torch.maximum(std, min_scale * mean.abs().clamp(min=1.0))


def in_data_units(log_prob_standardized: Callable[[Tensor], Tensor], x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    r""":math:`\log p(x) = \log q((x - \mu) / \sigma) - \sum_i \log \sigma_i`, ``q`` a density of standardised rows."""
    z = ((x.double() - loc) / scale).float()
    return log_prob_standardized(z).double() - scale.log().sum()


def gaussian_nats_per_dim(train: Tensor, test: Tensor) -> float:
    """Mean test log-density per dimension of the maximum-likelihood Gaussian of ``train`` (a reference)."""
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T, correction=0))
    return float(gaussian.log_prob(test).mean()) / train.shape[1]


def batches(rows: int, batch_size: int, steps: int, seed: int):
    """``steps`` index batches: epochs of seeded permutations cut into ``batch_size`` rows (the last one shorter)."""
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for index in torch.randperm(rows, generator=generator).split(batch_size):
            if done == steps:
                return
            yield index
            done += 1


# -- libraries ---------------------------------------------------------------------------------------


def available(lib: str) -> Optional[str]:
    """None if ``lib`` can run, else why not."""
    return None if importlib.util.find_spec(lib) is not None else "not installed"


def fit_pyro_flows(train: Tensor, test: Tensor, cfg: Config, steps: int, seed: int) -> tuple[float, float, int]:
    """Fit ``pf.DensityEstimator``; return (seconds, test nats/dim, parameters)."""
    import pyro_flows as pf

    start = time.perf_counter()
    est = pf.DensityEstimator("nsf", transforms=cfg.transforms, hidden=cfg.hidden, bins=cfg.bins, bound=cfg.bound)
    est.fit(
        train.numpy(),
        max_epochs=10**9,
        max_steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        clip_grad=cfg.clip_grad,
        validation_fraction=0.0,
        patience=None,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - start
    if est.history_.steps != steps:
        raise RuntimeError(f"pyro_flows took {est.history_.steps} steps, not {steps}")
    # the estimator's own standardisation is the one the peers get
    loc, scale = standardization(train)
    standardize = est.flow_.transforms[-1]  # of the data centred on est.offset_ (in float64)
    if not (
        torch.allclose(standardize.loc.double() + est.offset_, loc)
        and torch.allclose(standardize.scale.double(), scale)
    ):
        raise RuntimeError("pyro_flows' standardisation differs from the one given to the peers")
    ll = float(np.mean(est.score_samples(test.numpy()))) / train.shape[1]
    return seconds, ll, sum(p.numel() for p in est.flow_.parameters())


def build_zuko(features: int, cfg: Config) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    import zuko

    # zuko's NSF: MaskedAutoregressiveTransform (data -> base in one pass) with MonotonicRQSTransform,
    # whose bound is 5 with identity tails; orders alternate (reversed) between layers
    flow = zuko.flows.NSF(
        features, transforms=cfg.transforms, bins=cfg.bins, hidden_features=list(cfg.hidden), activation=nn.ReLU
    )
    if cfg.bound != 5.0:
        raise ValueError("zuko's spline bound is fixed at 5")
    return flow, lambda z: flow().log_prob(z)


def build_nflows(features: int, cfg: Config) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    import torch.nn.functional as F
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import (
        CompositeTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        ReversePermutation,
    )

    # nflows' MADE: input layer, num_blocks hidden blocks, output layer; one block of equal widths = hidden (h, h)
    if len(cfg.hidden) != 2 or cfg.hidden[0] != cfg.hidden[1]:
        raise ValueError("the nflows builder supports hidden = (h, h)")
    made = dict(hidden_features=cfg.hidden[0], num_blocks=1, use_residual_blocks=False, activation=F.relu)
    layers: list[nn.Module] = []
    for i in range(cfg.transforms):
        if i:
            layers.append(ReversePermutation(features))  # alternate the order
        layers.append(
            MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                features, num_bins=cfg.bins, tails="linear", tail_bound=cfg.bound, **made
            )
        )
    flow = Flow(CompositeTransform(layers), StandardNormal([features]))
    return flow, flow.log_prob


PEERS = {"zuko": build_zuko, "nflows": build_nflows}


def fit_peer(lib: str, train: Tensor, test: Tensor, cfg: Config, steps: int, seed: int) -> tuple[float, float, int]:
    """Fit a peer's flow on the standardised rows with the same recipe; return (seconds, test nats/dim, parameters)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    module, log_prob = PEERS[lib](train.shape[1], cfg)
    loc, scale = standardization(train)
    z = ((train - loc) / scale).float()
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=cfg.lr)
    module.train()
    for index in batches(len(z), cfg.batch_size, steps, seed + 1):
        loss = -log_prob(z[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, cfg.clip_grad)
        optimizer.step()
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        ll = float(in_data_units(log_prob, test, loc, scale).mean()) / train.shape[1]
    return seconds, ll, sum(p.numel() for p in parameters)


def fit(lib: str, train: Tensor, test: Tensor, cfg: Config, steps: int, seed: int) -> tuple[float, float, int]:
    if lib == "pyro_flows":
        return fit_pyro_flows(train, test, cfg, steps, seed)
    return fit_peer(lib, train, test, cfg, steps, seed)


# -- the run -----------------------------------------------------------------------------------------


def run(
    datasets: Sequence[str] = DATASETS,
    libs: Sequence[str] = LIBS,
    threads: int = 1,
    repeats: int = 3,
    steps: Optional[dict[str, int]] = None,
    quick: bool = False,
    warmup: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> tuple[list[Result], dict[str, float]]:
    """Fit every library on every data set ``repeats`` times, interleaved; return the results and Gaussian references.

    Every library in :data:`LIBS` gets a row; those not in ``libs`` or not installed stay n/a. Each library
    is first fitted for ``warmup`` steps on each data set, untimed (default 5; 0 when ``quick``).
    """
    cfg = QUICK if quick else Config()
    warmup = (0 if quick else 5) if warmup is None else warmup
    steps = {**(QUICK_STEPS if quick else STEPS), **(steps or {})}
    previous_threads = torch.get_num_threads()
    set_threads(threads)
    results: dict[tuple[str, str], Result] = {}
    references: dict[str, float] = {}
    try:
        data = {name: load(name, cfg) for name in datasets}
        runnable = []
        for name in datasets:
            train, test = data[name]
            references[name] = gaussian_nats_per_dim(train, test)
            for lib in LIBS:
                why = "not run" if lib not in libs else available(lib)
                results[name, lib] = Result(name, lib, train.shape[1], steps[name], error=why)
                if why is None and lib not in runnable:
                    runnable.append(lib)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peers' deprecation warnings
            if warmup:
                for name in datasets:
                    for lib in runnable:
                        result = results[name, lib]
                        _attempt(result, lambda lib=lib, name=name: fit(lib, *data[name], cfg, warmup, 0))
                        result.seconds.clear()
                        result.log_likelihood.clear()
            for name in datasets:
                cases = {lib: _repeated_fit(results[name, lib], data[name], cfg, steps[name], log) for lib in runnable}
                # the fits clock their training themselves (the test scoring excluded): interleave only orders them
                interleave(cases, repeats, warmup=0)
    finally:
        torch.set_num_threads(previous_threads)
    return list(results.values()), references


def _repeated_fit(
    result: Result, data: tuple[Tensor, Tensor], cfg: Config, steps: int, log: Callable[[str], None]
) -> Callable[[], None]:
    """A case of :func:`harness.interleave`: each call fits ``result.lib`` once more into ``result``, seeded by the
    number of earlier calls (the repeat), and logs it; once a fit failed, the calls do nothing."""
    repeats = itertools.count()

    def case() -> None:
        repeat = next(repeats)
        if result.error is not None:
            return
        _attempt(result, lambda: fit(result.lib, *data, cfg, steps, repeat))
        where = f"repeat {repeat} {result.dataset:6s} {result.lib:10s}"
        if result.error is None:
            log(f"{where} {result.seconds[-1]:7.1f} s  {result.log_likelihood[-1]:+.4f} nats/dim")
        else:
            log(f"{where} failed: {result.error}")

    return case


def _attempt(result: Result, fit_once: Callable[[], tuple[float, float, int]]) -> None:
    """Run one fit into ``result``; a failure marks the row n/a with the error (the other rows go on)."""
    try:
        seconds, ll, params = fit_once()
    except Exception as error:  # noqa: BLE001 - a peer's failure is reported, not raised
        result.error = f"{type(error).__name__}: {error}"
        return
    if not math.isfinite(ll):
        result.error = f"non-finite log-likelihood {ll}"
        return
    result.seconds.append(seconds)
    result.log_likelihood.append(ll)
    result.params = params


def table(results: Sequence[Result], references: Optional[dict[str, float]] = None) -> str:
    """A Markdown table, one row per (data set, library), with the ratios to pyro_flows."""
    head = ["data", "D", "steps", "library", "params", "test log-lik (nats/dim)", "lib − pf", "train time (s)"]
    head += ["pf time / time", "pf speed"]
    rows = []
    ours = {r.dataset: r for r in results if r.lib == "pyro_flows"}
    for r in results:
        base = ours.get(r.dataset)
        if r.error is not None or r.ll is None:
            cells = [r.dataset, r.dims, r.steps, r.lib, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"]
        else:
            spread = f" ± {r.ll_std:.3f}" if len(r.log_likelihood) > 1 else ""
            comparable = base is not None and base.error is None and base.ll is not None
            delta = "—" if r.lib == "pyro_flows" or not comparable else f"{r.ll - base.ll:+.3f}"
            ratio = f"{base.time / r.time:.2f}" if comparable else "n/a"
            speed = f"{r.time / base.time:.2f}×" if comparable else "n/a"
            cells = [r.dataset, r.dims, r.steps, r.lib, f"{r.params:,}", f"{r.ll:+.3f}{spread}", delta]
            cells += [f"{r.time:.1f}", ratio, speed]
        rows.append(cells)
    lines = [markdown_table(head, rows)]
    if references:
        lines.append("")
        lines.append(
            "Reference, the maximum-likelihood Gaussian of the training rows: "
            + ", ".join(f"{name} {value:+.3f} nats/dim" for name, value in references.items())
            + "."
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS), help="data sets")
    parser.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS), help="libraries to run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per library and data set (default 3)")
    for name in DATASETS:
        parser.add_argument(f"--{name}-steps", type=int, help=f"Adam steps on {name} (default {STEPS[name]})")
    parser.add_argument("--quick", action="store_true", help="tiny budget (seconds; for the test)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    steps = {name: getattr(args, f"{name}_steps") for name in DATASETS if getattr(args, f"{name}_steps")}
    cfg = QUICK if args.quick else Config()
    set_threads(args.threads)
    print(machine_line())
    print(
        f"NSF-AR x{cfg.transforms}, hidden {cfg.hidden}, "
        f"{cfg.bins} bins on [-{cfg.bound:g}, {cfg.bound:g}]; batch {cfg.batch_size}, Adam lr {cfg.lr:g}, "
        f"clip {cfg.clip_grad:g}; {args.repeats} repeat(s)",
        flush=True,
    )
    results, references = run(
        args.data,
        args.libs,
        args.threads,
        args.repeats,
        steps,
        args.quick,
        log=lambda line: print(line, flush=True),
    )
    print(f"\nfinished: {load_line()}\n")
    print(table(results, references))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [asdict(r) for r in results], "gaussian": references}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
