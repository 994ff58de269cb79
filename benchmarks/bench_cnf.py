"""Speed benchmark of continuous normalizing flows: pyro_flows' CNF against zuko's, and flow matching against MLE.

Part 1, pf.CNF(trace="exact") vs ``zuko.flows.CNF`` (exact trace), at D = 2 and 8:

* the vector field is the same function in both: zuko's field (an MLP on
  ``[cos(k pi t), sin(k pi t), x]``, k = 1..3, hidden widths (64, 64), SiLU)
  is built once and pyro_flows' layer is given a field that calls zuko's
  module with the *same weights* (``vector_field=`` of pf.CNF), with the time
  span reversed (t0 = 1, t1 = 0) so that both integrate the same ODE in the
  same direction when evaluating a density. Every linear layer is randomised
  (normal, std 1/sqrt(fan-in); seed 0) so the flow is far from the identity.
  pyro_flows' default field (concat-squash layers) is *not* used here: zuko
  cannot express it.
* the exact trace: ``pyro_flows`` gets the trace of the field's Jacobian without autograd
  and without the Jacobian (the field's ``forward_and_trace``, built on
  ``pyro_flows.nn.vector_field.sequential_trace``, as pyro_flows' own ``VectorField``
  does: for two hidden layers, one extra matmul of N rows whatever D);
  ``pyro_flows-autograd`` is the same flow with that method hidden (D batched
  vector-Jacobian products, the trace before issue 17); zuko uses D batched
  vector-Jacobian products.
* solver: dopri5 in all. zuko's own (adaptive checkpoint adjoint; atol = rtol =
  1e-5; error ratio: the largest over the elements of the state, the log-det scaled
  by 1e-2) vs torchdiffeq's in pyro_flows (pyro_flows' default step-size safety factor 0.8,
  ``pyro_flows.transforms.continuous.SAFETY``; ``--norm max``, the default, pyro_flows' own:
  the largest error ratio over the elements of z and the log-det; ``--norm rms``:
  torchdiffeq's, the RMS over the batch of z and of the log-det, the larger of the two).
* equal log-likelihood: every library's log-density of a fixed batch of 1024 points is
  compared with a reference (:func:`reference_log_prob`: the same field in float64, the
  autograd trace, torchdiffeq's dopri8 at atol = rtol = 1e-10), and pyro_flows is timed
  at the largest tolerance of 1e-5, 1e-5/sqrt(2), 1e-5/2, ... at which its largest error is
  at most zuko's (:func:`calibrate`; ``--tol`` fixes it instead). The table prints that
  tolerance, each library's largest error and its number of field evaluations (NFE).
* metrics: exact ``log_prob`` of a batch (default 1024) under ``torch.no_grad()``,
  and one Adam step on ``-log_prob(x).mean()`` (batch 256), in samples/s.

Part 2, two moons: pf.CNF trained by MLE for ``--mle-steps`` steps; its final
held-out NLL is the target; then the same CNF trained by pf.FlowMatching until
its held-out NLL (checked every ``--fm-eval`` steps, evaluation time not
counted) reaches it, at most ``--fm-steps`` steps. Reported: training wall time
of each and their ratio.

Timing: ``harness.interleave`` (each round runs every library once, rotating the
order, after a warm-up round), ``--repeats`` rounds with torch threads fixed; the
median is reported. A missing peer is ``n/a``.

Usage::

    python benchmarks/bench_cnf.py --threads 1
    python benchmarks/bench_cnf.py --quick --libs pyro_flows
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import interleave, machine_line, markdown_table, ratio, set_threads, version  # noqa: E402

LIBS = ("pyro_flows", "pyro_flows-autograd", "zuko")
METRICS = ("log_prob", "train")
NORMS = ("rms", "max")
HIDDEN = (64, 64)
TOL = 1e-5
REFERENCE_TOL = 1e-10


def available(lib: str) -> bool:
    return importlib.util.find_spec(lib.split("-")[0]) is not None


class ZukoStyleField(nn.Module):
    """zuko's CNF vector field (MLP on a sin/cos time embedding and x), written out: no zuko needed."""

    def __init__(self, features: int, hidden: Sequence[int] = HIDDEN, freqs: int = 3) -> None:
        super().__init__()
        widths = [features + 2 * freqs, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(widths[-1], features))
        self.ode = nn.Sequential(*layers)
        self.register_buffer("freqs", torch.arange(1, freqs + 1) * torch.pi)

    def f(self, t, x, c=None):  # zuko's signature
        t = self.freqs * torch.as_tensor(t, dtype=x.dtype)[..., None]
        t = torch.cat((t.cos(), t.sin()), dim=-1).expand(*x.shape[:-1], -1)
        return self.ode(torch.cat((t, x), dim=-1))


class SharedField(nn.Module):
    """pyro_flows' ``f(z, t, context)`` calling a zuko-style ``f(t, x)`` module (weights shared).

    ``forward_and_trace`` evaluates the same MLP (``module.ode`` on ``[cos(k pi t), sin(k pi t), z]``) with the exact
    trace of its Jacobian (``pyro_flows.nn.vector_field.sequential_trace``, no autograd), which pf.CNF's exact trace
    then uses; the time embedding, the same for every row of a solve, enters the first layer's bias
    (``constant=``). ``autograd=True`` hides it (the autograd trace).
    """

    def __init__(self, module: nn.Module, autograd: bool = False) -> None:
        super().__init__()
        self.module = module
        if autograd:
            self.forward_and_trace = None

    def forward(self, z, t, context=None):
        return self.module.f(t, z)

    def forward_and_trace(self, z, t, context=None):
        from pyro_flows.nn.vector_field import sequential_trace

        t = torch.as_tensor(t, dtype=z.dtype)
        angles = self.module.freqs * t[..., None]
        if t.dim() == 0:  # one time for the batch (every solve): the embedding enters the first layer's bias
            embedding = torch.cat((angles.cos(), angles.sin()))
            return sequential_trace(self.module.ode, z, z.shape[-1], start=len(embedding), constant=embedding)
        h = torch.cat((angles.cos().expand(len(z), -1), angles.sin().expand(len(z), -1), z), dim=-1)
        width, d = h.shape[-1], z.shape[-1]
        return sequential_trace(self.module.ode, h, d, start=width - d)


def rms_norm(state: torch.Tensor, features: int) -> torch.Tensor:
    """torchdiffeq's criterion for pf.CNF's solver (``--norm rms``): the larger of the RMS over the batch of z's error
    ratios and of the log-det's (the solver's flat state ``[z, log-det, kinetic]``)."""
    state = state.detach()
    return torch.maximum(state[:, :features].square().mean().sqrt(), state[:, features].square().mean().sqrt())


def pf_flow(source: nn.Module, features: int, tol: float, norm: str, autograd: bool = False) -> nn.Module:
    """pf.CNF on zuko's field (``source``), integrating from t = 1 to 0 as zuko's density does."""
    import pyro_flows as pf

    options = {"norm": functools.partial(rms_norm, features=features)} if norm == "rms" else {}  # max: the default
    f = SharedField(source, autograd=autograd)
    return pf.CNF(features, trace="exact", vector_field=f, t0=1.0, t1=0.0, atol=tol, rtol=tol, options=options)


def build(
    features: int, libs: Sequence[str], seed: int = 0, norm: str = "max", tol: float = TOL
) -> dict[str, Optional[nn.Module]]:
    """The flows, sharing one vector field's weights (zuko's if available); pyro_flows' at tolerance ``tol``."""
    torch.manual_seed(seed)
    models: dict[str, Optional[nn.Module]] = {lib: None for lib in LIBS}
    if "zuko" in libs and available("zuko"):
        import zuko

        z = zuko.flows.CNF(features, hidden_features=HIDDEN, activation=nn.SiLU, atol=TOL, rtol=TOL, exact=True)
        models["zuko"] = z
        source = z.transform
    else:
        source = ZukoStyleField(features)
    for lib in ("pyro_flows", "pyro_flows-autograd"):
        if lib in libs:
            models[lib] = pf_flow(source, features, tol, norm, autograd=lib.endswith("autograd"))
    with torch.no_grad():  # a non-trivial flow: every linear layer (zuko's or torch's) randomised
        for m in source.modules():
            if hasattr(m, "out_features") and getattr(m, "weight", None) is not None:
                m.weight.normal_(0, 1.0 / m.weight.shape[-1] ** 0.5)
    return models


def _log_prob(model: nn.Module, x):
    return model().log_prob(x)


@dataclass
class Result:
    """Samples/s of one library on one (D, metric) row, one entry per timed round."""

    features: int
    metric: str
    lib: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> Optional[float]:
        return sorted(self.runs)[len(self.runs) // 2] if self.runs else None


@dataclass
class Accuracy:
    """Largest |log p - reference| and NFE of one solve per library (None: not run), and pyro_flows' tolerance."""

    error: dict[str, Optional[float]]
    nfe: dict[str, Optional[int]]
    tol: float = TOL


def _counting(model: nn.Module, lib: str) -> Callable[[], int]:
    """Count the field evaluations of ``model``'s next solves; returns a reader of the count."""
    if lib == "zuko":
        transform, count = model.transform, [0]
        f = transform.f

        def counted(*args, **kwargs):
            count[0] += 1
            return f(*args, **kwargs)

        transform.f = counted
        return lambda: (count[0], setattr(transform, "f", f))[0]
    return lambda: model.transforms[0].nfe


def accuracy_batch(features: int, batch: int = 1024) -> torch.Tensor:
    """The fixed batch on which every library's log-density is compared with the reference."""
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(5))


def reference_log_prob(source: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """log p of ``x`` under the flow of zuko's field ``source``, solved independently of the timed paths: float64,
    the autograd trace, torchdiffeq's dopri8 at atol = rtol = REFERENCE_TOL, the max error norm."""
    flow = pf_flow(copy.deepcopy(source).double(), x.shape[-1], REFERENCE_TOL, "max", autograd=True).double()
    flow.transforms[0].solver = "dopri8"
    with torch.no_grad():
        return _log_prob(flow, x.double())


def errors(models: dict[str, Optional[nn.Module]], x: torch.Tensor, expected: torch.Tensor) -> Accuracy:
    """Each library's largest |log p - expected| on ``x`` and its NFE."""
    error: dict[str, Optional[float]] = {lib: None for lib in LIBS}
    nfe: dict[str, Optional[int]] = {lib: None for lib in LIBS}
    with torch.no_grad():
        for lib, model in models.items():
            if model is not None:
                read = _counting(model, lib)
                error[lib] = (_log_prob(model, x).double() - expected).abs().max().item()
                nfe[lib] = read()
    return Accuracy(error, nfe)


def calibrate(source: nn.Module, x: torch.Tensor, expected: torch.Tensor, target: float, norm: str) -> float:
    """The largest of TOL, TOL/sqrt(2), TOL/2, ... (down to TOL/64) at which pyro_flows' largest log p error on ``x``
    is at most ``target`` (zuko's): the tolerance at which pyro_flows is timed, for equal log-likelihoods."""
    for k in range(13):
        tol = TOL * 2 ** (-k / 2)
        flow = pf_flow(source, x.shape[-1], tol, norm)
        with torch.no_grad():
            if (_log_prob(flow, x).double() - expected).abs().max().item() <= target:
                break
    return tol


def source_of(models: dict[str, Optional[nn.Module]]) -> nn.Module:
    """The zuko-style field module that all the flows share."""
    if models.get("zuko") is not None:
        return models["zuko"].transform
    ours = models["pyro_flows"] or models["pyro_flows-autograd"]
    return ours.transforms[0].vector_field.module


def accuracy(
    models: dict[str, Optional[nn.Module]], features: int, norm: str = "max", tol: Optional[float] = None
) -> Accuracy:
    """Match pyro_flows' tolerance to zuko's accuracy (``tol=None``; with zuko absent, TOL), rebuild pyro_flows'
    flows at it (in ``models``), and return every library's error against :func:`reference_log_prob` and its NFE."""
    x = accuracy_batch(features)
    source = source_of(models)
    expected = reference_log_prob(source, x)
    if tol is None:
        zuko = errors({"zuko": models.get("zuko")}, x, expected).error["zuko"]
        tol = TOL if zuko is None else calibrate(source, x, expected, zuko, norm)
    for lib in ("pyro_flows", "pyro_flows-autograd"):
        if models.get(lib) is not None:
            models[lib] = pf_flow(source, features, tol, norm, autograd=lib.endswith("autograd"))
    result = errors(models, x, expected)
    result.tol = tol
    return result


def _op(model: nn.Module, metric: str, features: int, batch: int, iterations: int) -> Callable[[], None]:
    if metric == "log_prob":

        def step():
            x = torch.randn(batch, features)
            with torch.no_grad():
                _log_prob(model, x)

    else:
        # separate optimisers over the shared weights are fine: only speed is measured
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            x = torch.randn(batch, features)
            opt.zero_grad()
            (-_log_prob(model, x).mean()).backward()
            opt.step()

    def op():
        for _ in range(iterations):
            step()

    return op


def bench_cnf(dims, libs, repeats, batch_lp, batch_train, iterations, log=print, norm="max", tol=None):
    """Samples/s per (D, metric, library) and the accuracy of each library per D (pyro_flows at ``tol``; None:
    the tolerance that matches zuko's accuracy, :func:`calibrate`)."""
    results, accuracies = [], {}
    for d in dims:
        models = build(d, libs, norm=norm)
        accuracies[d] = accuracy(models, d, norm, tol)
        log(
            f"D={d}: pyro_flows at atol = rtol = {accuracies[d].tol:.2g}; max |log p - reference|: "
            + ", ".join(f"{lib} {_fmt_err(e)} ({accuracies[d].nfe[lib]} NFE)" for lib, e in accuracies[d].error.items())
        )
        for metric in METRICS:
            batch = batch_lp if metric == "log_prob" else batch_train
            ops = {lib: _op(m, metric, d, batch, iterations) for lib, m in models.items() if m is not None}
            timings = interleave(ops, repeats=repeats, warmup=1)
            cases = {lib: Result(d, metric, lib) for lib in LIBS}
            for lib, timing in timings.items():
                cases[lib].runs = [batch * iterations / seconds for seconds in timing.runs]
            results += cases.values()
            log(f"D={d} {metric}: " + ", ".join(f"{lib} {_fmt(r.median)}" for lib, r in cases.items()))
    return results, accuracies


def _heldout_nll(flow, x) -> float:
    with torch.no_grad():
        return -flow().log_prob(x).mean().item()


def fm_vs_mle(mle_steps: int, fm_steps: int, fm_eval: int, n_eval: int = 1000, batch: int = 256, log=print):
    """(MLE time, MLE NLL, FM time or None, FM NLL, FM steps) on two moons."""
    import pyro_flows as pf
    from pyro_flows.data import two_moons

    g = torch.Generator().manual_seed(0)
    train, test = two_moons(5000, generator=g), two_moons(n_eval, generator=g)

    def batches():
        return train[torch.randint(len(train), (batch,))]

    torch.manual_seed(1)
    mle = pf.CNF(2, hidden=HIDDEN, trace="exact", atol=TOL, rtol=TOL)
    opt = torch.optim.Adam(mle.parameters(), lr=1e-2)
    t_mle = 0.0
    for _ in range(mle_steps):
        x = batches()
        start = time.perf_counter()
        opt.zero_grad()
        (-mle().log_prob(x).mean()).backward()
        opt.step()
        t_mle += time.perf_counter() - start
    target = _heldout_nll(mle, test)
    log(f"MLE: {mle_steps} steps, {t_mle:.1f} s, held-out NLL {target:.3f}")

    torch.manual_seed(1)
    fm = pf.CNF(2, hidden=HIDDEN, trace="exact", atol=TOL, rtol=TOL)
    objective = pf.FlowMatching()
    opt = torch.optim.Adam(fm.parameters(), lr=1e-2)
    t_fm, nll, reached = 0.0, float("inf"), None
    for step in range(1, fm_steps + 1):
        x = batches()
        start = time.perf_counter()
        opt.zero_grad()
        objective(fm, x).backward()
        opt.step()
        t_fm += time.perf_counter() - start
        if step % fm_eval == 0:
            nll = _heldout_nll(fm, test)
            if nll <= target:
                reached = step
                break
    log(f"FM: {step} steps, {t_fm:.1f} s, held-out NLL {nll:.3f} ({'reached' if reached else 'not reached'})")
    return t_mle, target, (t_fm if reached else None), nll, step


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _fmt_err(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def table(results: Sequence[Result], accuracies: dict[int, Accuracy]) -> str:
    """Samples/s per library, pyro_flows over zuko, and each library's error and NFE on the reference batch."""
    header = ["D", "metric", *LIBS, "pyro_flows / zuko", "pf tol", "max error log p (pf / autograd / zuko)",
              "NFE (same)"]  # fmt: skip
    rows = []
    keys = sorted({(r.features, r.metric) for r in results}, key=lambda k: (k[0], METRICS.index(k[1])))
    for d, metric in keys:
        by = {r.lib: r.median for r in results if (r.features, r.metric) == (d, metric)}
        value, _ = ratio(by.get("pyro_flows"), {"zuko": by.get("zuko")})
        acc = accuracies.get(d, Accuracy({}, {}))
        rows.append(
            [d, metric, *(_fmt(by.get(lib)) for lib in LIBS), "n/a" if value is None else f"{value:.2f}",
             f"{acc.tol:.2g}", " / ".join(_fmt_err(acc.error.get(lib)) for lib in LIBS),
             " / ".join(str(acc.nfe.get(lib, None) or "n/a") for lib in LIBS)]
        )  # fmt: skip
    return markdown_table(header, rows, align="rl" + "r" * (len(header) - 2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8])
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--norm",
        choices=NORMS,
        default="max",
        help="pyro_flows' step-size norm (max: its default, zuko's criterion; rms: torchdiffeq's)",
    )
    p.add_argument(
        "--tol", type=float, default=None, help="pyro_flows' atol = rtol (default: the one that matches zuko's error)"
    )
    p.add_argument("--repeats", type=int, default=None, help="default 5, quick 1")
    p.add_argument("--batch", type=int, default=None, help="log_prob batch (default 1024, quick 64)")
    p.add_argument("--no-fm", action="store_true", help="skip part 2 (flow matching vs MLE)")
    p.add_argument("--mle-steps", type=int, default=None, help="default 200, quick 3")
    p.add_argument("--fm-steps", type=int, default=None, help="cap on flow-matching steps (default 1000, quick 10)")
    p.add_argument("--fm-eval", type=int, default=None, help="held-out NLL check period (default 25, quick 5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = p.parse_args(argv)
    q = a.quick
    repeats = a.repeats or (1 if q else 5)
    batch = a.batch or (64 if q else 1024)
    threads = torch.get_num_threads()
    set_threads(a.threads)
    try:
        print(machine_line())
        print(f"zuko {version('zuko')}, torchdiffeq {version('torchdiffeq')}; pyro_flows step-size norm: {a.norm}")
        results, accuracies = bench_cnf(
            a.dims, a.libs, repeats, batch, 32 if q else 256, 1 if q else 2, norm=a.norm, tol=a.tol
        )
        print()
        print(table(results, accuracies))
        print(machine_line())
        if a.no_fm:
            return 0
        t_mle, target, t_fm, nll, steps = fm_vs_mle(
            a.mle_steps or (3 if q else 200),
            a.fm_steps or (10 if q else 1000),
            a.fm_eval or (5 if q else 25),
            n_eval=200 if q else 1000,
            batch=64 if q else 256,
        )
        print()
        fm_ratio = f"{t_fm / t_mle:.3f}" if t_fm is not None else "n/a (not reached)"
        rows = [
            ["MLE (pf.CNF, exact trace)", f"{t_mle:.1f}", f"{target:.3f}", ""],
            [f"flow matching ({steps} steps)", None if t_fm is None else f"{t_fm:.1f}", f"{nll:.3f}", fm_ratio],
        ]
        print(markdown_table(["two moons", "train time (s)", "held-out NLL", "FM / MLE time"], rows, align="lrrr"))
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
