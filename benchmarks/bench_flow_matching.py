"""Flow matching on 2-D tasks: pyro_flows against torchcfm and Meta's flow_matching, and before/after reflow.

Tasks (a source, a target; both sampled afresh, the held-out target sample is drawn once per task):

* ``8gaussians-moons``: from the 8 Gaussians (``pf.data.ring_mixture``, radius 2, std 0.25) to the two
  moons (``pf.data.two_moons``, noise 0.1). pyro_flows trains on fixed (source, target) pairs drawn
  independently each step (``FlowMatching(coupling="pairs")``): its CNF's base is N(0, I), so its ODE
  layer is used as the transport map and the NLL is ``log p_source(z) + log|det dz/dx|`` by the layer's
  inverse solve.
* ``normal-checkerboard``: from N(0, I) to the 4x4 checkerboard on [-2, 2]^2 (FFJORD's); pyro_flows
  trains ``pf.CNF`` with ``FlowMatching()`` (it draws the N(0, I) side itself) and its NLL is
  ``flow().log_prob``.

Same model and objective everywhere: the vector field is one plain MLP on ``[x, t]`` (``MLP`` below:
``--hidden`` widths, SiLU), given to each library (``pf.CNF(vector_field=...)``; torchcfm and flow_matching
call a module on ``(x, t)``); straight conditional paths with sigma = 0 and independent pairing
(``pf.FlowMatching()``, ``torchcfm.ConditionalFlowMatcher(sigma=0)``,
``flow_matching.path.AffineProbPath(CondOTScheduler())``); Adam, the same ``--lr`` and ``--batch``, the same
source/target batches (one seeded stream per run). pyro_flows trains with ``pf.fit`` and its defaults
(gradient clipping at norm 5, the non-finite-loss guard); the peers with the loop of their examples.

Metrics:

* **quality**: the sliced 2-Wasserstein distance (``pf.diagnostics.sliced_wasserstein``, 256 fixed
  directions) between ``--n-eval`` samples and a held-out target sample of the same size, the samples
  pushed from the *same* source draws in every library. Chosen over C2ST because it is a metric in the
  data's units that keeps resolving small differences (few-step blur, a thin bridge between moons) where a
  classifier's accuracy saturates, it is cheap enough to be evaluated during training, and it is
  deterministic given the samples. For reference, two independent target samples of this size are at
  the "floor" printed per task. Columns ``1``, ``2``, ``4``, ``8``: Euler steps (pyro_flows
  ``pf.fixed_steps(flow, k, "euler")``, flow_matching ``ODESolver.sample(method="euler", time_grid=...)``,
  torchcfm: ``torchdiffeq.odeint(method="euler")`` on the same grid, as torchcfm ships no sampler of its
  own); ``adaptive``: dopri5 with atol = rtol = 1e-5.
* **time to quality**: training wall time (quality evaluations excluded) until the adaptive-solver quality,
  checked every ``--eval-every`` steps, first reaches the target: 1.25 x the worst library's best quality
  of the run, so that every library reaches it. The ratio is peer time / pyro_flows time (> 1: pyro_flows
  faster). Also the training speed in steps/s over the whole run.
* **NLL** of the held-out target sample by the ODE (dopri5, 1e-5, exact divergence): pyro_flows and
  flow_matching (``ODESolver.compute_likelihood``); torchcfm has no likelihood (n/a).
* **reflow** (pyro_flows): after the run, ``reflow_pairs`` (``--reflow-pairs`` pairs, adaptive solve) and
  ``--reflow-steps`` more steps of ``FlowMatching(coupling="pairs")`` from the trained weights (Liu et al.
  2023 start the 2-rectified flow from the 1-rectified one), then the same quality columns and the
  straightness (``pf.objectives.straightness``: 0 for straight, constant-speed trajectories) before and after.

Libraries are run in turn, the order rotated each round (A B C, B C A, ...: ``harness.interleave``),
``--repeats`` times after one short warm-up run each, with torch threads fixed (``--threads 1``); times,
qualities and NLLs are medians over the repeats. Times are the process's CPU time by default
(``--clock cpu``): on a shared machine, other jobs inflate wall time unevenly; with one thread it is the work
done (``--clock wall`` for wall time). ``pyro_flows-loop`` is pyro_flows' objective in the peers' plain loop,
to separate the objective's cost from ``pf.fit``'s. A peer that is not installed is ``n/a``.

Usage::

    python benchmarks/bench_flow_matching.py
    python benchmarks/bench_flow_matching.py --quick --libs pyro_flows
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

import pyro_flows as pf
from pyro_flows.diagnostics import sliced_wasserstein
from pyro_flows.objectives import straightness

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timing, interleave, machine_line, markdown_table, ratio, set_threads, version  # noqa: E402

LIBS = ("pyro_flows", "pyro_flows-loop", "torchcfm", "flow_matching")
PEERS = ("torchcfm", "flow_matching")
TASKS = ("8gaussians-moons", "normal-checkerboard")
EULER_STEPS = (1, 2, 4, 8)
COLUMNS = tuple(str(k) for k in EULER_STEPS) + ("adaptive",)
TOL = 1e-5
PROJECTIONS = 256
SOURCE_STD = 0.25
TARGET_FACTOR = 1.25  # time to quality: to 1.25 x the worst library's best sliced Wasserstein distance


def available(lib: str) -> bool:
    return lib.startswith("pyro_flows") or importlib.util.find_spec(lib) is not None


# -- tasks ----------------------------------------------------------------------------------------------------
def eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    return pf.data.ring_mixture(n, noise=SOURCE_STD, generator=generator)


def eight_gaussians_log_prob(x: Tensor) -> Tensor:
    """The log-density of :func:`eight_gaussians` (an equal mixture of isotropic Gaussians)."""
    angle = torch.arange(8, dtype=x.dtype, device=x.device) * (2 * math.pi / 8)
    centres = 2.0 * torch.stack((angle.cos(), angle.sin()), dim=-1)
    squared = (x.unsqueeze(-2) - centres).square().sum(-1) / SOURCE_STD**2
    log_normal = -0.5 * squared - math.log(2 * math.pi * SOURCE_STD**2)
    return torch.logsumexp(log_normal, dim=-1) - math.log(8)


def standard_normal(n: int, generator: torch.Generator) -> Tensor:
    return torch.randn(n, 2, generator=generator)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    return -0.5 * x.square().sum(-1) - math.log(2 * math.pi)


def moons(n: int, generator: torch.Generator) -> Tensor:
    return pf.data.two_moons(n, noise=0.1, generator=generator)


def checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """FFJORD's checkerboard: uniform on the 8 dark squares of the 4x4 board on [-2, 2]^2."""
    x = torch.rand(n, generator=generator) * 4 - 2
    y = torch.rand(n, generator=generator) - 2 * torch.randint(2, (n,), generator=generator) + torch.floor(x) % 2
    return torch.stack((x, y), dim=-1)


@dataclass(frozen=True)
class Task:
    name: str
    source: Callable[[int, torch.Generator], Tensor]
    target: Callable[[int, torch.Generator], Tensor]
    source_log_prob: Callable[[Tensor], Tensor]
    normal_source: bool  # pyro_flows draws the source itself (its CNF's base)


TASK_DEFS = {
    "8gaussians-moons": Task("8gaussians-moons", eight_gaussians, moons, eight_gaussians_log_prob, False),
    "normal-checkerboard": Task("normal-checkerboard", standard_normal, checkerboard, standard_normal_log_prob, True),
}


@dataclass
class Evaluation:
    """What every library is measured on: fixed source draws, a held-out target sample, fixed directions."""

    source: Tensor
    target: Tensor
    floor: float  # the distance between two independent target samples of this size

    @classmethod
    def of(cls, task: Task, n: int, seed: int) -> Evaluation:
        g = torch.Generator().manual_seed(seed + 10_000)
        source, target, other = task.source(n, g), task.target(n, g), task.target(n, g)
        return cls(source, target, quality(other, target))


def quality(samples: Tensor, target: Tensor) -> float:
    """Sliced 2-Wasserstein distance with the same ``PROJECTIONS`` directions for every call."""
    g = torch.Generator().manual_seed(1234)
    return sliced_wasserstein(samples, target, PROJECTIONS, generator=g).item()


# -- the shared architecture -----------------------------------------------------------------------------------
class MLP(nn.Module):
    """A plain MLP on ``[x, t]``: the vector field of every library (``t`` a number, a scalar or one per row)."""

    def __init__(self, features: int = 2, hidden: Sequence[int] = (64, 64, 64)) -> None:
        super().__init__()
        widths = [features + 1, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(widths[-1], features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor | float, context: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat((x, t), dim=-1))


def stream(task: Task, batch: int, seed: int) -> Callable[[], tuple[Tensor, Tensor]]:
    """Fresh (source, target) batches from a seeded generator: the same sequence for every library."""
    g = torch.Generator().manual_seed(seed)
    return lambda: (task.source(batch, g), task.target(batch, g))


# -- the clock ---------------------------------------------------------------------------------------------------
@dataclass
class Clock:
    """Training time with quality checks every ``every`` steps excluded from it, by ``timer``."""

    every: int
    check: Callable[[], float]
    timer: Callable[[], float] = time.process_time
    start: float = 0.0
    excluded: float = 0.0
    steps: int = 0
    trace: list[tuple[float, int, float]] = field(default_factory=list)  # (train seconds, steps, quality)

    def __post_init__(self) -> None:
        self.start = self.timer()

    def tick(self) -> None:
        """Call before each training step."""
        if self.steps and self.steps % self.every == 0:
            self.record()
        self.steps += 1

    def record(self) -> None:
        seconds, now = self.elapsed(), self.timer()
        value = self.check()
        self.excluded += self.timer() - now
        self.trace.append((seconds, self.steps, value))

    def elapsed(self) -> float:
        return self.timer() - self.start - self.excluded

    def time_to(self, target: float) -> Optional[float]:
        return next((seconds for seconds, _, value in self.trace if value <= target), None)


# -- the three libraries -------------------------------------------------------------------------------------
@dataclass
class Run:
    lib: str
    model: object  # what sample / nll take
    clock: Clock
    train_seconds: float
    steps: int


def _integrator(field_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: Optional[int]) -> Tensor:
    """torchdiffeq on the Euler grid of ``steps`` steps, or dopri5 (torchcfm's examples use such a solve)."""
    from torchdiffeq import odeint

    if steps is None:
        times = torch.tensor([0.0, 1.0])
        return odeint(lambda t, x: field_fn(x, t), x0, times, method="dopri5", atol=TOL, rtol=TOL)[-1]
    return odeint(lambda t, x: field_fn(x, t), x0, torch.linspace(0, 1, steps + 1), method="euler")[-1]


class PyroFlows:
    name = "pyro_flows"

    @staticmethod
    def build(hidden: Sequence[int]) -> nn.Module:
        return pf.CNF(2, vector_field=MLP(2, hidden), solver="dopri5", atol=TOL, rtol=TOL)

    @staticmethod
    def data_and_objective(task: Task, batch: int, seed: int) -> tuple[Callable[[], Tensor], pf.FlowMatching]:
        """Target rows (the objective draws N(0, I) itself) or (source, target) pairs, and the objective."""
        draw = stream(task, batch, seed)

        def data() -> Tensor:
            source, target = draw()
            return target if task.normal_source else torch.stack((source, target), dim=1)

        return data, pf.FlowMatching() if task.normal_source else pf.FlowMatching(coupling="pairs")

    @staticmethod
    def train(flow, task: Task, steps: int, batch: int, lr: float, seed: int, clock: Clock) -> None:
        data, objective = PyroFlows.data_and_objective(task, batch, seed)

        def timed(model, x, context=None):
            clock.tick()
            return objective(model, x, context)

        pf.fit(flow, data, objective=timed, max_steps=steps, steps_per_epoch=steps, max_epochs=1, lr=lr,
               seed=seed, progress=False)  # fmt: skip

    @staticmethod
    @torch.no_grad()
    def sample(flow, x0: Tensor, steps: Optional[int]) -> Tensor:
        layer = flow.transforms[0]
        with contextlib.nullcontext() if steps is None else pf.fixed_steps(flow, steps, "euler"):
            return layer.call_and_ladj(x0)[0]

    @staticmethod
    @torch.no_grad()
    def nll(flow, task: Task, x: Tensor) -> float:
        if task.normal_source:
            return -flow().log_prob(x).mean().item()
        z, ladj = flow.transforms[0].inverse_and_ladj(x)
        return -(task.source_log_prob(z) + ladj).mean().item()


class PyroFlowsLoop(PyroFlows):
    """pyro_flows' objective in the peers' plain Adam loop (no ``pf.fit``): separates the objective's cost
    from the fitting loop's (rollback snapshots, gradient clipping, finiteness checks)."""

    name = "pyro_flows-loop"

    @staticmethod
    def train(flow, task: Task, steps: int, batch: int, lr: float, seed: int, clock: Clock) -> None:
        data, objective = PyroFlows.data_and_objective(task, batch, seed)
        optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
        for _ in range(steps):
            clock.tick()
            optimizer.zero_grad()
            objective(flow, data()).backward()
            optimizer.step()


class TorchCFM:
    name = "torchcfm"

    @staticmethod
    def build(hidden: Sequence[int]) -> nn.Module:
        return MLP(2, hidden)

    @staticmethod
    def train(model, task: Task, steps: int, batch: int, lr: float, seed: int, clock: Clock) -> None:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        matcher = ConditionalFlowMatcher(sigma=0.0)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        draw = stream(task, batch, seed)
        for _ in range(steps):
            clock.tick()
            optimizer.zero_grad()
            x0, x1 = draw()
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
            loss = (model(xt, t) - ut).square().mean()
            loss.backward()
            optimizer.step()

    @staticmethod
    @torch.no_grad()
    def sample(model, x0: Tensor, steps: Optional[int]) -> Tensor:
        return _integrator(model, x0, steps)

    nll = None


class FlowMatchingMeta:
    name = "flow_matching"

    @staticmethod
    def build(hidden: Sequence[int]) -> nn.Module:
        return MLP(2, hidden)

    @staticmethod
    def train(model, task: Task, steps: int, batch: int, lr: float, seed: int, clock: Clock) -> None:
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        draw = stream(task, batch, seed)
        for _ in range(steps):
            clock.tick()
            optimizer.zero_grad()
            x0, x1 = draw()
            sample = path.sample(t=torch.rand(x1.shape[0]), x_0=x0, x_1=x1)
            loss = (model(sample.x_t, sample.t) - sample.dx_t).square().mean()
            loss.backward()
            optimizer.step()

    @staticmethod
    def _solver(model):
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper

        class Wrapped(ModelWrapper):
            def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
                return self.model(x, t)

        return ODESolver(velocity_model=Wrapped(model))

    @staticmethod
    def sample(model, x0: Tensor, steps: Optional[int]) -> Tensor:
        solver = FlowMatchingMeta._solver(model)
        if steps is None:
            return solver.sample(x_init=x0, step_size=None, method="dopri5", atol=TOL, rtol=TOL)
        return solver.sample(x_init=x0, step_size=None, method="euler", time_grid=torch.linspace(0, 1, steps + 1))

    @staticmethod
    def nll(model, task: Task, x: Tensor) -> float:
        solver = FlowMatchingMeta._solver(model)
        _, log_p = solver.compute_likelihood(
            x_1=x, log_p0=task.source_log_prob, step_size=None, method="dopri5", atol=TOL, rtol=TOL,
            time_grid=torch.tensor([1.0, 0.0]), exact_divergence=True,
        )  # fmt: skip
        return -log_p.mean().item()


ADAPTERS = {a.name: a for a in (PyroFlows, PyroFlowsLoop, TorchCFM, FlowMatchingMeta)}


def sample_quality(lib: str, model, evaluation: Evaluation, steps: Optional[int]) -> float:
    return quality(ADAPTERS[lib].sample(model, evaluation.source, steps), evaluation.target)


def run_one(
    lib: str, task: Task, evaluation: Evaluation, args: argparse.Namespace, seed: int, steps: Optional[int] = None
) -> Run:
    """Train a fresh model of ``lib`` for ``steps`` (default ``--steps``), checking the quality on the way."""
    adapter, steps = ADAPTERS[lib], args.steps if steps is None else steps
    torch.manual_seed(seed)  # the same initial weights in every library
    model = adapter.build(args.hidden)
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    clock = Clock(args.eval_every, lambda: sample_quality(lib, model, evaluation, None), timer)
    adapter.train(model, task, steps, args.batch, args.lr, seed, clock)
    train_seconds = clock.elapsed()
    clock.record()
    return Run(lib, model, clock, train_seconds, steps)


# -- the benchmark -----------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    task: str
    floor: float
    target: Optional[float] = None
    seconds: dict[str, list[float]] = field(default_factory=dict)  # time to target, per repeat
    speed: dict[str, list[float]] = field(default_factory=dict)  # steps/s, per repeat
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> SW, median of the repeats
    nll: dict[str, Optional[float]] = field(default_factory=dict)  # median of the repeats
    reflow: dict[str, dict[str, float]] = field(default_factory=dict)  # "before"/"after" -> column -> value


def quality_row(lib: str, model, evaluation: Evaluation) -> dict[str, float]:
    row = {str(k): sample_quality(lib, model, evaluation, k) for k in EULER_STEPS}
    row["adaptive"] = sample_quality(lib, model, evaluation, None)
    return row


def reflow_row(flow, evaluation: Evaluation) -> dict[str, float]:
    row = quality_row("pyro_flows", flow, evaluation)
    row["straightness"] = straightness(flow, base=evaluation.source, steps=32).item()
    return row


def reflow(flow, task: Task, evaluation: Evaluation, args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """One round of reflow on the trained pyro_flows model: (before, after) quality and straightness."""
    before = reflow_row(flow, evaluation)
    g = torch.Generator().manual_seed(seed + 20_000)
    base = task.source(args.reflow_pairs, g)
    pairs = pf.reflow_pairs(flow, base=base)
    pf.fit(flow, pairs, objective=pf.FlowMatching(coupling="pairs"), max_steps=args.reflow_steps,
           batch_size=args.batch, lr=args.lr, seed=seed, progress=False)  # fmt: skip
    return {"before": before, "after": reflow_row(flow, evaluation)}


def bench_task(name: str, libs: Sequence[str], args: argparse.Namespace, log: Callable[[str], None]) -> TaskResult:
    task = TASK_DEFS[name]
    evaluation = Evaluation.of(task, args.n_eval, args.seed)
    result = TaskResult(name, evaluation.floor)
    runs: dict[str, list[Run]] = {lib: [] for lib in libs if available(lib)}
    for lib in runs:  # warm-up: imports, first calls
        run_one(lib, task, evaluation, args, args.seed, steps=min(args.steps, 20))

    def repeat(lib: str) -> Callable[[], None]:
        def case() -> None:
            run = run_one(lib, task, evaluation, args, args.seed + len(runs[lib]))  # repeat r: seed + r
            runs[lib].append(run)
            log(f"{name} {lib} repeat {len(runs[lib]) - 1}: {run.train_seconds:.2f} s, final SW "
                f"{run.clock.trace[-1][2]:.4f}")  # fmt: skip

        return case

    # the libraries in turn, the order rotated each round; the times that count are the runs' own clocks
    interleave({lib: repeat(lib) for lib in runs}, args.repeats, warmup=0)
    if not runs:
        return result
    result.target = TARGET_FACTOR * max(
        min(v for _, _, v in run.clock.trace) for lib_runs in runs.values() for run in lib_runs
    )
    for lib, lib_runs in runs.items():
        result.seconds[lib] = [s for s in (run.clock.time_to(result.target) for run in lib_runs) if s is not None]
        log(f"{name} {lib} time to target per repeat (s): " + " ".join(f"{s:.2f}" for s in result.seconds[lib]))
        result.speed[lib] = [run.steps / run.train_seconds for run in lib_runs]
        rows = [quality_row(lib, run.model, evaluation) for run in lib_runs]
        result.quality[lib] = {c: _median(row[c] for row in rows) for c in COLUMNS}
        nll = ADAPTERS[lib].nll
        nlls = [] if nll is None else [nll(run.model, task, evaluation.target) for run in lib_runs]
        result.nll[lib] = _median(nlls)
    if "pyro_flows" in runs and args.reflow_steps > 0:
        flow = copy.deepcopy(runs["pyro_flows"][-1].model)  # the last repeat's
        result.reflow = reflow(flow, task, evaluation, args, args.seed)
    return result


def _median(values: Iterable[float]) -> Optional[float]:
    """The median (None of nothing), by the harness's :class:`Timing`."""
    return Timing(list(values)).median


def _fmt(value: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: Sequence[TaskResult], libs: Sequence[str]) -> str:
    header = ["task", "library", "time to target (s)", "time / pyro_flows time", "steps/s", "NLL"]
    rows = []
    for r in results:
        ours = _median(r.seconds.get("pyro_flows", []))
        for lib in libs:
            seconds = _median(r.seconds.get(lib, []))
            times = None if seconds is None or ours is None else seconds / ours
            q = r.quality.get(lib, {})
            speed = _median(r.speed.get(lib, []))
            rows.append(
                [r.task, lib, _fmt(seconds, ".2f"), f"{_fmt(times, '.2f')}x", _fmt(speed, ".0f"),
                 _fmt(r.nll.get(lib), ".3f"), *(_fmt(q.get(c)) for c in COLUMNS)]
            )  # fmt: skip
    return markdown_table(header + [f"SW {c}" for c in COLUMNS], rows)


def reflow_table(results: Sequence[TaskResult]) -> str:
    rows = [
        [r.task, f"{when} reflow", *(_fmt(r.reflow[when][c]) for c in (*COLUMNS, "straightness"))]
        for r in results
        for when in ("before", "after")
        if when in r.reflow
    ]
    return markdown_table(["task", "pyro_flows", *(f"SW {c}" for c in COLUMNS), "straightness"], rows)


def summary(results: Sequence[TaskResult]) -> str:
    """``pf.fit`` against the best peer per task: time to target and training speed (> 1: pyro_flows faster)."""
    lines = []
    for r in results:
        seconds = {lib: _median(r.seconds.get(lib, [])) for lib in ("pyro_flows", *PEERS)}
        rates = {lib: None if s is None else 1 / s for lib, s in seconds.items()}  # ratio() compares rates
        speeds = {lib: _median(r.speed.get(lib, [])) for lib in ("pyro_flows", *PEERS)}
        time_ratio, time_peer = ratio(rates.pop("pyro_flows"), rates)
        speed_ratio, speed_peer = ratio(speeds.pop("pyro_flows"), speeds)
        lines.append(
            f"{r.task}: pyro_flows (pf.fit) vs the best peer: time to target {_fmt(time_ratio, '.2f')}x "
            f"({time_peer or 'n/a'}), steps/s {_fmt(speed_ratio, '.2f')}x ({speed_peer or 'n/a'})"
        )
    return "\n".join(lines)


def targets(results: Sequence[TaskResult]) -> str:
    return "\n".join(
        f"{r.task}: target SW {_fmt(r.target)} (floor, two target samples: {r.floor:.4f})" for r in results
    )


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    parser.add_argument("--steps", type=int, default=3000, help="training steps per run")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reflow-pairs", type=int, default=10_000)
    parser.add_argument("--reflow-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu",
        help="cpu: the process's CPU time (robust to other jobs on a shared machine, with --threads 1); wall",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a tiny run (the smoke test's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.n_eval, args.repeats = 20, 10, 200, 1
        args.reflow_pairs, args.reflow_steps, args.hidden = 256, 10, [16, 16]
    return args


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> list[TaskResult]:
    args = parse(argv)
    set_threads(args.threads)
    libs = list(args.libs)
    log(f"{machine_line()}; {args.clock} time; libraries: " + ", ".join(
        f"{lib}{f' {version(lib)}' if lib in PEERS and available(lib) else ''}"
        f"{'' if available(lib) else ' (not installed)'}" for lib in libs))  # fmt: skip
    results = [bench_task(name, libs, args, log) for name in args.tasks]
    log(targets(results))
    log(table(results, libs))
    log(summary(results))
    log(reflow_table(results))
    return results


if __name__ == "__main__":
    main()
