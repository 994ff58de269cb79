"""Neural posterior estimation benchmark: pyro_flows' NPE against the ``sbi`` package's, at equal simulations.

Two tasks, each with exact reference posterior samples (issue 17.3: "sbibm-style", the repository's own simulators):

* ``linear_gaussian`` (:class:`LinearGaussianTask`): θ ~ N(0, I_5), x | θ ~ N(Aθ, 0.3² I) with a fixed random
  mixing matrix A, so the analytic posterior is a correlated Gaussian;
* ``two_moons`` (:class:`TwoMoonsTask`): the SBI benchmark's two moons (Greenberg et al. 2019; Lueckmann et al.
  2021), θ ~ U([-1, 1]²), with exact draws by inverting the simulator and rejecting outside the prior's box.

Both libraries get, in each repeat, the *same* ``--simulations`` pairs (default 10⁴, drawn with the repeat's seed)
and the same architecture, and each trains with **its own defaults** (``--recipe defaults``; what a user who
switches gets), or pyro_flows with sbi's recipe (``--recipe sbi``):

* ``maf`` is sbi's ``posterior_nn("maf")`` (nflows ``MaskedAffineAutoregressiveTransform``) against
  ``pf.infer.NPE(flow="maf")``; ``nsf`` is sbi's ``posterior_nn("maf_rqs")`` (nflows
  ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``, linear tails) against ``pf.infer.NPE(flow="nsf")``
  (autoregressive, identity tails). Both: 5 layers, MADE conditioners with 3 hidden layers of 50 units (sbi's
  ``hidden_features=50, num_blocks=2``) and tanh, the context fed to the first hidden layer, a random permutation
  between layers, splines with 10 bins on [-3, 3]; θ and x z-scored from the simulations;
* ``cnf`` is flow matching, each library entirely with its defaults (network, objective, training):
  ``pf.infer.NPE(prior, flow="cnf")`` against sbi's ``FMPE`` (issue 15.6);
* sbi's training defaults: Adam 5e-4, batch 200, clipping at norm 5, 10 % held out, early stopping after 20
  epochs without a better validation loss, the best weights restored; pyro_flows' are
  :attr:`pyro_flows.infer.NPE.fit_options` (and :attr:`~pyro_flows.infer.NPE.cnf_fit_options` for ``cnf``).
  ``--max-epochs`` caps both (sbi runs ``max_num_epochs + 1`` epochs, so it is given ``--max-epochs`` − 1).

Metrics: the training wall time (from building the estimator to the trained one; simulating is not included),
the epochs and the time per epoch; the accuracy of a classifier two-sample test (C2ST, ``pf.diagnostics.c2st``
for both libraries, 0.5 is perfect) between ``--samples`` posterior draws and as many exact reference draws,
averaged over ``--observations`` observations drawn from the prior predictive (seed 1); and **the time pyro_flows
takes to reach sbi's C2ST** (issue 17.3): while pyro_flows trains, copies of its weights are kept (at most 64, at
regular step counts, the copying time left out of every time), and after the repeat the C2ST of the copies at
15, 30, 45, 60 and 80 % of the run and of the final weights is computed in that order until one is at most sbi's
C2ST of the same repeat; its time into training is the time to sbi's quality (an upper bound at that resolution;
n/a when even the final weights do not reach it). ``--no-time-to-quality`` skips it.

Each library trains once untimed (2 epochs) per flow to warm up. The fits run ``--repeats`` times, the
libraries in turn within a repeat and the order rotated between repeats, so that slow drifts of a busy machine hit
both alike; the table shows the median times and the mean C2ST (± standard deviation over repeats). The torch
thread count is fixed (``--threads``, default 1). A library that is not installed (sbi) is reported as ``n/a``.

Usage::

    python benchmarks/bench_sbi.py                                       # both tasks, maf nsf cnf, 1 repeat
    python benchmarks/bench_sbi.py --tasks linear_gaussian --flows maf --repeats 3
    python benchmarks/bench_sbi.py --recipe sbi                          # pyro_flows trained with sbi's recipe
    python benchmarks/bench_sbi.py --quick --libs pyro_flows             # seconds (the test)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, markdown_table, set_threads, version  # noqa: E402

LIBS = ("pyro_flows", "sbi")
FLOWS = ("maf", "nsf", "cnf")
TASKS = ("linear_gaussian", "two_moons")
RECIPES = ("defaults", "sbi")
SBI_MODEL = {"maf": "maf", "nsf": "maf_rqs"}  # sbi's autoregressive twins of pf's MAF and NSF
# sbi's train() defaults (a constant learning rate, no step budget), and pyro_flows' former epoch cap
SBI_RECIPE = {"batch_size": 200, "lr": 5e-4, "validation_fraction": 0.1, "patience": 20, "schedule": None}
SBI_RECIPE.update(max_steps=None, max_epochs=1000)
SCAN = (0.15, 0.3, 0.45, 0.6, 0.8)  # fractions of the run whose weights are scored for the time to sbi's C2ST


@dataclass(frozen=True)
class Config:
    """The tasks' settings, the shared architecture, each library's recipe and the scoring."""

    dim: int = 5
    noise: float = 0.3
    simulations: int = 10_000
    transforms: int = 5
    hidden: int = 50
    blocks: int = 2  # sbi's num_blocks: hidden layers after the first, so 3 hidden layers of `hidden` units
    bins: int = 10
    bound: float = 3.0
    recipe: str = "defaults"  # "defaults": each library's own; "sbi": pyro_flows trained with SBI_RECIPE too
    max_epochs: Optional[int] = None  # None: each library's own cap
    observations: int = 3
    samples: int = 1000
    time_to_quality: bool = True


QUICK = Config(simulations=400, max_epochs=3, observations=1, samples=200)


# -- the tasks ---------------------------------------------------------------------------------------


class LinearGaussianTask:
    r"""θ ~ N(0, I_D), x | θ ~ N(Aθ, σ² I_D), with the analytic posterior N(ΣAᵀx/σ², Σ), Σ = (I + AᵀA/σ²)⁻¹."""

    def __init__(self, dim: int, noise: float, seed: int = 0) -> None:
        import pyro.distributions as dist

        generator = torch.Generator().manual_seed(seed)
        self.dim, self.noise = dim, noise
        self.mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
        self.prior = dist.MultivariateNormal(torch.zeros(dim), torch.eye(dim))
        precision = torch.eye(dim, dtype=torch.float64) + self.mixing.T @ self.mixing / noise**2
        self.posterior_covariance = torch.linalg.inv(precision)

    def simulate(self, theta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``x`` of shape ``(n, D)`` for ``theta`` of shape ``(n, D)``."""
        noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        return theta @ self.mixing.T.to(theta.dtype) + self.noise * noise

    def simulations(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` pairs (θ, x) from the prior and the simulator, float32, seeded."""
        generator = torch.Generator().manual_seed(seed)
        theta = torch.randn(n, self.dim, generator=generator)
        return theta, self.simulate(theta, generator)

    def posterior(self, x: Tensor) -> torch.distributions.MultivariateNormal:
        """The exact posterior given one observation ``x`` of shape ``(D,)`` (float64)."""
        mean = self.posterior_covariance @ self.mixing.T @ x.double() / self.noise**2
        return torch.distributions.MultivariateNormal(mean, self.posterior_covariance)

    def reference_posterior(self, x: Tensor, n: int, seed: int = 0) -> Tensor:
        """``n`` draws of the exact posterior at ``x`` (float64), seeded."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.posterior(x).sample((n,))


class TwoMoonsTask:
    r"""The SBI benchmark's two moons (Greenberg et al. 2019; Lueckmann et al. 2021), with exact reference samples.

    :math:`\theta \sim \mathcal U([-1, 1]^2)`, :math:`a \sim \mathcal U(-\pi/2, \pi/2)`,
    :math:`r \sim \mathcal N(0.1, 0.01^2)` and :math:`x = (r\cos a + 0.25, r\sin a) + s(\theta)` with
    :math:`s(\theta) = (-|\theta_1 + \theta_2|, \theta_2 - \theta_1) / \sqrt 2`. The likelihood is the density
    of the ring point :math:`u = x - s(\theta)`: :math:`\mathcal N(\|u'\|; 0.1, 0.01^2) / (\pi \|u'\|)` for
    :math:`u' = u - (0.25, 0)` with :math:`u'_1 > 0`, else 0.

    Reference posterior samples by rejection (:meth:`reference_posterior`): on each side of
    :math:`\theta_1 + \theta_2 = 0`, :math:`s` is linear and orthogonal (:math:`|\det| = 1`), so
    :math:`\theta = s^{-1}(x - \text{ring})` with a simulated ring point and a fair choice of the side has density
    :math:`\tfrac12 p(x \mid \theta)`; proposals outside the prior's box are rejected. The draws are exact.
    """

    def __init__(self) -> None:
        import pyro.distributions as dist

        self.dim = 2
        self.prior = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)

    @staticmethod
    def shift(theta: Tensor) -> Tensor:
        r""":math:`s(\theta)`, shape ``(..., 2)``."""
        t1, t2 = theta[..., 0], theta[..., 1]
        return torch.stack([-(t1 + t2).abs(), t2 - t1], dim=-1) / math.sqrt(2)

    @staticmethod
    def ring(n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        r"""``n`` draws of :math:`(r\cos a + 0.25, r\sin a)`, shape ``(n, 2)``."""
        a = (torch.rand(n, generator=generator, dtype=dtype) - 0.5) * math.pi
        r = 0.1 + 0.01 * torch.randn(n, generator=generator, dtype=dtype)
        return torch.stack([r * a.cos() + 0.25, r * a.sin()], dim=-1)

    def simulate(self, theta: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``x`` of shape ``(n, 2)`` for ``theta`` of shape ``(n, 2)``."""
        return self.ring(theta.shape[0], generator, theta.dtype) + self.shift(theta)

    def simulations(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` pairs (θ, x) from the prior and the simulator, float32, seeded."""
        generator = torch.Generator().manual_seed(seed)
        theta = torch.rand(n, 2, generator=generator) * 2 - 1
        return theta, self.simulate(theta, generator)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        r""":math:`\log p(x \mid \theta)` (:math:`-\infty` off the half plane), shape the broadcast batch."""
        u = x - self.shift(theta) - torch.tensor([0.25, 0.0], dtype=theta.dtype)
        radius = u.norm(dim=-1)
        log_p = torch.distributions.Normal(0.1, 0.01).log_prob(radius) - math.log(math.pi) - radius.log()
        return torch.where(u[..., 0] > 0, log_p, -torch.inf)

    def reference_posterior(self, x: Tensor, n: int, seed: int = 0) -> Tensor:
        r"""``n`` exact draws of :math:`p(\theta \mid x)` for one ``x`` ``(2,)`` by rejection (class docstring)."""
        generator = torch.Generator().manual_seed(seed)
        accepted: list[Tensor] = []
        count = 0
        while count < n:
            shift = x.double() - self.ring(4 * n, generator, torch.float64)  # s(θ) of each proposal
            side = torch.randint(0, 2, (4 * n,), generator=generator, dtype=torch.float64) * 2 - 1
            total = -math.sqrt(2) * shift[:, 0] * side  # θ1 + θ2: |θ1 + θ2| = -√2 s1, its sign the side
            difference = math.sqrt(2) * shift[:, 1]  # θ2 - θ1
            theta = torch.stack([total - difference, total + difference], dim=-1) / 2
            keep = (shift[:, 0] <= 0) & (theta.abs() <= 1).all(-1)
            accepted.append(theta[keep])
            count += int(keep.sum())
        return torch.cat(accepted)[:n].float()


Task = Union[LinearGaussianTask, TwoMoonsTask]


def make_task(name: str, cfg: Config) -> Task:
    """The task called ``name`` (one of TASKS)."""
    if name == "linear_gaussian":
        return LinearGaussianTask(cfg.dim, cfg.noise)
    if name == "two_moons":
        return TwoMoonsTask()
    raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")


# -- the libraries -------------------------------------------------------------------------------------


def available(lib: str) -> Optional[str]:
    """None if ``lib`` can run, else why not."""
    return None if importlib.util.find_spec(lib) is not None else "not installed"


class Snapshots:
    """A forward pre-hook keeping copies of ``module``'s parameters every ``every`` training calls, with the
    seconds since ``start`` at each (the copying time left out). Past ``limit`` copies, every other one is dropped
    and ``every`` doubles, so the copies stay evenly spaced over the run."""

    def __init__(self, module: nn.Module, start: float, limit: int = 64) -> None:
        self.parameters = list(module.parameters())
        self.start, self.limit, self.every, self.calls, self.overhead = start, limit, 1, 0, 0.0
        self.taken: list[tuple[float, list[Tensor]]] = []

    def __call__(self, module: nn.Module, args: object) -> None:
        if not module.training:  # validation and sampling
            return
        self.calls += 1
        if self.calls % self.every:
            return
        now = time.perf_counter()
        self.taken.append((now - self.start - self.overhead, [p.detach().clone() for p in self.parameters]))
        if len(self.taken) > self.limit:
            self.taken, self.every = self.taken[1::2], 2 * self.every
        self.overhead += time.perf_counter() - now

    def load(self, state: list[Tensor]) -> None:
        """Put the parameters of a copy into the module."""
        with torch.no_grad():
            for parameter, value in zip(self.parameters, state, strict=True):
                parameter.copy_(value)


@dataclass
class Trained:
    """A trained estimator: its posterior sampler ``sample(x_obs, n) -> (n, D)``, cost and size; pyro_flows' also
    the copies of its weights during training (:class:`Snapshots`, None when not recorded) and, when its posterior
    rejects draws outside the prior's support, the acceptance rate of each posterior sampled, in order."""

    sample: Callable[[Tensor, int], Tensor]
    seconds: float
    epochs: int
    params: int
    snapshots: Optional[Snapshots] = None
    acceptance: list[float] = field(default_factory=list)


def pyro_flows_npe(flow: str, task: Task, cfg: Config):
    """``pf.infer.NPE`` with the architecture shared with sbi (``cnf``: every default)."""
    import pyro_flows as pf

    if flow == "cnf":
        return pf.infer.NPE(task.prior, flow="cnf")
    return pf.infer.NPE(
        task.prior,
        flow=flow,
        transforms=cfg.transforms,
        hidden=(cfg.hidden,) * (cfg.blocks + 1),
        activation=nn.Tanh,
        mixing="random",
        **({"bins": cfg.bins, "bound": cfg.bound} if flow == "nsf" else {}),
    )


def train_pyro_flows(
    flow: str, task: Task, theta: Tensor, x: Tensor, cfg: Config, seed: int, record: bool = False
) -> Trained:
    """pyro_flows' NPE with its defaults (or sbi's recipe, ``cfg.recipe == "sbi"``); ``record``: keep snapshots."""
    torch.manual_seed(seed)  # the initial weights, as for sbi
    start = time.perf_counter()
    npe = pyro_flows_npe(flow, task, cfg).append_simulations(theta, x)
    assert npe.estimator is not None
    snapshots = Snapshots(npe.estimator, start) if record else None
    hook = npe.estimator.embedding.register_forward_pre_hook(snapshots) if snapshots is not None else None
    options = dict(SBI_RECIPE) if cfg.recipe == "sbi" and flow != "cnf" else {}
    if cfg.max_epochs is not None:
        options["max_epochs"] = cfg.max_epochs
    npe.train(seed=seed, progress=False, **options)
    seconds = time.perf_counter() - start - (snapshots.overhead if snapshots is not None else 0.0)
    if hook is not None:
        hook.remove()

    def sample(x_obs: Tensor, n: int) -> Tensor:
        with torch.no_grad():
            posterior = npe.posterior(x_obs)
            if posterior.reject:
                trained.acceptance.append(float(posterior.acceptance))
            return posterior.sample((n,))

    assert npe.history is not None
    params = sum(p.numel() for p in npe.estimator.parameters())
    trained = Trained(sample, seconds, len(npe.history.train_loss), params, snapshots)
    return trained


def train_sbi(flow: str, task: Task, theta: Tensor, x: Tensor, cfg: Config, seed: int, record: bool = False) -> Trained:
    """sbi's NPE (``maf``, ``nsf``: the shared architecture) or FMPE (``cnf``: its defaults), its training defaults."""
    from sbi.inference import FMPE, NPE
    from sbi.neural_nets import posterior_nn

    torch.manual_seed(seed)
    start = time.perf_counter()
    if flow == "cnf":
        inference = FMPE(prior=task.prior, show_progress_bars=False)
    else:
        builder = posterior_nn(
            model=SBI_MODEL[flow],
            hidden_features=cfg.hidden,
            num_transforms=cfg.transforms,
            num_bins=cfg.bins,
            tail_bound=cfg.bound,
            num_blocks=cfg.blocks,
        )
        inference = NPE(prior=task.prior, density_estimator=builder, show_progress_bars=False)
    epochs = {} if cfg.max_epochs is None else {"max_num_epochs": cfg.max_epochs - 1}  # sbi runs one more
    with contextlib.redirect_stdout(io.StringIO()):  # sbi prints "converged after N epochs" itself
        estimator = inference.append_simulations(theta, x).train(**epochs)
    seconds = time.perf_counter() - start
    posterior = inference.build_posterior(estimator)

    def sample(x_obs: Tensor, n: int) -> Tensor:
        return posterior.sample((n,), x=x_obs, show_progress_bars=False)

    epochs_run = inference._summary["epochs_trained"][-1]  # sbi keeps its training summary in this dict
    return Trained(sample, seconds, epochs_run, sum(p.numel() for p in estimator.parameters()))


TRAIN = {"pyro_flows": train_pyro_flows, "sbi": train_sbi}


# -- scoring -------------------------------------------------------------------------------------------


def c2st_to_truth(trained: Trained, task: Task, observations: Tensor, samples: int, seed: int) -> list[float]:
    """C2ST accuracy between the estimator's and the exact posterior's samples, per observation."""
    import pyro_flows as pf

    scores = []
    for i, x_obs in enumerate(observations):
        torch.manual_seed(seed + i)
        estimated = trained.sample(x_obs, samples).double()
        exact = task.reference_posterior(x_obs, samples, seed + i).double()
        scores.append(float(pf.diagnostics.c2st(estimated, exact)))
    return scores


def time_to_reach(
    trained: Trained, target: float, task: Task, observations: Tensor, samples: int, seed: int
) -> Optional[float]:
    """Seconds into training of the first of pyro_flows' weight copies at the fractions SCAN of the run (then the
    final weights) whose mean C2ST is at most ``target``; None when none reaches it. The final weights are put
    back."""
    snapshots = trained.snapshots
    if snapshots is None:
        raise ValueError("time_to_reach needs the snapshots of a pyro_flows run (record=True)")
    final = [p.detach().clone() for p in snapshots.parameters]
    picked = sorted({round(f * (len(snapshots.taken) - 1)) for f in SCAN}) if snapshots.taken else []
    try:
        for index in picked:
            seconds, state = snapshots.taken[index]
            snapshots.load(state)
            if statistics.fmean(c2st_to_truth(trained, task, observations, samples, seed)) <= target:
                return seconds
    finally:
        snapshots.load(final)
    score = statistics.fmean(c2st_to_truth(trained, task, observations, samples, seed))
    return trained.seconds if score <= target else None


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One task, flow and library: per repeat, the training seconds, epochs, C2ST and (pyro_flows) the seconds to
    reach sbi's C2ST; or why it is n/a."""

    task: str
    flow: str
    lib: str
    seconds: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    c2st: list[float] = field(default_factory=list)
    reach: list[Optional[float]] = field(default_factory=list)
    params: Optional[int] = None
    error: Optional[str] = None

    @property
    def time(self) -> Optional[float]:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def epoch_time(self) -> Optional[float]:
        """Median seconds per epoch (validation included)."""
        if not self.seconds:
            return None
        return statistics.median(s / e for s, e in zip(self.seconds, self.epochs, strict=True))

    @property
    def reach_time(self) -> Optional[float]:
        """Median seconds to reach sbi's C2ST, over the repeats that reached it (None if none did)."""
        reached = [s for s in self.reach if s is not None]
        return statistics.median(reached) if reached else None

    @property
    def accuracy(self) -> Optional[float]:
        return statistics.fmean(self.c2st) if self.c2st else None

    @property
    def accuracy_std(self) -> float:
        return statistics.stdev(self.c2st) if len(self.c2st) > 1 else 0.0


def fit_and_score(
    result: Result, task: Task, cfg: Config, observations: Tensor, repeat: int, record: bool = False
) -> Optional[Trained]:
    """One timed fit and its C2ST into ``result``; a failure marks the row n/a with the error (others go on)."""
    theta, x = task.simulations(cfg.simulations, seed=repeat)
    try:
        trained = TRAIN[result.lib](result.flow, task, theta, x, cfg, repeat, record)
        score = statistics.fmean(c2st_to_truth(trained, task, observations, cfg.samples, seed=100 * repeat))
    except Exception as error:  # noqa: BLE001 - a library's failure is reported, not raised
        result.error = f"{type(error).__name__}: {error}"
        return None
    if not math.isfinite(score):
        result.error = f"non-finite C2ST {score}"
        return None
    result.seconds.append(trained.seconds)
    result.epochs.append(trained.epochs)
    result.c2st.append(score)
    result.params = trained.params
    return trained


def warm_up(task: Task, flows: Sequence[str], libs: Sequence[str], cfg: Config) -> None:
    """Untimed 2-epoch fits of every library and flow on at most 1000 simulations (imports, allocator, caches)."""
    theta, x = task.simulations(min(cfg.simulations, 1000), seed=0)
    short = replace(cfg, max_epochs=2)
    for flow in flows:
        for lib in libs:
            with contextlib.suppress(Exception):  # a failure shows in the timed fit
                TRAIN[lib](flow, task, theta, x, short, 0).sample(x[0], 10)


def run(
    tasks: Sequence[str] = TASKS,
    flows: Sequence[str] = FLOWS,
    libs: Sequence[str] = LIBS,
    threads: int = 1,
    repeats: int = 1,
    cfg: Config = Config(),
    warmup: bool = True,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Fit every library and flow ``repeats`` times per task, interleaved; every (task, flow, library) of
    ``tasks`` x FLOWS x LIBS gets a row."""
    results = {(t, f, lib): Result(t, f, lib) for t in tasks for f in FLOWS for lib in LIBS}
    for (_, flow, lib), result in results.items():
        result.error = "not run" if flow not in flows or lib not in libs else available(lib)
    runnable = [lib for lib in LIBS if lib in libs and available(lib) is None]
    previous_threads = torch.get_num_threads()
    set_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sbi's deprecation and convergence messages
            for name in tasks:
                task = make_task(name, cfg)
                observations = task.simulations(cfg.observations, seed=1)[1]
                if warmup:
                    warm_up(task, flows, runnable, cfg)
                for repeat in range(repeats):
                    for flow in flows:
                        run_flow(results, name, flow, task, runnable, cfg, observations, repeat, log)
    finally:
        torch.set_num_threads(previous_threads)
    return list(results.values())


def run_flow(
    results: dict[tuple[str, str, str], Result],
    name: str,
    flow: str,
    task: Task,
    runnable: Sequence[str],
    cfg: Config,
    observations: Tensor,
    repeat: int,
    log: Callable[[str], None],
) -> None:
    """One repeat of one task and flow: the libraries in turn (order rotated by ``repeat``), then pyro_flows'
    time to sbi's C2ST of this repeat."""
    shift = repeat % max(1, len(runnable))
    trained: dict[str, Trained] = {}
    for lib in [*runnable[shift:], *runnable[:shift]]:
        result = results[name, flow, lib]
        if result.error is not None:
            continue
        record = cfg.time_to_quality and lib == "pyro_flows" and "sbi" in runnable
        done = fit_and_score(result, task, cfg, observations, repeat, record)
        if done is None:
            log(f"{name} repeat {repeat} {flow} {lib:10s} failed: {result.error}")
            continue
        trained[lib] = done
        accepted = done.acceptance[: len(observations)]  # the final weights' posteriors, scored first
        rejection = f", acceptance {min(accepted):.3f}-{max(accepted):.3f}" if accepted else ""
        log(
            f"{name} repeat {repeat} {flow} {lib:10s} {done.seconds:6.1f} s, {done.epochs:3d} epochs, "
            f"C2ST {result.c2st[-1]:.3f}{rejection}"
        )
    if "pyro_flows" in trained and "sbi" in trained and trained["pyro_flows"].snapshots is not None:
        ours, target = results[name, flow, "pyro_flows"], results[name, flow, "sbi"].c2st[-1]
        reach = time_to_reach(trained["pyro_flows"], target, task, observations, cfg.samples, 100 * repeat)
        ours.reach.append(reach)
        log(f"{name} repeat {repeat} {flow} pyro_flows reached sbi's C2ST {target:.3f} at " + _seconds(reach))


def _seconds(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _reach(result: Result) -> Optional[str]:
    """The median time to sbi's C2ST, with how many repeats reached it when some did not."""
    reached = sum(s is not None for s in result.reach)
    if result.reach_time is None:
        return None
    return f"{result.reach_time:.1f}" + (
        f" ({reached} of {len(result.reach)} repeats)" if reached < len(result.reach) else ""
    )


def _ratio(peer: Optional[float], ours: Optional[float]) -> Optional[str]:
    return None if peer is None or not ours else f"{peer / ours:.2f}×"


HEADER = (
    "task", "flow", "library", "params", "C2ST", "epochs", "train time (s)", "s / epoch",
    "time to sbi's C2ST (s)", "sbi / pf time", "sbi / pf to sbi's C2ST",
)  # fmt: skip


def table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per (task, flow, library). In pyro_flows' rows, ``sbi / pf time`` is sbi's median
    training time over pyro_flows' (above 1: pyro_flows faster) and ``sbi / pf to sbi's C2ST`` sbi's training time
    over pyro_flows' median time to reach sbi's C2ST (issue 17.3: >= 1). ``cnf`` is sbi's FMPE in sbi's rows."""
    rows = []
    peers = {(r.task, r.flow): r for r in results if r.lib == "sbi"}
    for r in results:
        label = "FMPE" if r.flow == "cnf" and r.lib == "sbi" else r.flow
        if r.error is not None or not r.seconds:
            rows.append([r.task, label, r.lib, *[None] * (len(HEADER) - 3)])
            continue
        assert r.time is not None and r.epoch_time is not None and r.accuracy is not None
        spread = f" ± {r.accuracy_std:.3f}" if len(r.c2st) > 1 else ""
        peer = peers.get((r.task, r.flow))
        peer_time = peer.time if peer is not None and peer.error is None else None
        ours = r.lib == "pyro_flows"
        reach = _reach(r) if ours else "—"
        cells = [r.task, label, r.lib, f"{r.params:,}", f"{r.accuracy:.3f}{spread}", f"{statistics.median(r.epochs):g}"]
        cells += [f"{r.time:.1f}", f"{r.epoch_time:.3f}", reach]
        cells += [_ratio(peer_time, r.time), _ratio(peer_time, r.reach_time)] if ours else ["—", "—"]
        rows.append(cells)
    return markdown_table(HEADER, rows, align="lllrlrrrrrr")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to run")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS), help="flows to compare")
    parser.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS), help="libraries to run")
    parser.add_argument("--recipe", choices=RECIPES, default="defaults", help="pyro_flows' training recipe")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="fits per task, flow and library (default 1)")
    parser.add_argument("--simulations", type=int, help=f"training pairs (default {Config.simulations})")
    parser.add_argument("--max-epochs", type=int, help="epoch cap of both libraries (default: each library's own)")
    parser.add_argument("--observations", type=int, help=f"observations scored (default {Config.observations})")
    parser.add_argument("--samples", type=int, help=f"posterior samples per C2ST (default {Config.samples})")
    parser.add_argument("--no-time-to-quality", action="store_true", help="skip pyro_flows' time to sbi's C2ST")
    parser.add_argument("--quick", action="store_true", help="tiny budget (seconds; for the test)")
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in ("simulations", "max_epochs", "observations", "samples")
        if getattr(args, name) is not None
    }
    cfg = replace(QUICK if args.quick else Config(), recipe=args.recipe, **overrides)
    cfg = replace(cfg, time_to_quality=not args.no_time_to_quality)
    if cfg.max_epochs is not None and cfg.max_epochs < 2:
        parser.error(f"--max-epochs must be at least 2 (sbi always runs max_num_epochs + 1 >= 2), got {cfg.max_epochs}")
    set_threads(args.threads)
    epochs = "each library's epoch cap" if cfg.max_epochs is None else f"<= {cfg.max_epochs} epochs"
    print(
        f"{machine_line()}; sbi {version('sbi')}; tasks {', '.join(args.tasks)}, {cfg.simulations} simulations; "
        f"maf/nsf: {cfg.transforms} layers, hidden {cfg.hidden} x {cfg.blocks + 1}, tanh, {cfg.bins} bins on "
        f"[-{cfg.bound:g}, {cfg.bound:g}]; pyro_flows' recipe: {cfg.recipe}; {epochs}; C2ST on {cfg.samples} "
        f"samples x {cfg.observations} observation(s); {args.repeats} repeat(s)",
        flush=True,
    )
    results = run(args.tasks, args.flows, args.libs, args.threads, args.repeats, cfg, warmup=not args.quick)
    print()
    print(table(results))
    print(f"\n{machine_line()} (at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
