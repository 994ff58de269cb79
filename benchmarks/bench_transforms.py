"""Speed benchmark: pyro_flows against zuko, nflows and Pyro's own transforms.

The same architectures are built in every library and timed side by side in
one process with a fixed number of torch threads:

* 5 layers, conditioner MLPs with hidden widths (128, 128) and ReLU,
* rational-quadratic splines with 8 bins on [-5, 5] (identity tails),
* rows ``MAF``, ``NSF-AR`` (autoregressive NSF), ``NSF-C`` (coupling NSF) and
  ``RealNVP``, unconditional, at ``D`` = 8 and 32 by default.

Directions match: for the autoregressive rows density evaluation is the
one-pass direction in every library (MAF style) and sampling is sequential;
couplings are one pass both ways. The script checks the one-pass claim by
counting ``nn.Linear`` calls during one ``log_prob`` (see :func:`linear_calls`).

Metrics (samples/s, higher is better):

* ``train``: one Adam step on ``-log_prob(x).mean()`` for a batch of 512,
* ``log_prob``: ``log_prob`` of a batch of 4096 under ``torch.no_grad()``,
* ``sample``: drawing 4096 samples under ``torch.no_grad()``.

Each library is warmed up, then the libraries are timed in turn (A, B, C, D,
A, B, C, D, ...) ``--repeats`` times and the median is reported, so that slow
drifts of a noisy machine hit every library alike. Every timed call gets a
fresh input tensor, so no library can serve a result from a transform cache.

A peer that is not installed (or cannot build a row) is reported as ``n/a``.

The ``floor`` column (off with ``--no-floor``) times each row's conditioner networks bare, interleaved with the
libraries: plain ``nn.Linear`` layers of the same shapes, the same batch, forward, ``sum().backward()`` and the
same Adam step (:func:`build_floor`). No flow built on these networks can be faster, so ``pyro_flows time /
floor`` is what the flow adds around the matmuls (masks, the elementwise maps, log-dets, Python per layer).

Usage::

    python benchmarks/bench_transforms.py                      # everything
    python benchmarks/bench_transforms.py --rows MAF --dims 8 --quick
    python benchmarks/bench_transforms.py --profile NSF-AR --dims 8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, also when loaded by the tests
from harness import interleave, load_line, machine_line, markdown_table, version  # noqa: E402
from harness import ratio as best_ratio  # noqa: E402

ROWS = ("MAF", "NSF-AR", "NSF-C", "RealNVP")
LIBS = ("pyro_flows", "zuko", "nflows", "pyro")
METRICS = ("train", "log_prob", "sample")
PEERS = LIBS[1:]
COMPILED = "pyro_flows+compile"  # pyro_flows through pf.compile_flow (inductor), an opt-in column (--compile)
OURS = ("pyro_flows", COMPILED)
# the bare conditioner networks of a row (same shapes, batch and optimiser, no flow around them): the physical limit
FLOOR = "floor"

TRANSFORMS = 5
HIDDEN = (128, 128)
BINS = 8
BOUND = 5.0

# modules each library needs; a missing one makes the library "n/a"
_REQUIRES = {
    "pyro_flows": ("pyro_flows",),
    COMPILED: ("pyro_flows",),
    FLOOR: (),
    "zuko": ("zuko",),
    "nflows": ("nflows",),
    "pyro": ("pyro",),
}


class Unavailable(Exception):
    """A library has no equivalent of a row (reported as n/a)."""


@dataclass
class Model:
    """A flow of one library behind a common interface."""

    module: nn.Module  # owns every trainable parameter
    log_prob: Callable[[Tensor], Tensor]  # (N, D) -> (N,)
    sample: Callable[[int], Tensor]  # n -> (n, D)
    loss: Optional[Callable[[Tensor], Tensor]] = None  # the training loss of a batch; default -log_prob(x).mean()


def _coupling_mask(features: int, i: int) -> Tensor:
    """Boolean (D,), True for the transformed half; alternates like pyro_flows' couplings."""
    mask = torch.arange(features) >= features // 2
    return mask if i % 2 == 0 else ~mask


def _order(features: int, i: int) -> Tensor:
    order = torch.arange(features)
    return order if i % 2 == 0 else order.flip(0)


# -- builders -------------------------------------------------------------------


def build_pyro_flows(row: str, features: int) -> Model:
    import pyro_flows as pf

    kw = dict(features=features, transforms=TRANSFORMS, hidden=HIDDEN)
    if row == "MAF":
        flow = pf.MAF(**kw)
    elif row == "NSF-AR":
        flow = pf.NSF(**kw, bins=BINS, bound=BOUND, autoregressive=True)
    elif row == "NSF-C":
        flow = pf.NSF(**kw, bins=BINS, bound=BOUND, autoregressive=False)
    elif row == "RealNVP":
        flow = pf.RealNVP(**kw)
    else:
        raise Unavailable(row)
    return Model(flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)))


def build_pyro_flows_compiled(row: str, features: int) -> Model:
    """The same flow as :func:`build_pyro_flows`, its log_prob and sampler compiled (``torch.compile``, inductor)."""
    import pyro_flows as pf

    flow = build_pyro_flows(row, features).module
    compiled = pf.compile_flow(flow, fullgraph=True)
    # train: the compiled objective that pf.fit(flow, X, objective=compiled.loss) runs (the mean NLL, one graph)
    return Model(flow, compiled.log_prob, lambda n: compiled.sample((n,)), lambda x: compiled.loss(flow, x))


def conditioner_shapes(row: str, features: int) -> tuple[int, int]:
    """(inputs, outputs) of one conditioner network of ``row``: a MADE ``D -> P D`` for the autoregressive rows,
    an MLP of the conditioning half for the couplings (``P`` parameters per transformed variable)."""
    P = 2 if row in ("MAF", "RealNVP") else 3 * BINS - 1
    if row in ("MAF", "NSF-AR"):
        return features, P * features
    if row in ("NSF-C", "RealNVP"):
        return features // 2, P * (features - features // 2)
    raise Unavailable(row)


def build_floor(row: str, features: int) -> Model:
    """The floor of a row: its :data:`TRANSFORMS` conditioner networks, bare (plain ``nn.Linear`` layers of the
    same shapes, no mask, no flow around them, ReLU in place: no allocation that the networks do not need).

    ``log_prob(x)`` is the sum of every network's outputs on ``x`` (the conditioning half for couplings), so the
    ``train`` op is the networks' forward, ``sum().backward()`` and the Adam step; ``log_prob`` and ``sample``
    (on base noise) are one forward pass of each network. No flow of these networks can be faster; the gap of a
    library to this row is what its flow adds around the matmuls.
    """
    inputs, outputs = conditioner_shapes(row, features)
    nets = nn.ModuleList(_PlainMLP(inputs, outputs, inplace=True) for _ in range(TRANSFORMS))

    def log_prob(x: Tensor) -> Tensor:
        x = x[..., :inputs]
        total = nets[0](x).sum(-1)
        for net in nets[1:]:
            total = total + net(x).sum(-1)
        return total

    def sample(n: int) -> Tensor:
        noise = torch.randn(n, features, device=nets[0].net[0].weight.device)
        return log_prob(noise)

    return Model(nets, log_prob, sample)


def build_zuko(row: str, features: int) -> Model:
    import zuko
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, GeneralCouplingTransform, UnconditionalDistribution
    from zuko.transforms import MonotonicRQSTransform

    kw = dict(hidden_features=list(HIDDEN), activation=nn.ReLU)
    if row == "MAF":  # MaskedAutoregressiveTransform maps data -> base in one pass
        flow = zuko.flows.MAF(features, transforms=TRANSFORMS, **kw)
    elif row == "NSF-AR":  # zuko's NSF is autoregressive; MonotonicRQSTransform's bound is 5
        flow = zuko.flows.NSF(features, transforms=TRANSFORMS, bins=BINS, **kw)
    elif row in ("NSF-C", "RealNVP"):
        # true couplings with the same half/half alternating masks (zuko's mask marks the conditioning half)
        spline = dict(univariate=MonotonicRQSTransform, shapes=[(BINS,), (BINS,), (BINS - 1,)])
        extra = spline if row == "NSF-C" else {}
        layers = [
            GeneralCouplingTransform(features, mask=~_coupling_mask(features, i), **extra, **kw)
            for i in range(TRANSFORMS)
        ]
        base = UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)
        flow = Flow(layers, base)
    else:
        raise Unavailable(row)
    return Model(flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)))


class _PlainMLP(nn.Module):
    """Conditioner for nflows couplings: Linear-ReLU-Linear-ReLU-Linear (nflows calls it with a context)."""

    def __init__(self, in_features: int, out_features: int, inplace: bool = False) -> None:
        super().__init__()
        widths = (in_features, *HIDDEN)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(inplace)]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], out_features))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        return self.net(x)


def build_nflows(row: str, features: int) -> Model:
    import torch.nn.functional as F
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import (
        AffineCouplingTransform,
        CompositeTransform,
        MaskedAffineAutoregressiveTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        PiecewiseRationalQuadraticCouplingTransform,
        ReversePermutation,
    )

    # nflows' MADE with num_blocks=1 and no residual blocks is D -> 128 -> 128 -> out, i.e. hidden (128, 128)
    made = dict(hidden_features=HIDDEN[0], num_blocks=1, use_residual_blocks=False, activation=F.relu)
    layers = []
    for i in range(TRANSFORMS):
        if row == "MAF":  # the forward (data -> noise) direction is the one-pass one
            if i > 0:
                layers.append(ReversePermutation(features))  # alternate the variable order
            layers.append(MaskedAffineAutoregressiveTransform(features, **made))
        elif row == "NSF-AR":
            if i > 0:
                layers.append(ReversePermutation(features))
            layers.append(
                MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    features, num_bins=BINS, tails="linear", tail_bound=BOUND, **made
                )
            )
        elif row in ("NSF-C", "RealNVP"):
            mask = _coupling_mask(features, i).float()  # nflows: > 0 is transformed
            if row == "NSF-C":
                layers.append(
                    PiecewiseRationalQuadraticCouplingTransform(
                        mask, _PlainMLP, num_bins=BINS, tails="linear", tail_bound=BOUND
                    )
                )
            else:
                layers.append(AffineCouplingTransform(mask, _PlainMLP))
        else:
            raise Unavailable(row)
    flow = Flow(CompositeTransform(layers), StandardNormal([features]))
    return Model(flow, flow.log_prob, flow.sample)


class _PyroFlow(nn.ModuleList):
    """Pyro's layers and the base's buffers, so that ``.to(device)`` moves the whole flow."""

    def __init__(self, modules: Sequence[nn.Module], features: int) -> None:
        super().__init__(modules)
        self.register_buffer("loc", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))


def build_pyro(row: str, features: int) -> Model:
    import pyro.distributions as dist
    from pyro.distributions import transforms as PT
    from pyro.nn import AutoRegressiveNN, DenseNN

    D, half = features, features // 2
    modules: list[nn.Module] = []
    layers = []  # base -> data, as TransformedDistribution wants them
    for i in range(TRANSFORMS):
        if row in ("MAF", "NSF-AR"):
            # Pyro's autoregressive transforms are IAF-style (one pass base -> data); their .inv
            # is the MAF layer: TransformedDistribution.log_prob calls t.inv.inv = t (one pass)
            # and reads the log-det from t's cache, sampling runs t's sequential inverse.
            param_dims = [1, 1] if row == "MAF" else [BINS, BINS, BINS - 1]
            arn = AutoRegressiveNN(
                D, list(HIDDEN), param_dims=param_dims, permutation=_order(D, i), nonlinearity=nn.ReLU()
            )
            if row == "MAF":
                t = PT.AffineAutoregressive(arn)
            else:
                t = PT.SplineAutoregressive(D, arn, count_bins=BINS, bound=BOUND, order="quadratic")
            modules.append(t)
            layers.append(t.inv)
        elif row in ("NSF-C", "RealNVP"):
            if i > 0:  # alternate the halves, as the other libraries' masks do
                layers.append(PT.Permute(torch.arange(D).flip(0)))
            if row == "NSF-C":
                n = D - half
                hyper = DenseNN(
                    half, list(HIDDEN), param_dims=[n * BINS, n * BINS, n * (BINS - 1)], nonlinearity=nn.ReLU()
                )
                # identity=True: the conditioning half passes unchanged (no extra elementwise spline)
                t = PT.SplineCoupling(D, half, hyper, count_bins=BINS, bound=BOUND, order="quadratic", identity=True)
            else:
                hyper = DenseNN(half, list(HIDDEN), param_dims=[D - half, D - half], nonlinearity=nn.ReLU())
                t = PT.AffineCoupling(half, hyper)
            modules.append(t)
            layers.append(t)
        else:
            raise Unavailable(row)
    module = _PyroFlow(modules, D)

    def make():
        return dist.TransformedDistribution(dist.Normal(module.loc, module.scale).to_event(1), layers)

    return Model(module, lambda x: make().log_prob(x), lambda n: make().sample((n,)))


BUILDERS: dict[str, Callable[[str, int], Model]] = {
    "pyro_flows": build_pyro_flows,
    COMPILED: build_pyro_flows_compiled,
    FLOOR: build_floor,
    "zuko": build_zuko,
    "nflows": build_nflows,
    "pyro": build_pyro,
}


def available(lib: str) -> Optional[str]:
    """``None`` if ``lib`` imports, else the reason it does not."""
    for name in _REQUIRES[lib]:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure makes the peer n/a
            return f"{type(e).__name__}: {e}"
    return None


# -- checks -----------------------------------------------------------------------


def _is_linear(m: nn.Module) -> bool:
    """``nn.Linear`` and look-alikes (zuko's ``Linear`` is a plain module with a 2-D weight)."""
    weight = getattr(m, "weight", None)
    return isinstance(m, nn.Linear) or (
        isinstance(weight, nn.Parameter) and weight.dim() == 2 and next(m.children(), None) is None
    )


def linear_calls(model: Model, features: int, batch: int = 16) -> int:
    """Number of linear-layer forward calls during one ``log_prob`` (one pass per layer: 15 here)."""
    count = 0

    def hook(*_):
        nonlocal count
        count += 1

    handles = [m.register_forward_hook(hook) for m in model.module.modules() if _is_linear(m)]
    try:
        with torch.no_grad():
            model.log_prob(torch.randn(batch, features))
    finally:
        for h in handles:
            h.remove()
    return count


# -- timing -----------------------------------------------------------------------


@dataclass
class Config:
    train_batch: int = 512
    eval_batch: int = 4096
    repeats: int = 9
    warmup: int = 3
    min_time: float = 0.25  # seconds per measurement (iterations are calibrated to reach it)
    pool: int = 4  # distinct input tensors cycled through (defeats one-slot transform caches)
    slow: float = 2.0  # seconds: a library whose single call is slower than this ...
    slow_repeats: int = 3  # ... is timed only this many times
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Config:
        return cls(train_batch=64, eval_batch=256, repeats=1, warmup=1, min_time=0.0, pool=2)


@dataclass
class Result:
    row: str
    features: int
    metric: str
    lib: str
    runs: list = field(default_factory=list)  # samples/s of each repeat
    error: Optional[str] = None
    params: Optional[int] = None
    batch: Optional[int] = None  # samples per call
    first_call: Optional[float] = None  # seconds of the first call (with the compilation for COMPILED)

    @property
    def compile_seconds(self) -> Optional[float]:
        """The first call's time less a steady call's: the compilation time of a compiled library."""
        if self.first_call is None or self.batch is None or not self.runs:
            return None
        return max(0.0, self.first_call - self.batch / statistics.median(self.runs))

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.runs) if self.runs else None

    @property
    def best(self) -> Optional[float]:
        """The fastest repeat: on a loaded machine, the one least disturbed."""
        return max(self.runs) if self.runs else None


def _make_op(model: Model, metric: str, features: int, cfg: Config, seed: int, annotate: bool = False):
    """A zero-argument callable running one unit of ``metric`` and its batch size.

    ``annotate`` labels the phases of a training step for the profiler.
    """
    gen = torch.Generator().manual_seed(seed)
    if metric == "train":
        data = [torch.randn(cfg.train_batch, features, generator=gen).to(cfg.device) for _ in range(cfg.pool)]
        opt = torch.optim.Adam(model.module.parameters(), lr=1e-3)
        loss_of = model.loss or (lambda x: -model.log_prob(x).mean())
        state = {"i": 0}
        phase = torch.profiler.record_function if annotate else (lambda _: contextlib.nullcontext())

        def op():
            x = data[state["i"] % len(data)]
            state["i"] += 1
            with phase("## forward: -log_prob(x).mean()"):
                loss = loss_of(x)
            with phase("## backward"):
                loss.backward()
            with phase("## Adam step"):
                opt.step()
            opt.zero_grad(set_to_none=True)  # between steps only the parameters and Adam's state are kept

        return op, cfg.train_batch
    if metric == "log_prob":
        data = [torch.randn(cfg.eval_batch, features, generator=gen).to(cfg.device) for _ in range(cfg.pool)]
        state = {"i": 0}

        def op():
            x = data[state["i"] % len(data)]
            state["i"] += 1
            with torch.no_grad():
                model.log_prob(x)

        return op, cfg.eval_batch
    if metric == "sample":

        def op():
            with torch.no_grad():
                model.sample(cfg.eval_batch)

        return op, cfg.eval_batch
    raise ValueError(f"unknown metric {metric!r}")


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(op: Callable[[], None], iterations: int, device: str = "cpu") -> float:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            op()
        _synchronize(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def bench_case(
    row: str, features: int, metric: str, libs: Sequence[str], cfg: Config, log: Callable[[str], None] = print
) -> dict[str, Result]:
    """Time ``metric`` of ``row`` at ``features`` for every lib, interleaving the libraries."""
    results = {lib: Result(row, features, metric, lib) for lib in libs}
    ops = {}
    for lib in libs:
        try:
            torch.manual_seed(0)
            model = BUILDERS[lib](row, features)
            model.module.to(cfg.device)
            results[lib].params = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
            op, batch = _make_op(model, metric, features, cfg, seed=1)
            results[lib].batch = batch
            for w in range(max(1, cfg.warmup)):  # the last warm-up call calibrates the iteration count
                one = _timed(op, 1, cfg.device)
                if w == 0:
                    results[lib].first_call = one
                # a slow call (sequential sampling): its warm-up costs are noise; a compiled library's first call
                # is its compilation, not a slow call (it would leave it timed 3 times, one call each)
                if one > 3 * cfg.min_time and not (w == 0 and lib == COMPILED):
                    break
            iterations = max(1, math.ceil(cfg.min_time / max(one, 1e-9)))
            # a call slower than cfg.slow (a peer's sequential sampling at D = 32) gets fewer repeats
            repeats = cfg.repeats if one < cfg.slow else min(cfg.repeats, cfg.slow_repeats)
            ops[lib] = (op, batch, iterations, repeats)
        except Unavailable:
            results[lib].error = "no equivalent"
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
            if lib in OURS:
                raise
            results[lib].error = f"{type(e).__name__}: {e}"
            log(f"  [{lib}] {row} D={features} {metric}: {results[lib].error}")
    # harness.interleave: every round runs each library once (order rotated); the slow ones only their rounds
    rounds = min((repeats for *_, repeats in ops.values()), default=0)
    for libs_now, count in ((list(ops), rounds), ([lib for lib in ops if ops[lib][3] > rounds], cfg.repeats - rounds)):
        if not libs_now or count <= 0:
            continue
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            timings = interleave(
                {lib: _calls(ops[lib][0], ops[lib][2]) for lib in libs_now},
                repeats=count,
                warmup=0,
                sync=lambda: _synchronize(cfg.device),
            )
        finally:
            if enabled:
                gc.enable()
        for lib in libs_now:
            _, batch, iterations, _ = ops[lib]
            results[lib].runs += [batch * iterations / seconds for seconds in timings[lib].runs]
    return results


def _calls(op: Callable[[], None], iterations: int) -> Callable[[], None]:
    """``op`` ``iterations`` times in a row: one timed case of :func:`harness.interleave`."""

    def run() -> None:
        for _ in range(iterations):
            op()

    return run


def run(
    rows: Sequence[str] = ROWS,
    dims: Sequence[int] = (8, 32),
    metrics: Sequence[str] = METRICS,
    libs: Sequence[str] = LIBS,
    threads: int = 2,
    repeats: Optional[int] = None,
    quick: bool = False,
    check: bool = True,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    compiled: bool = False,
    floor: bool = False,
    compile_metrics: Optional[Sequence[str]] = None,
) -> list[Result]:
    """Run the benchmark; returns one :class:`Result` per (row, D, metric, lib in ``LIBS``), and per
    (row, D, metric) one of :data:`COMPILED` with ``compiled=True`` (pyro_flows compiled, timed with the others)
    and one of :data:`FLOOR` with ``floor=True`` (the bare conditioners, :func:`build_floor`, timed with the others).
    ``compile_metrics`` (default: all of ``metrics``) restricts the compiled column to those metrics (compiling an
    autoregressive sampler unrolls it over D variables: minutes at D = 32).

    Libraries not in ``libs`` or not importable get a result without runs (n/a).
    """
    cfg = Config.quick() if quick else Config()
    cfg.device = device
    if repeats is not None:
        cfg.repeats = repeats
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    libs = [*libs, COMPILED] if compiled and COMPILED not in libs else list(libs)
    libs = [*libs, FLOOR] if floor and FLOOR not in libs else libs
    columns = [*LIBS, *(lib for lib in (COMPILED, FLOOR) if lib in libs)]
    missing = {lib: available(lib) for lib in libs}
    for lib, why in missing.items():
        if why is not None:
            if lib in OURS:
                raise ImportError(f"pyro_flows does not import: {why}")
            log(f"{lib}: not available ({why}); reported as n/a")
    active = [lib for lib in libs if missing[lib] is None]
    out: list[Result] = []
    with warnings.catch_warnings():
        # nflows warns on every spline call whose (random) initial parameters are large
        warnings.filterwarnings("ignore", message="Inputs to the softmax are not scaled down")
        try:
            for features in dims:
                for row in rows:
                    if check:  # (the compiled flow is the eager one's code: checked there, not compiled here)
                        _check_one_pass(row, features, [lib for lib in active if lib in LIBS], log)
                    for metric in metrics:
                        t0 = time.perf_counter()
                        skip = compile_metrics is not None and metric not in compile_metrics
                        now = [lib for lib in active if not (skip and lib == COMPILED)]
                        results = bench_case(row, features, metric, now, cfg, log)
                        for lib in columns:
                            r = results.get(lib) or Result(row, features, metric, lib, error="not run")
                            out.append(r)
                        summary = ", ".join(f"{lib} {_fmt(results[lib].median)}" for lib in now)
                        gap = floor_gap(list(results.values()))
                        if gap is not None:
                            summary += f"; pyro_flows time / floor {gap:.2f}"
                        summary += _compiled_summary(list(results.values()))
                        took = time.perf_counter() - t0
                        log(f"{row:8s} D={features:<3d} {metric:8s} {summary}  ({took:.1f}s, {load_line()})")
        finally:
            torch.set_num_threads(previous_threads)
    return out


def _check_one_pass(row: str, features: int, libs: Sequence[str], log: Callable[[str], None]) -> None:
    """Every library's log_prob must call each conditioner layer once (one pass per flow layer)."""
    expected = TRANSFORMS * (len(HIDDEN) + 1)
    for lib in libs:
        try:
            torch.manual_seed(0)
            model = BUILDERS[lib](row, features)
        except Exception:  # noqa: BLE001 - reported by bench_case
            continue
        calls = linear_calls(model, features)
        if calls != expected:
            log(f"  WARNING [{lib}] {row} D={features}: log_prob made {calls} Linear calls, expected {expected}")


# -- memory -----------------------------------------------------------------------

MEMORY_METRICS = ("train", "log_prob")
MIB = 2.0**20
# glibc mmaps every allocation from 64 KiB up (and unmaps it when freed), so a freed tensor leaves the resident set
# and the peak of the resident set is the peak of the live tensors; the default threshold adapts up to 32 MiB
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def can_reset_peak_rss() -> bool:
    """Whether Linux's peak-RSS reset (``/proc/self/clear_refs`` <- 5) works here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_memory(op: Callable[[], object], device: str = "cpu") -> int:
    """Bytes by which one call of ``op`` raises the memory in use above what was in use before it, at its peak.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the peak resident set
    (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before the call (``VmRSS``); run it
    in a process with :data:`MALLOC_ENV` so that freed tensors are returned to the system.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        op()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    op()
    return (_status_kib("VmHWM") - before) * 1024


def memory_case(row: str, features: int, metric: str, lib: str, device: str = "cpu") -> int:
    """Peak extra bytes of one ``train`` step (batch 512, after a warm-up step: Adam's state exists) or of one
    ``log_prob`` of a 4096 batch (after a warm-up call), in this process: the median of three calls."""
    torch.manual_seed(0)
    model = BUILDERS[lib](row, features)
    model.module.to(device)
    # two inputs in turn: one input twice would be served from the freed graph by Pyro's one-slot transform cache
    op, _ = _make_op(model, metric, features, Config(pool=2, device=device), seed=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Inputs to the softmax are not scaled down")
        op()  # warm-up: Adam's state, lazily built buffers, the allocator's arenas
        return int(statistics.median(peak_memory(op, device) for _ in range(3)))  # a few KiB of heap noise


def calibration_case(mib: float, device: str = "cpu") -> int:
    """Peak extra bytes of allocating (and writing) a tensor of ``mib`` MiB: checks the method, reads ~``mib``.

    As every case: after a warm-up call (a fresh interpreter's first fill also pages in torch's own code and
    buffers: 7 MiB were seen on CI) and the median of three calls."""

    def op() -> Tensor:
        return torch.ones(int(mib * MIB) // 4, device=device)

    op()
    return int(statistics.median(peak_memory(op, device) for _ in range(3)))


def _child(args: Sequence[str], device: str, threads: int) -> int:
    """Run ``--memory-case args`` in a fresh interpreter with :data:`MALLOC_ENV`; the bytes it measured."""
    import subprocess

    command = [sys.executable, os.path.abspath(__file__), "--memory-case", *args, "--device", device]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return int(done.stdout.strip().splitlines()[-1])


def calibrate(mib: float = 100.0, device: str = "cpu", threads: int = 1) -> float:
    """MiB that the method reads for a ``mib`` MiB tensor, in a fresh process as every case."""
    return _child(["calibrate", str(mib)], device, threads) / MIB


def run_memory(
    rows: Sequence[str] = ROWS,
    dims: Sequence[int] = (8, 32),
    metrics: Sequence[str] = MEMORY_METRICS,
    libs: Sequence[str] = LIBS,
    device: str = "cpu",
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Peak extra memory (MiB, in ``Result.runs``) per (row, D, metric, lib), each case in a fresh process."""
    active = [lib for lib in libs if available(lib) is None]
    out = []
    for features in dims:
        for row in rows:
            for metric in metrics:
                for lib in LIBS:
                    r = Result(row, features, metric, lib)
                    if lib not in active:
                        r.error = "not run"
                    else:
                        try:
                            r.runs.append(_child([row, str(features), metric, lib], device, threads) / MIB)
                        except RuntimeError as e:
                            if lib == "pyro_flows":
                                raise
                            r.error = str(e)
                    out.append(r)
                group = out[-len(LIBS) :]
                cells = ", ".join(f"{r.lib} {_fmt_mib(r.median)}" for r in group if r.lib in active)
                log(f"{row:8s} D={features:<3d} {metric:8s} {cells} MiB")
    return out


def _fmt_mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def memory_ratio(results: Sequence[Result]) -> tuple[Optional[float], Optional[str]]:
    """pyro_flows / the best (least) peer's peak memory, and that peer's name."""
    by_lib = {r.lib: r.median for r in results}
    ours = by_lib.get("pyro_flows")
    peers = {lib: v for lib, v in by_lib.items() if lib in PEERS and v is not None}
    if ours is None or not peers:
        return None, None
    best = min(peers, key=peers.__getitem__)
    return ours / max(peers[best], 1e-9), best


def memory_table(results: Sequence[Result], limit: float = 1.2) -> str:
    """A Markdown table of peak extra MiB per library, pyro_flows / best peer (``!`` above ``limit``)."""
    header = ["row", "D", "metric", *LIBS, "pyro_flows / best peer"]
    rows = []
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.row, r.features, r.metric), []).append(r)
    for (row, features, metric), group in groups.items():
        by_lib = {r.lib: r.median for r in group}
        rate, best = memory_ratio(group)
        rate_cell = "n/a" if rate is None else f"{rate:.2f} ({best})" + (" !" if rate > limit else "")
        rows.append([row, features, metric, *(_fmt_mib(by_lib.get(lib)) for lib in LIBS), rate_cell])
    return markdown_table(header, rows, align="lll" + "r" * (len(LIBS) + 1))


# -- reporting --------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def ratio(
    results: Sequence[Result], stat: str = "median", lib: str = "pyro_flows"
) -> tuple[Optional[float], Optional[str]]:
    """``lib`` (pyro_flows or :data:`COMPILED`) / best peer (by ``stat``, "median" or "best", of samples/s) and the
    best peer's name."""
    by_lib = {r.lib: getattr(r, stat) for r in results}
    return best_ratio(by_lib.get(lib), {name: v for name, v in by_lib.items() if name in PEERS})


def _compiled_summary(results: Sequence[Result]) -> str:
    """The progress line's compiled figures: over eager, over the best peer, time over the floor, compile seconds."""
    speedup = compile_speedup(results)
    if speedup is None:
        return ""
    compiled = next(r for r in results if r.lib == COMPILED)
    line = f"; compiled/eager {speedup:.2f}x"
    rate, best = ratio(results, lib=COMPILED)
    line += "" if rate is None else f", compiled/best peer {rate:.2f}x ({best})"
    gap = floor_gap(results, lib=COMPILED)
    line += "" if gap is None else f", compiled time/floor {gap:.2f}"
    return line + f" (compiled in {compiled.compile_seconds or 0.0:.0f}s)"


def compile_speedup(results: Sequence[Result], stat: str = "median") -> Optional[float]:
    """Samples/s of pyro_flows compiled over eager (None unless both ran)."""
    by_lib = {r.lib: getattr(r, stat) for r in results}
    eager, compiled = by_lib.get("pyro_flows"), by_lib.get(COMPILED)
    return None if eager is None or compiled is None else compiled / eager


def floor_gap(results: Sequence[Result], stat: str = "median", lib: str = "pyro_flows") -> Optional[float]:
    """``lib``'s (pyro_flows or :data:`COMPILED`) time per sample over the :data:`FLOOR`'s (1 is the bare
    conditioners' speed)."""
    by_lib = {r.lib: getattr(r, stat) for r in results}
    ours, floor = by_lib.get(lib), by_lib.get(FLOOR)
    return None if not ours or floor is None else floor / ours


def table(results: Sequence[Result], stat: str = "median") -> str:
    """A Markdown table: row, D, metric, samples/s (``stat`` of the repeats) per library, pyro_flows / best peer;
    with :data:`COMPILED` results, also its samples/s, the speed-up over eager, over the best peer and the compilation
    time; with :data:`FLOOR` results, the floor's samples/s and pyro_flows' (and the compiled) time over the floor's."""
    compiled = any(r.lib == COMPILED for r in results)
    floored = any(r.lib == FLOOR for r in results)
    extra = [COMPILED, "compiled / eager", "compiled / best peer", "compile s"] if compiled else []
    extra += [FLOOR, "pyro_flows time / floor"] if floored else []
    extra += ["compiled time / floor"] if compiled and floored else []
    header = ["row", "D", "metric", *LIBS, "pyro_flows / best peer", *extra]
    rows = []
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.row, r.features, r.metric), []).append(r)
    for (row, features, metric), group in groups.items():
        by_lib = {r.lib: r for r in group}
        cells = [_fmt(getattr(by_lib[lib], stat)) if lib in by_lib else "n/a" for lib in LIBS]
        rate, best = ratio(group, stat)
        cells.append("n/a" if rate is None else f"{rate:.2f} ({best})")
        if compiled:
            ours = by_lib.get(COMPILED)
            speedup, seconds = compile_speedup(group, stat), None if ours is None else ours.compile_seconds
            cells.append(_fmt(None if ours is None else getattr(ours, stat)))
            cells.append("n/a" if speedup is None else f"{speedup:.2f}")
            rate, best = ratio(group, stat, COMPILED)
            cells.append("n/a" if rate is None else f"{rate:.2f} ({best})")
            cells.append("n/a" if seconds is None else f"{seconds:.0f}")
        if floored:
            gap = floor_gap(group, stat)
            cells.append(_fmt(getattr(by_lib[FLOOR], stat)) if FLOOR in by_lib else "n/a")
            cells.append("n/a" if gap is None else f"{gap:.2f}")
        if compiled and floored:
            gap = floor_gap(group, stat, COMPILED)
            cells.append("n/a" if gap is None else f"{gap:.2f}")
        rows.append([row, features, metric, *cells])
    return markdown_table(header, rows, align="lll" + "r" * (len(header) - 3))


def params_table(results: Sequence[Result]) -> str:
    """Trainable parameter counts per row and library (same architecture => similar counts)."""
    seen: dict[tuple, dict[str, Optional[int]]] = {}
    for r in results:
        seen.setdefault((r.row, r.features), {})
        if r.params is not None or r.lib not in seen[(r.row, r.features)]:
            seen[(r.row, r.features)][r.lib] = r.params
    rows = [
        [row, features, *(None if counts.get(lib) is None else f"{counts[lib]:,}" for lib in LIBS)]
        for (row, features), counts in seen.items()
    ]
    return markdown_table(["row", "D", *LIBS], rows, align="ll" + "r" * len(LIBS))


# -- profiling --------------------------------------------------------------------


def profile(row: str, features: int, metric: str = "train", threads: int = 2, steps: int = 20, limit: int = 20) -> str:
    """torch.profiler table (top ops by self CPU time) of pyro_flows running ``metric``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_pyro_flows(row, features)
    op, _ = _make_op(model, metric, features, Config(), seed=1, annotate=True)
    for _ in range(5):
        op()
    start = time.perf_counter()
    for _ in range(steps):
        op()
    wall = (time.perf_counter() - start) / steps
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            op()
    events = prof.key_averages()
    lines = [f"pyro_flows {row} D={features} {metric}, {torch.get_num_threads()} threads: {wall * 1e3:.2f} ms per step"]
    lines += [
        f"  {e.key[3:]:32s} {e.cpu_time_total / steps / 1e3:7.2f} ms per step (CPU total)"
        for e in events
        if e.key.startswith("## ")
    ]
    lines.append(f"\ntop ops by self CPU time ({steps} steps):")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=limit))
    lines.append("top (op, input shapes) by self CPU time:")
    by_shape = prof.key_averages(group_by_input_shape=True)
    lines.append(by_shape.table(sort_by="self_cpu_time_total", row_limit=limit // 2, max_shapes_column_width=60))
    return "\n".join(lines)


def _gap_stages(row: str, features: int) -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
    """The staircase of :func:`gap`: ``stage -> (module, loss of a batch)``, from the floor to the benchmark's op."""
    floor = build_floor(row, features)
    flow = build_pyro_flows(row, features).module
    layers = [getattr(t, "layer", t) for t in flow.transforms]  # MAF: Inverse(layer); the data -> base direction
    bound = layers[0].transform_map.log_scale_bound
    autoregressive = row == "MAF"
    nets = [layer.network if autoregressive else layer.conditioner for layer in layers]

    def conditioners(x: Tensor) -> Tensor:  # the flow's own networks on the data, not chained
        total = x.new_zeros(())
        for layer, net in zip(layers, nets, strict=True):
            total = total + net(x if autoregressive else x[..., : features - layer.num_transformed]).sum()
        return total

    def inline(x: Tensor) -> Tensor:  # chained, the affine arithmetic in plain torch ops
        ladj = 0.0
        for layer, net in zip(reversed(layers), reversed(nets), strict=True):
            if autoregressive:
                shift, raw = net(x).unbind(-2)
                s = raw / (1 + raw.abs() / bound)
                x, ladj = x * s.exp() + shift, ladj + s.sum(-1)
            else:
                sizes = layer._block_sizes()
                first, second = x.split(sizes, -1)
                kept, moved = (second, first) if layer.transformed_first else (first, second)
                shift, raw = net(kept).split(layer.num_transformed, -1)
                s = raw / (1 + raw.abs() / bound)
                moved = (moved - shift) * torch.exp(-s)
                x, ladj = torch.cat((moved, kept) if layer.transformed_first else (kept, moved), -1), ladj - s.sum(-1)
        return -(ladj - 0.5 * (x * x).sum(-1)).mean()

    def layer_calls(x: Tensor) -> Tensor:  # pyro_flows' layers, no distribution around them
        ladj = 0.0
        for layer in reversed(layers):
            x, step = layer._forward(x, None) if autoregressive else layer._backward(x, None)
            ladj = ladj + step
        return -(ladj - 0.5 * (x * x).sum(-1)).mean()

    return {
        "floor: bare networks (nn.Linear)": (floor.module, lambda x: -floor.log_prob(x).mean()),
        "the flow's conditioners (masks), not chained": (flow, conditioners),
        "chained, affine maps inline (plain ops)": (flow, inline),
        "pyro_flows layers (_forward/_backward)": (flow, layer_calls),
        "flow().log_prob (the benchmark's op)": (flow, lambda x: -flow().log_prob(x).mean()),
    }


def gap(row: str, features: int, rounds: int = 15, batch: int = 512) -> str:
    """Where a train step's time goes between the floor and pyro_flows (affine rows): each stage adds one layer of
    the flow around the matmuls. CPU time of this process (``time.process_time``: time the scheduler gives to
    other processes does not count; run with 1 thread), interleaved rounds of 10 steps, the least of ``rounds``.
    """
    if row not in ("MAF", "RealNVP"):
        raise ValueError(f"gap: the affine rows MAF and RealNVP only, got {row!r}")
    torch.manual_seed(0)
    data = [torch.randn(batch, features) for _ in range(4)]
    cases = {}
    for name, (module, loss) in _gap_stages(row, features).items():
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)

        def step(loss=loss, opt=opt, state={"i": 0}) -> None:  # noqa: B006 - one counter per stage
            state["i"] += 1
            loss(data[state["i"] % len(data)]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        cases[name] = step
    for step in cases.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            for _ in range(10):
                cases[name]()
            times[name].append((time.process_time() - start) / 10)
    floor = min(times[names[0]])
    rows = [[name, f"{min(t) * 1e3:.2f}", f"{min(t) / floor:.2f}"] for name, t in times.items()]
    head = f"{row} D={features} train step (batch {batch}, Adam), {torch.get_num_threads()} thread(s), {load_line()}"
    return head + "\n\n" + markdown_table(["stage", "CPU ms per step", "x floor"], rows, align="lrr")


def profile_memory(row: str, features: int, metric: str = "train", lib: str = "pyro_flows", limit: int = 12) -> str:
    """Where one call of ``metric`` allocates: torch.profiler's ops by self CPU memory (``profile_memory=True``)
    and, for ``train``, the tensors autograd keeps for backward, by the source line that made them."""
    import collections
    import traceback

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = BUILDERS[lib](row, features)
    op, _ = _make_op(model, metric, features, Config(pool=2), seed=1)
    op()
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        op()
    lines = [f"{lib} {row} D={features} {metric}: ops by self CPU memory (one call)"]
    by_shape = prof.key_averages(group_by_input_shape=True)
    lines.append(by_shape.table(sort_by="self_cpu_memory_usage", row_limit=limit, max_shapes_column_width=50))
    if metric != "train":
        return "\n".join(lines)
    x = torch.randn(Config().train_batch, features)
    kept = [*model.module.parameters(), *model.module.buffers(), x]  # alive anyway: not counted
    parameters = {t.untyped_storage().data_ptr() for t in kept}
    saved: dict[int, tuple[int, str]] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in saved:
            frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}torch{os.sep}" not in f.filename]
            where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
            saved[storage.data_ptr()] = (storage.nbytes(), f"{where} {tuple(t.shape)}")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -model.log_prob(x).mean()
    total = collections.Counter()
    for nbytes, where in saved.values():
        total[where] += nbytes
    lines.append(f"kept for backward (besides parameters, buffers and the input): {sum(total.values()) / MIB:.2f} MiB")
    lines += [f"  {nbytes / 2**10:9.0f} KiB  {where}" for where, nbytes in total.most_common(limit)]
    del loss
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[8, 32], help="feature dimensions D")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="flows to benchmark")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS, help="libraries to run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per library (default 9, quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny batches and counts (smoke test)")
    p.add_argument("--no-check", action="store_true", help="skip the one-pass log_prob check")
    p.add_argument("--json", default=None, help="write raw results to this file")
    p.add_argument("--profile", choices=ROWS, default=None, help="only profile pyro_flows on this row (first D)")
    p.add_argument(
        "--gap",
        choices=("MAF", "RealNVP"),
        default=None,
        help="train-step time from the floor up to pyro_flows (first D)",
    )
    p.add_argument("--profile-metric", choices=METRICS, default="train")
    p.add_argument(
        "--profile-memory", choices=ROWS, default=None, help="where the first of --libs allocates on this row (first D)"
    )
    p.add_argument("--no-floor", action="store_true", help=f"skip the {FLOOR} (bare conditioner networks of each row)")
    p.add_argument("--compile", action="store_true", help=f"add pyro_flows compiled (pf.compile_flow) as {COMPILED}")
    p.add_argument(
        "--compile-metrics",
        nargs="+",
        default=None,
        choices=METRICS,
        help="with --compile: the metrics that get the compiled column (default all; MAF sample unrolls D steps)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the models and data (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--memory", action="store_true", help="peak extra memory of a train step and a 4096 log_prob (MiB) instead"
    )
    p.add_argument("--memory-case", nargs="+", default=None, help=argparse.SUPPRESS)  # one case, in a child
    args = p.parse_args(argv)

    if args.memory_case:
        torch.set_num_threads(args.threads)
        if args.memory_case[0] == "calibrate":
            print(calibration_case(float(args.memory_case[1]), args.device))
        else:
            row, features, metric, lib = args.memory_case
            print(memory_case(row, int(features), metric, lib, args.device))
        return 0
    if args.profile_memory:
        torch.set_num_threads(args.threads)
        print(profile_memory(args.profile_memory, args.dims[0], args.profile_metric, args.libs[0]))
        return 0
    if args.gap:
        torch.set_num_threads(args.threads)
        print(gap(args.gap, args.dims[0]))
        return 0
    if args.profile:
        print(profile(args.profile, args.dims[0], args.profile_metric, args.threads))
        return 0

    torch.set_num_threads(args.threads)
    if args.compile:  # inductor compiles in as many worker processes as cores by default: as many as the timings'
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(args.threads))
    print(machine_line(args.device))
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy > 1.0:
        print(f"WARNING: the machine is busy (1-min load {busy:.1f}); with {args.threads} threads the timings suffer")
    for lib, dist_name in (("pyro_flows", "pyro-flows"), ("zuko", "zuko"), ("nflows", "nflows"), ("pyro", "pyro-ppl")):
        print(f"{lib}: {version(dist_name) if available(lib) is None else 'not installed'}")
    if args.device != "cpu":
        print(f"device: {args.device} ({torch.cuda.get_device_name(args.device)})")
    if args.memory:
        return _main_memory(args)
    results = run(
        rows=args.rows,
        dims=args.dims,
        metrics=args.metrics,
        libs=args.libs,
        threads=args.threads,
        repeats=args.repeats,
        quick=args.quick,
        check=not args.no_check,
        device=args.device,
        compiled=args.compile,
        floor=not args.no_floor,
        compile_metrics=args.compile_metrics,
    )
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S')}, {load_line()}")
    print("\nsamples/s (median of repeats; higher is better)\n")
    print(table(results))
    print("\nsamples/s (best of repeats: the least disturbed run)\n")
    print(table(results, "best"))
    print("\ntrainable parameters\n")
    print(params_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {
                        "row": r.row,
                        "D": r.features,
                        "metric": r.metric,
                        "lib": r.lib,
                        "median": r.median,
                        "runs": r.runs,
                        "params": r.params,
                        "compile_seconds": r.compile_seconds if r.lib == COMPILED else None,
                        "error": r.error,
                    }
                    for r in results
                ],
                f,
                indent=1,
            )
    return 0


def _main_memory(args: argparse.Namespace) -> int:
    metrics = [m for m in args.metrics if m in MEMORY_METRICS]
    if torch.device(args.device).type == "cpu" and not can_reset_peak_rss():
        print("memory mode on CPU needs Linux's /proc/self/clear_refs (peak-RSS reset)")
        return 2
    check = calibrate(100.0, args.device, args.threads)
    print(f"method check: a 100 MiB tensor reads {check:.1f} MiB")
    results = run_memory(args.rows, args.dims, metrics, args.libs, args.device, args.threads)
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print("\npeak extra memory, MiB (train: one Adam step on a batch of 512 after a warm-up step; log_prob: a batch")
    print("of 4096 under no_grad; lower is better; ! marks pyro_flows above 1.2x the best peer)\n")
    print(memory_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [{"row": r.row, "D": r.features, "metric": r.metric, "lib": r.lib, "MiB": r.median} for r in results], f
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
