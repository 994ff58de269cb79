"""Neural posterior estimation benchmark: pyro_flows' NPE against the ``sbi`` package's, at equal simulations.

The task is linear-Gaussian, so the true posterior is known in closed form:

.. math::
    \\theta \\sim \\mathcal{N}(0, I_D), \\qquad x \\mid \\theta \\sim \\mathcal{N}(A\\theta, \\sigma^2 I_D), \\qquad
    \\theta \\mid x \\sim \\mathcal{N}\\big(\\Sigma A^\\top x / \\sigma^2,\\ \\Sigma\\big),\\quad
    \\Sigma = (I + A^\\top A / \\sigma^2)^{-1},

with a fixed random mixing matrix :math:`A` (entries :math:`\\mathcal{N}(0, 1/D)`, seed 0), so the
posterior is correlated. Both libraries get, in each repeat, the *same* simulations
(``--simulations`` pairs drawn with the repeat's seed) and the same recipe:

* architecture, matched layer for layer: ``maf`` is sbi's ``posterior_nn("maf")`` (nflows
  ``MaskedAffineAutoregressiveTransform``) against ``pf.infer.NPE(flow="maf")``; ``nsf`` is sbi's
  ``posterior_nn("maf_rqs")`` (nflows ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``,
  linear tails) against ``pf.infer.NPE(flow="nsf")`` (autoregressive, identity tails). Both: 5
  layers, MADE conditioners with 3 hidden layers of 50 units (sbi's ``hidden_features=50,
  num_blocks=2``) and tanh, the context fed to the first hidden layer, a random permutation between
  layers, splines with 10 bins on [-3, 3]; θ and x z-scored from the simulations. The script prints
  both parameter counts;
* training: Adam, batch 200, learning rate 5e-4 and gradient clipping at norm 5 (sbi's defaults),
  10 % of the pairs held out for validation, at most ``--max-epochs`` epochs, early stopping after
  ``--patience`` epochs without a better validation loss and the best epoch's weights restored
  (sbi runs ``max_num_epochs + 1`` epochs, so it is given ``--max-epochs`` − 1);
* metrics: the training wall time (from building the estimator to the trained one; simulating is
  not included), the epochs run and the time per epoch, and the accuracy of a classifier
  two-sample test (C2ST, ``pf.diagnostics.c2st`` for both libraries, 0.5 is perfect) between
  ``--samples`` posterior samples and as many samples of the analytic posterior, averaged over
  ``--observations`` observations drawn from the prior predictive (seed 1).

Each library trains once untimed (a few epochs) to warm up. Then the fits run ``--repeats``
times, the libraries in turn within a repeat and the order rotated between repeats, so that slow
drifts of a busy machine hit both alike; the table shows the median time and the mean C2ST
(± standard deviation over repeats). The torch thread count is fixed (``--threads``, default 1).
A library that is not installed (sbi) is reported as ``n/a``.

``--task two_moons`` measures flow-matching NPE instead: ``pf.infer.NPE(prior, flow="cnf")`` and sbi's
``FMPE``, each with *its own defaults* (network, objective, epochs), on the SBI benchmark's two moons
(:class:`TwoMoonsTask`) with ``--simulations`` (default 10⁴) prior simulations; the C2ST of ``--samples``
posterior draws against as many exact reference draws (by inverting the simulator and rejecting outside the
prior's box), per observation, for ``--observations`` (default 5) prior-predictive observations (seed 1), and
their mean. This is the measurement behind :attr:`pyro_flows.infer.NPE.cnf_defaults` (issue 15.6: C2ST <= 0.6).

Usage::

    python benchmarks/bench_sbi.py                                  # both flows, 3 repeats (~20 minutes, 2 busy cores)
    python benchmarks/bench_sbi.py --task two_moons                 # flow-matching NPE, 10^4 simulations
    python benchmarks/bench_sbi.py --flows maf --repeats 1
    python benchmarks/bench_sbi.py --quick --libs pyro_flows         # seconds (the test)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

LIBS = ("pyro_flows", "sbi")
FLOWS = ("maf", "nsf")
SBI_MODEL = {"maf": "maf", "nsf": "maf_rqs"}  # sbi's autoregressive twins of pf's MAF and NSF


@dataclass(frozen=True)
class Config:
    """The task, the architecture and the training recipe shared by both libraries."""

    dim: int = 5
    noise: float = 0.3
    simulations: int = 5000
    transforms: int = 5
    hidden: int = 50
    blocks: int = 2  # sbi's num_blocks: hidden layers after the first, so 3 hidden layers of `hidden` units
    bins: int = 10
    bound: float = 3.0
    batch_size: int = 200
    lr: float = 5e-4
    validation_fraction: float = 0.1
    max_epochs: int = 200
    patience: int = 20
    observations: int = 3
    samples: int = 1000


QUICK = Config(simulations=400, max_epochs=3, patience=2, observations=1, samples=200)


# -- the task ----------------------------------------------------------------------------------------


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


# -- the libraries -------------------------------------------------------------------------------------


def available(lib: str) -> Optional[str]:
    """None if ``lib`` can run, else why not."""
    return None if importlib.util.find_spec(lib) is not None else "not installed"


@dataclass
class Trained:
    """A trained estimator: its posterior sampler ``sample(x_obs, n) -> (n, D)``, cost and size."""

    sample: Callable[[Tensor, int], Tensor]
    seconds: float
    epochs: int
    params: int


def train_pyro_flows(flow: str, task: LinearGaussianTask, theta: Tensor, x: Tensor, cfg: Config, seed: int) -> Trained:
    import pyro_flows as pf

    torch.manual_seed(seed)  # the initial weights, as for sbi
    start = time.perf_counter()
    npe = pf.infer.NPE(
        task.prior,
        flow=flow,
        transforms=cfg.transforms,
        hidden=(cfg.hidden,) * (cfg.blocks + 1),
        activation=nn.Tanh,
        mixing="random",
        **({"bins": cfg.bins, "bound": cfg.bound} if flow == "nsf" else {}),
    )
    npe.append_simulations(theta, x).train(
        max_epochs=cfg.max_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        validation_fraction=cfg.validation_fraction,
        patience=cfg.patience,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - start

    def sample(x_obs: Tensor, n: int) -> Tensor:
        with torch.no_grad():
            return npe.posterior(x_obs).sample((n,))

    epochs = len(npe.history.validation_loss)
    return Trained(sample, seconds, epochs, sum(p.numel() for p in npe.estimator.parameters()))


def train_sbi(flow: str, task: LinearGaussianTask, theta: Tensor, x: Tensor, cfg: Config, seed: int) -> Trained:
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn

    torch.manual_seed(seed)
    start = time.perf_counter()
    builder = posterior_nn(
        model=SBI_MODEL[flow],
        hidden_features=cfg.hidden,
        num_transforms=cfg.transforms,
        num_bins=cfg.bins,
        tail_bound=cfg.bound,
        num_blocks=cfg.blocks,
    )
    inference = NPE(prior=task.prior, density_estimator=builder, show_progress_bars=False)
    with contextlib.redirect_stdout(io.StringIO()):  # sbi prints "converged after N epochs" itself
        estimator = inference.append_simulations(theta, x).train(
            training_batch_size=cfg.batch_size,
            learning_rate=cfg.lr,
            validation_fraction=cfg.validation_fraction,
            stop_after_epochs=cfg.patience,
            max_num_epochs=cfg.max_epochs - 1,  # sbi counts epochs from 0 and runs epoch max_num_epochs too
            clip_max_norm=5.0,
        )
    seconds = time.perf_counter() - start
    posterior = inference.build_posterior(estimator)

    def sample(x_obs: Tensor, n: int) -> Tensor:
        return posterior.sample((n,), x=x_obs, show_progress_bars=False)

    epochs = inference._summary["epochs_trained"][-1]  # sbi keeps its training summary in this dict
    return Trained(sample, seconds, epochs, sum(p.numel() for p in estimator.parameters()))


TRAIN = {"pyro_flows": train_pyro_flows, "sbi": train_sbi}


# -- flow-matching NPE on two moons, each library with its own defaults ----------------------------------------------


@dataclass(frozen=True)
class MoonsConfig:
    """Flow-matching NPE on two moons: simulations, scoring, and (None: the library's default) an epoch cap."""

    simulations: int = 10_000
    observations: int = 5
    samples: int = 1000
    max_epochs: Optional[int] = None


MOONS_QUICK = MoonsConfig(simulations=500, observations=1, samples=200, max_epochs=2)


def train_pyro_flows_fmpe(task: TwoMoonsTask, theta: Tensor, x: Tensor, cfg: MoonsConfig, seed: int) -> Trained:
    """``pf.infer.NPE(prior, flow="cnf")`` with every default (network, flow matching, training options)."""
    import pyro_flows as pf

    torch.manual_seed(seed)
    start = time.perf_counter()
    npe = pf.infer.NPE(task.prior, flow="cnf").append_simulations(theta, x)
    epochs = {} if cfg.max_epochs is None else {"max_epochs": cfg.max_epochs}
    npe.train(seed=seed, progress=False, **epochs)
    seconds = time.perf_counter() - start

    def sample(x_obs: Tensor, n: int) -> Tensor:
        with torch.no_grad():
            return npe.posterior(x_obs).sample((n,))

    assert npe.history is not None and npe.estimator is not None
    params = sum(p.numel() for p in npe.estimator.parameters())
    return Trained(sample, seconds, len(npe.history.train_loss), params)


def train_sbi_fmpe(task: TwoMoonsTask, theta: Tensor, x: Tensor, cfg: MoonsConfig, seed: int) -> Trained:
    """sbi's flow-matching posterior estimation (``sbi.inference.FMPE``) with its defaults."""
    from sbi.inference import FMPE

    torch.manual_seed(seed)
    start = time.perf_counter()
    inference = FMPE(prior=task.prior, show_progress_bars=False)
    epochs = {} if cfg.max_epochs is None else {"max_num_epochs": cfg.max_epochs - 1}
    with contextlib.redirect_stdout(io.StringIO()):
        estimator = inference.append_simulations(theta, x).train(**epochs)
    seconds = time.perf_counter() - start
    posterior = inference.build_posterior(estimator)

    def sample(x_obs: Tensor, n: int) -> Tensor:
        return posterior.sample((n,), x=x_obs, show_progress_bars=False)

    epochs_run = inference._summary["epochs_trained"][-1]
    return Trained(sample, seconds, epochs_run, sum(p.numel() for p in estimator.parameters()))


TRAIN_FMPE = {"pyro_flows": train_pyro_flows_fmpe, "sbi": train_sbi_fmpe}


def run_moons(
    libs: Sequence[str] = LIBS,
    threads: int = 1,
    repeats: int = 1,
    cfg: MoonsConfig = MoonsConfig(),
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Flow-matching NPE (each library's defaults) on two moons: C2ST against exact reference draws, averaged over
    ``cfg.observations`` prior-predictive observations (seed 1); every library of LIBS gets a row (flow "cnf")."""
    task = TwoMoonsTask()
    observations = task.simulations(cfg.observations, seed=1)[1]
    results = {lib: Result("cnf", lib) for lib in LIBS}
    for lib, result in results.items():
        result.error = "not run" if lib not in libs else available(lib)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for repeat in range(repeats):
                theta, x = task.simulations(cfg.simulations, seed=repeat)
                for lib, result in results.items():
                    if result.error is not None:
                        continue
                    try:
                        trained = TRAIN_FMPE[lib](task, theta, x, cfg, repeat)
                        scores = [
                            c2st_to_truth(trained, task, observations[i : i + 1], cfg.samples, 100 * repeat + i)
                            for i in range(len(observations))
                        ]
                    except Exception as error:  # noqa: BLE001 - a library's failure is reported, not raised
                        result.error = f"{type(error).__name__}: {error}"
                        log(f"repeat {repeat} {lib:10s} failed: {result.error}")
                        continue
                    result.seconds.append(trained.seconds)
                    result.epochs.append(trained.epochs)
                    result.c2st.append(statistics.fmean(scores))
                    result.params = trained.params
                    log(
                        f"repeat {repeat} cnf {lib:10s} {trained.seconds:6.1f} s, {trained.epochs:3d} epochs, "
                        f"C2ST per observation {[round(v, 3) for v in scores]}, mean {result.c2st[-1]:.3f}"
                    )
    finally:
        torch.set_num_threads(previous_threads)
    return list(results.values())


def c2st_to_truth(
    trained: Trained, task: LinearGaussianTask | TwoMoonsTask, observations: Tensor, samples: int, seed: int
) -> float:
    """Mean C2ST accuracy between the estimator's and the exact posterior's samples over ``observations``."""
    import pyro_flows as pf

    scores = []
    for i, x_obs in enumerate(observations):
        torch.manual_seed(seed + i)
        estimated = trained.sample(x_obs, samples).double()
        exact = task.reference_posterior(x_obs, samples, seed + i).double()
        scores.append(float(pf.diagnostics.c2st(estimated, exact)))
    return statistics.fmean(scores)


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One library and one flow: per repeat, the training seconds, epochs and C2ST; or why it is n/a."""

    flow: str
    lib: str
    seconds: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    c2st: list[float] = field(default_factory=list)
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
    def accuracy(self) -> Optional[float]:
        return statistics.fmean(self.c2st) if self.c2st else None

    @property
    def accuracy_std(self) -> float:
        return statistics.stdev(self.c2st) if len(self.c2st) > 1 else 0.0


def fit_and_score(
    result: Result, task: LinearGaussianTask, cfg: Config, observations: Tensor, repeat: int
) -> Optional[Trained]:
    """One timed fit and its C2ST into ``result``; a failure marks the row n/a with the error (others go on)."""
    theta, x = task.simulations(cfg.simulations, seed=repeat)
    try:
        trained = TRAIN[result.lib](result.flow, task, theta, x, cfg, repeat)
        score = c2st_to_truth(trained, task, observations, cfg.samples, seed=100 * repeat)
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


def run(
    flows: Sequence[str] = FLOWS,
    libs: Sequence[str] = LIBS,
    threads: int = 1,
    repeats: int = 3,
    cfg: Config = Config(),
    warmup: bool = True,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Fit every library and flow ``repeats`` times, interleaved; every (flow, library) of FLOWS x LIBS gets a row."""
    task = LinearGaussianTask(cfg.dim, cfg.noise)
    observations = task.simulate(task.prior.sample((cfg.observations,)), torch.Generator().manual_seed(1))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = {(flow, lib): Result(flow, lib) for flow in FLOWS for lib in LIBS}
    for (flow, lib), result in results.items():
        result.error = "not run" if flow not in flows or lib not in libs else available(lib)
    runnable = [lib for lib in LIBS if lib in libs and available(lib) is None]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sbi's deprecation and convergence messages
            if warmup:
                short = replace(cfg, simulations=min(cfg.simulations, 1000), max_epochs=2, observations=1, samples=100)
                for flow in flows:
                    for lib in runnable:
                        result = results[flow, lib]
                        fit_and_score(result, task, short, observations[:1], repeat=0)
                        result.seconds.clear(), result.epochs.clear(), result.c2st.clear()
            for repeat in range(repeats):
                shift = repeat % max(1, len(runnable))
                for flow in flows:
                    for lib in runnable[shift:] + runnable[:shift]:
                        result = results[flow, lib]
                        if result.error is not None:
                            continue
                        fit_and_score(result, task, cfg, observations, repeat)
                        if result.error is None:
                            log(
                                f"repeat {repeat} {flow} {lib:10s} {result.seconds[-1]:6.1f} s, "
                                f"{result.epochs[-1]:3d} epochs, C2ST {result.c2st[-1]:.3f}"
                            )
                        else:
                            log(f"repeat {repeat} {flow} {lib:10s} failed: {result.error}")
    finally:
        torch.set_num_threads(previous_threads)
    return list(results.values())


def table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per (flow, library); ``pf speed-up`` is sbi's median training time over
    pyro_flows' (above 1: pyro_flows faster), ``per epoch`` the same for the median time per epoch."""
    head = "| flow | library | params | C2ST | epochs | train time (s) | s / epoch | pf speed-up | per epoch |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ours = {r.flow: r for r in results if r.lib == "pyro_flows"}
    for r in results:
        if r.error is not None or not r.seconds:
            lines.append(f"| {r.flow} | {r.lib} | " + " | ".join(["n/a"] * 7) + " |")
            continue
        spread = f" ± {r.accuracy_std:.3f}" if len(r.c2st) > 1 else ""
        base = ours.get(r.flow)
        if r.lib != "pyro_flows" and base is not None and base.seconds:
            speed, per_epoch = f"{r.time / base.time:.2f}×", f"{r.epoch_time / base.epoch_time:.2f}×"
        else:
            speed = per_epoch = "—" if r.lib == "pyro_flows" else "n/a"
        epochs = statistics.median(r.epochs)
        cells = [r.flow, r.lib, f"{r.params:,}", f"{r.accuracy:.3f}{spread}", f"{epochs:g}"]
        cells += [f"{r.time:.1f}", f"{r.epoch_time:.3f}", speed, per_epoch]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task",
        choices=("linear_gaussian", "two_moons"),
        default="linear_gaussian",
        help="linear_gaussian: MAF/NSF against sbi; two_moons: flow-matching NPE (flow='cnf'), each library's defaults",
    )
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS), help="flows to compare")
    parser.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS), help="libraries to run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="fits per library and flow (default 3, quick 1)")
    parser.add_argument("--simulations", type=int, help=f"training pairs (default {Config.simulations})")
    parser.add_argument("--max-epochs", type=int, help=f"epoch cap (default {Config.max_epochs})")
    parser.add_argument("--patience", type=int, help=f"early-stopping patience (default {Config.patience})")
    parser.add_argument("--observations", type=int, help=f"observations scored (default {Config.observations})")
    parser.add_argument("--samples", type=int, help=f"posterior samples per C2ST (default {Config.samples})")
    parser.add_argument("--quick", action="store_true", help="tiny budget (seconds; for the test)")
    args = parser.parse_args(argv)
    if args.task == "two_moons":
        return main_moons(args)
    overrides = {
        name: getattr(args, name)
        for name in ("simulations", "max_epochs", "patience", "observations", "samples")
        if getattr(args, name) is not None
    }
    cfg = replace(QUICK if args.quick else Config(), **overrides)
    if cfg.max_epochs < 2:
        parser.error(f"--max-epochs must be at least 2 (sbi always runs max_num_epochs + 1 >= 2), got {cfg.max_epochs}")
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); linear-Gaussian D={cfg.dim}, sigma={cfg.noise:g}, "
        f"{cfg.simulations} simulations; {cfg.transforms} layers, hidden {cfg.hidden} x {cfg.blocks + 1}, tanh, "
        f"{cfg.bins} bins on [-{cfg.bound:g}, {cfg.bound:g}]; batch {cfg.batch_size}, Adam lr {cfg.lr:g}, "
        f"validation {cfg.validation_fraction:g}, <= {cfg.max_epochs} epochs, patience {cfg.patience}; "
        f"C2ST on {cfg.samples} samples x {cfg.observations} observation(s); {repeats} repeat(s)",
        flush=True,
    )
    results = run(args.flows, args.libs, args.threads, repeats, cfg, warmup=not args.quick)
    print()
    print(table(results))
    return 0


def main_moons(args: argparse.Namespace) -> int:
    """``--task two_moons``: flow-matching NPE with the libraries' defaults, C2ST against exact draws."""
    overrides = {
        name: getattr(args, name)
        for name in ("simulations", "max_epochs", "observations", "samples")
        if getattr(args, name) is not None
    }
    cfg = replace(MOONS_QUICK if args.quick else MoonsConfig(), **overrides)
    repeats = args.repeats or 1
    epochs = "the library's default epochs" if cfg.max_epochs is None else f"<= {cfg.max_epochs} epochs"
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); two moons, {cfg.simulations} simulations; "
        f"flow-matching NPE with each library's defaults ({epochs}); C2ST on {cfg.samples} samples x "
        f"{cfg.observations} observation(s) against exact draws; {repeats} repeat(s)",
        flush=True,
    )
    results = run_moons(args.libs, args.threads, repeats, cfg)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
