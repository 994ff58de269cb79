"""Speed benchmark of continuous normalizing flows: pyro_flows' CNF against zuko's, and flow matching against MLE.

Part 1, pf.CNF(trace="exact") vs ``zuko.flows.CNF`` (exact trace), at D = 2 and 8:

* the vector field is the same function in both: zuko's field (an MLP on
  ``[x, cos(k pi t), sin(k pi t)]``, k = 1..3, hidden widths (64, 64), SiLU)
  is built once and pyro_flows' layer is given a field that calls zuko's
  module with the *same weights* (``vector_field=`` of pf.CNF), with the time
  span reversed (t0 = 1, t1 = 0) so that both integrate the same ODE in the
  same direction when evaluating a density. The last layer is randomised (not
  zero) so the flow is not the identity. pyro_flows' default field (concat-squash
  layers) is *not* used here: zuko cannot express it.
* solver: dopri5 in both, atol = rtol = 1e-5. zuko's own dopri5 (adaptive
  checkpoint adjoint) vs torchdiffeq's in pyro_flows; their error norms differ
  (zuko: over the whole state; pyro_flows: over z and the log-det), so the
  number of steps may differ.
* metrics: exact ``log_prob`` of a batch (default 1024) under ``torch.no_grad()``,
  and one Adam step on ``-log_prob(x).mean()`` (batch 256), in samples/s.
  The maximum absolute difference of the two log-likelihoods is reported.

Part 2, two moons: pf.CNF trained by MLE for ``--mle-steps`` steps; its final
held-out NLL is the target; then the same CNF trained by pf.FlowMatching until
its held-out NLL (checked every ``--fm-eval`` steps, evaluation time not
counted) reaches it, at most ``--fm-steps`` steps. Reported: training wall time
of each and their ratio.

Libraries are timed in turn (A, B, A, B, ...) ``--repeats`` times with torch
threads fixed; the median is reported. A missing peer is ``n/a``.

Usage::

    python benchmarks/bench_cnf.py
    python benchmarks/bench_cnf.py --quick --libs pyro_flows
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

LIBS = ("pyro_flows", "zuko")
METRICS = ("log_prob", "train")
HIDDEN = (64, 64)
TOL = 1e-5


def available(lib: str) -> bool:
    return importlib.util.find_spec(lib) is not None


class ZukoStyleField(nn.Module):
    """zuko's CNF vector field (MLP on x and a sin/cos time embedding), written out: no zuko needed."""

    def __init__(self, features: int, hidden: Sequence[int] = HIDDEN, freqs: int = 3) -> None:
        super().__init__()
        widths = [features + 2 * freqs, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(widths[-1], features))
        self.ode = nn.Sequential(*layers)
        self.register_buffer("freqs", torch.arange(1, freqs + 1) * torch.pi)

    def f(self, t, x):  # zuko's signature
        t = self.freqs * torch.as_tensor(t, dtype=x.dtype)[..., None]
        t = torch.cat((t.cos(), t.sin()), dim=-1).expand(*x.shape[:-1], -1)
        return self.ode(torch.cat((t, x), dim=-1))


class SharedField(nn.Module):
    """pyro_flows' ``f(z, t, context)`` calling a zuko-style ``f(t, x)`` module (weights shared)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, z, t, context=None):
        return self.module.f(t, z)


def build(features: int, libs: Sequence[str], seed: int = 0) -> dict[str, Optional[nn.Module]]:
    """The flows, sharing one vector field's weights (zuko's if available)."""
    import pyro_flows as pf

    torch.manual_seed(seed)
    models: dict[str, Optional[nn.Module]] = {lib: None for lib in LIBS}
    if "zuko" in libs and available("zuko"):
        import zuko

        z = zuko.flows.CNF(features, hidden_features=HIDDEN, activation=nn.SiLU, atol=TOL, rtol=TOL, exact=True)
        models["zuko"] = z
        source = z.transform
    else:
        source = ZukoStyleField(features)
    if "pyro_flows" in libs:
        flow = pf.CNF(features, trace="exact", vector_field=SharedField(source), t0=1.0, t1=0.0, atol=TOL, rtol=TOL)
        models["pyro_flows"] = flow
    with torch.no_grad():  # a non-trivial flow
        for m in source.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1.0 / m.in_features**0.5)
    return models


def _log_prob(lib: str, model: nn.Module, x):
    return model().log_prob(x)


@dataclass
class Result:
    features: int
    metric: str
    lib: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.runs) if self.runs else None


def _op(lib: str, model: nn.Module, metric: str, features: int, batch: int):
    if metric == "log_prob":

        def op():
            x = torch.randn(batch, features)
            with torch.no_grad():
                _log_prob(lib, model, x)

        return op
    # separate optimisers over the shared weights are fine: only speed is measured
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def op():
        x = torch.randn(batch, features)
        opt.zero_grad()
        (-_log_prob(lib, model, x).mean()).backward()
        opt.step()

    return op


def _timed(op: Callable[[], None], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        op()
    return time.perf_counter() - start


def bench_cnf(dims, libs, repeats, batch_lp, batch_train, iterations, log=print):
    results, diffs = [], {}
    for d in dims:
        models = build(d, libs)
        if models["pyro_flows"] is not None and models["zuko"] is not None:
            x = torch.randn(256, d)
            with torch.no_grad():
                a, b = _log_prob("pyro_flows", models["pyro_flows"], x), _log_prob("zuko", models["zuko"], x)
            diffs[d] = (a - b).abs().max().item()
            log(f"D={d}: max |log p_pyro_flows - log p_zuko| = {diffs[d]:.2e} (mean log p {a.mean().item():.3f})")
        for metric in METRICS:
            batch = batch_lp if metric == "log_prob" else batch_train
            cases = {lib: Result(d, metric, lib) for lib in LIBS}
            ops = {lib: _op(lib, m, metric, d, batch) for lib, m in models.items() if m is not None}
            for op in ops.values():
                op()  # warm-up
            for _ in range(repeats):
                for lib, op in ops.items():
                    cases[lib].runs.append(batch * iterations / _timed(op, iterations))
            results += cases.values()
            log(f"D={d} {metric}: " + ", ".join(f"{lib} {_fmt(r.median)}" for lib, r in cases.items()))
    return results, diffs


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


def table(results: Sequence[Result], diffs: dict) -> str:
    lines = [
        "| D | metric | pyro_flows | zuko | pyro_flows / zuko | max abs diff log p |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = sorted({(r.features, r.metric) for r in results}, key=lambda k: (k[0], METRICS.index(k[1])))
    for d, metric in keys:
        by = {r.lib: r.median for r in results if (r.features, r.metric) == (d, metric)}
        ours, peer = by.get("pyro_flows"), by.get("zuko")
        ratio = f"{ours / peer:.2f}" if ours and peer else "n/a"
        diff = f"{diffs[d]:.1e}" if d in diffs else "n/a"
        lines.append(f"| {d} | {metric} | {_fmt(ours)} | {_fmt(peer)} | {ratio} | {diff} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8])
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="default 5, quick 1")
    p.add_argument("--batch", type=int, default=None, help="log_prob batch (default 1024, quick 64)")
    p.add_argument("--mle-steps", type=int, default=None, help="default 200, quick 3")
    p.add_argument("--fm-steps", type=int, default=None, help="cap on flow-matching steps (default 1000, quick 10)")
    p.add_argument("--fm-eval", type=int, default=None, help="held-out NLL check period (default 25, quick 5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = p.parse_args(argv)
    q = a.quick
    repeats = a.repeats or (1 if q else 5)
    batch = a.batch or (64 if q else 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        results, diffs = bench_cnf(a.dims, a.libs, repeats, batch, 32 if q else 256, 1 if q else 2)
        print()
        print(table(results, diffs))
        t_mle, target, t_fm, nll, steps = fm_vs_mle(
            a.mle_steps or (3 if q else 200),
            a.fm_steps or (10 if q else 1000),
            a.fm_eval or (5 if q else 25),
            n_eval=200 if q else 1000,
            batch=64 if q else 256,
        )
        ratio = f"{t_fm / t_mle:.3f}" if t_fm is not None else "n/a (not reached)"
        print()
        print("| two moons | train time (s) | held-out NLL | FM / MLE time |")
        print("|---|---:|---:|---:|")
        print(f"| MLE (pf.CNF, exact trace) | {t_mle:.1f} | {target:.3f} | |")
        fm_time = f"{t_fm:.1f}" if t_fm is not None else "n/a"
        print(f"| flow matching ({steps} steps) | {fm_time} | {nll:.3f} | {ratio} |")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
