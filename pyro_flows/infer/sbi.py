r"""Simulation-based inference: neural posterior estimation (NPE) with conditional flows.

Given a prior :math:`p(\theta)` and a simulator :math:`x \sim p(x \mid \theta)` with no tractable
likelihood, NPE fits a conditional flow :math:`q_\phi(\theta \mid x)` to simulated pairs
:math:`(\theta_n, x_n)` by maximum likelihood, :math:`\min_\phi -\frac1N\sum_n \log q_\phi(\theta_n \mid x_n)`,
whose minimiser over pairs drawn from :math:`p(\theta)p(x\mid\theta)` is the posterior
:math:`p(\theta \mid x)` (Papamakarios & Murray 2016). Sequential rounds draw :math:`\theta` from a
proposal :math:`\tilde p(\theta)` (the previous round's posterior at :math:`x_o`) and use the atomic
APT loss (Greenberg et al. 2019), which still makes :math:`q_\phi` the posterior without any correction.

The flow lives in a standardised parameter space and its samples always lie in the prior's support, by one of
two parameterisations (``NPE(constraint=...)``): ``"reject"`` fits θ itself (z-scored) and rejects the draws outside
the support, renormalising the density by the estimated acceptance (as sbi does); ``"bijection"`` fits the
unconstrained :math:`b^{-1}(\theta)` with :math:`b` = ``biject_to(prior.support)`` and pushes draws through
:math:`b` (with its log-det). The default rejects for a box (interval) prior, where the bijection's sigmoid warps
the posterior (measured on two moons), and keeps the bijection for the other supports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union, cast

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform, biject_to, constraints

from .. import saving
from .. import transforms as T
from ..flows import Flow, FlowDistribution, build_flow
from ..flows.registry import check_flow_name
from ..objectives import FlowMatching, continuous_flow_of
from ..train import FitHistory, FitOptions, Objective, fit
from ..utils import PathLike, check_finite_rows, seeded_rng
from .simulation import check_prior

FlowBuilder = Callable[[int, int], Flow]
CONTINUOUS_FLOWS = ("cnf", "ffjord")
CONSTRAINTS = ("auto", "reject", "bijection")
# supports of full dimension, on which the flow can model θ itself and reject what falls outside
_FULL = (
    constraints._Real, constraints._Interval, constraints._HalfOpenInterval, constraints._GreaterThan,
    constraints._GreaterThanEq, constraints._LessThan,
)  # fmt: skip
_BOX = (constraints._Interval, constraints._HalfOpenInterval)


# --------------------------------------------------------------------------- checks


def prior_support(prior: Distribution) -> constraints.Constraint:
    """The prior's support (torch types it Optional; every distribution :func:`check_prior` accepts has one)."""
    support = prior.support
    if support is None:
        raise ValueError(f"the prior {prior!r} declares no support")
    return support


def _base_support(prior: Distribution) -> constraints.Constraint:
    """The prior's support without its ``independent`` wrapping (the constraint of one coordinate)."""
    support = prior_support(prior)
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def resolve_constraint(prior: Distribution, constraint: str, flow: object = None) -> str:
    """``"reject"`` or ``"bijection"``: how the posterior of ``flow`` keeps its samples in the prior's support.

    ``"auto"`` rejects for a box prior (every coordinate in an interval) unless ``flow`` names a continuous flow,
    whose defaults were measured with the bijection; a real support has nothing to reject (``"bijection"``, the
    identity). ``"reject"`` needs a support of full dimension (real, interval, half-line): a ValueError otherwise.
    """
    if constraint not in CONSTRAINTS:
        raise ValueError(f"NPE: constraint must be one of {', '.join(map(repr, CONSTRAINTS))}, got {constraint!r}")
    base = _base_support(prior)
    if isinstance(base, constraints._Real):
        return "bijection"
    if constraint == "auto":
        return "reject" if isinstance(base, _BOX) and flow not in CONTINUOUS_FLOWS else "bijection"
    if constraint == "reject" and not isinstance(base, _FULL):
        raise ValueError(
            f"NPE: constraint='reject' fits θ in its own space, which needs a support of full dimension (real, an "
            f"interval or a half-line), but the prior's support is {prior.support}; use constraint='bijection'"
        )
    return constraint


def _check_theta(theta: Tensor, prior: Distribution, name: str) -> None:
    """Rows ``(N, D)`` of finite θ inside the prior's support."""
    if not isinstance(theta, Tensor) or theta.dim() != 2 or theta.shape[1:] != prior.event_shape:
        shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"{name}: θ must have shape (N, {prior.event_shape[0]}), got {shape}")
    check_finite_rows(theta, f"{name}: θ")
    outside = ~prior_support(prior).check(theta)
    if bool(outside.any()):
        rows = torch.nonzero(outside).flatten()
        raise ValueError(
            f"{name}: {len(rows)} θ rows lie outside the prior's support {prior.support} "
            f"(rows {rows[:10].tolist()}, e.g. {theta[rows[0]].tolist()})"
        )


# --------------------------------------------------------------------------- the estimator


class PosteriorEstimator(nn.Module):
    r"""The network of NPE: :math:`q(\theta \mid x)` as one ``nn.Module`` (``state_dict``, ``.to``).

    .. math:: c = e\big((x - \mu_x) / \sigma_x\big), \qquad
              \theta = b\big(\mu_u + \sigma_u \odot f(z; c)\big), \quad z \sim \mathcal N(0, I),

    with :math:`e` the embedding network, :math:`f` the conditional flow (its layers base→data),
    :math:`(\mu_u, \sigma_u)` the z-scoring of the unconstrained parameters
    :math:`u = b^{-1}(\theta)` (a :class:`~pyro_flows.transforms.Standardize`) and
    :math:`b` = ``biject_to(prior.support)``, or the identity when the posterior rejects draws outside the support
    (``NPE(constraint="reject")``: then the flow's mass may leak out of it). ``forward(x)`` with ``x`` of shape
    ``(*batch, *x_shape)`` returns the :class:`~pyro_flows.FlowDistribution` over θ with
    batch shape ``batch`` (its ``log_prob`` includes every log-det).

    Args:
        flow: a conditional :class:`~pyro_flows.Flow` on the ``U``-dimensional unconstrained space.
        embedding: maps standardised ``x (B, *x_shape)`` to the context ``(B, flow.context_features)``.
        x_loc, x_scale: the z-scoring of ``x``, shape ``x_shape``.
        theta_standardize: the z-scoring of the unconstrained θ.
        bijection: unconstrained → support (the identity ``biject_to(constraints.real_vector)`` when rejecting).
    """

    x_loc: Tensor
    x_scale: Tensor

    def __init__(
        self,
        flow: Flow,
        embedding: nn.Module,
        x_loc: Tensor,
        x_scale: Tensor,
        theta_standardize: T.Standardize,
        bijection: Transform,
    ) -> None:
        super().__init__()
        self.flow, self.embedding = flow, embedding
        self.theta_standardize, self.bijection = theta_standardize, bijection
        self.register_buffer("x_loc", x_loc.clone())
        self.register_buffer("x_scale", x_scale.clone())

    @property
    def x_shape(self) -> torch.Size:
        return self.x_loc.shape

    def context(self, x: Tensor) -> Tensor:
        """The flow's context for ``x (*batch, *x_shape)``: shape ``(*batch, C)``."""
        batch = x.shape[: x.dim() - len(self.x_shape)]
        c = self.embedding(((x - self.x_loc) / self.x_scale).reshape(-1, *self.x_shape))
        return c.reshape(*batch, c.shape[-1])

    def unconstrained(self, theta: Tensor) -> Tensor:
        """The standardised unconstrained parameters :math:`(b^{-1}(\\theta) - \\mu_u) / \\sigma_u`."""
        return self.theta_standardize.inv(self.bijection.inv(theta))

    def forward(self, x: Tensor) -> FlowDistribution:
        base, transforms = self.flow.base_and_transforms(self.context(x))
        return FlowDistribution(base, [*transforms, self.theta_standardize, self.bijection])


class NPEPosterior(Distribution):
    r"""The posterior :math:`q(\theta \mid x_o)` of an :class:`NPE`: ``sample``, ``log_prob``, ``rsample``.

    Batch shape: that of ``x_o`` (``()`` for one observation, ``(B,)`` for ``B`` of them);
    event shape ``(D,)``; ``support`` is the prior's. ``log_prob`` is :math:`-\infty` for θ outside
    the prior's support and raises a ValueError for θ of the wrong shape or with NaN/inf entries; θ of another
    dtype or device is moved to the estimator's.

    With ``reject=True`` the estimator's flow :math:`\tilde q` models θ itself (``NPE(constraint="reject")``) and
    its mass may leak out of the support :math:`S`; the posterior is the flow truncated to :math:`S`,

    .. math:: q(\theta \mid x_o) = \frac{\tilde q(\theta \mid x_o)\, 1[\theta \in S]}{a(x_o)}, \qquad
              a(x_o) = \Pr_{\tilde q}(\theta \in S),

    sampled by rejection and normalised by the :attr:`acceptance` :math:`a`, estimated from
    :attr:`acceptance_samples` draws (seeded, so ``log_prob`` is deterministic; sbi's "leakage correction").
    Draws by rejection have no reparameterised gradient, so ``rsample`` is then refused.
    The distribution reads the estimator's current weights: training it further changes this object.
    """

    arg_constraints: dict = {}
    _DRAWS = 2**20  # draws of the flow at once, over all observations
    acceptance_samples: ClassVar[int] = 2**14
    """The flow draws from which :attr:`acceptance` is estimated (its standard error is at most 0.004)."""

    def __init__(self, estimator: PosteriorEstimator, x: Tensor, prior: Distribution, reject: bool = False) -> None:
        self.flow_distribution = estimator(x)
        self.prior, self.reject = prior, reject
        self.has_rsample = not reject
        bijection = biject_to(prior_support(prior))
        origin = torch.zeros(bijection.inverse_shape(prior.event_shape), dtype=x.dtype, device=x.device)
        self._inside = bijection(origin)  # a point of the support, evaluated in place of θ outside it
        self._acceptance: Optional[Tensor] = None
        super().__init__(self.flow_distribution.batch_shape, prior.event_shape, validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return prior_support(self.prior)

    @property
    def acceptance(self) -> Tensor:
        """The flow's mass inside the prior's support, per observation (batch shape): the rate at which ``sample``
        accepts draws; exactly 1 without rejection. Estimated once, from :attr:`acceptance_samples` seeded draws."""
        if self._acceptance is None:
            if not self.reject:
                self._acceptance = torch.ones(self.batch_shape, dtype=self._inside.dtype, device=self._inside.device)
            else:
                chunk = max(1, self._DRAWS // self.batch_shape.numel())  # bounded memory for many observations
                inside = torch.zeros(self.batch_shape, dtype=self._inside.dtype, device=self._inside.device)
                with torch.no_grad(), seeded_rng(0, self._inside.device):
                    for start in range(0, self.acceptance_samples, chunk):
                        draws = self.flow_distribution.sample((min(chunk, self.acceptance_samples - start),))
                        inside += self.support.check(draws).sum(0)
                self._acceptance = inside / self.acceptance_samples
        return self._acceptance

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        if self.reject:
            raise ValueError(
                "NPEPosterior.rsample: this posterior rejects the flow's draws outside the prior's support, and draws "
                "by rejection have no reparameterised gradient; use sample(), or NPE(..., constraint='bijection')"
            )
        return self.flow_distribution.rsample(torch.Size(sample_shape))

    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            if not self.reject:
                return self.flow_distribution.sample(shape)
            return self._reject(shape.numel()).reshape(*shape, *self.batch_shape, *self.event_shape)

    def _reject(self, n: int, max_draws: int = 2**22) -> Tensor:
        """``n`` draws per observation inside the support, shape ``(n, B, D)`` for the flattened batch ``B``; a
        ValueError when an observation's acceptance is so low that ``max_draws`` draws do not give them."""
        batch, dim = self.batch_shape.numel(), self.event_shape.numel()
        out = self._inside.new_empty(n, batch, dim)
        filled = torch.zeros(batch, dtype=torch.long, device=out.device)
        drawn, rate = 0, 1.0  # the lowest acceptance seen so far among the observations still short of n
        while int(filled.min()) < n:
            if drawn >= max_draws:
                raise ValueError(
                    f"NPEPosterior.sample: {drawn} draws of the flow gave fewer than {n} inside the prior's support "
                    f"{self.support} for some observation (acceptance {rate:.1e}); the estimator is not trained for "
                    "it (train longer, or check x_obs against the simulations)"
                )
            need = n - int(filled.min())
            count = min(math.ceil(1.2 * need / rate) + 16, max(need, self._DRAWS // batch), max_draws - drawn)
            draws = self.flow_distribution.sample((count,)).reshape(count, batch, dim)
            ok = self.support.check(draws.reshape(count, *self.batch_shape, dim)).reshape(count, batch)
            slot = filled + ok.long().cumsum(0) - 1  # where each accepted draw goes in its observation's column
            rows, cols = torch.nonzero(ok & (slot < n), as_tuple=True)
            out[slot[rows, cols], cols] = draws[rows, cols]
            short = filled < n
            rate = max(float(ok[:, short].double().mean(0).min()), 1.0 / (count + 1))
            drawn += count
            filled = (filled + ok.long().sum(0)).clamp(max=n)
        return out

    def sample_and_log_prob(self, sample_shape: Sequence[int] = torch.Size()) -> tuple[Tensor, Tensor]:
        """Samples and their log-densities (in one pass without rejection)."""
        if not self.reject:
            return self.flow_distribution.sample_and_log_prob(torch.Size(sample_shape))
        samples = self.sample(sample_shape)
        return samples, self.log_prob(samples)

    def log_prob(self, theta: Tensor) -> Tensor:
        if isinstance(theta, Tensor):
            theta = theta.to(self._inside)  # the estimator's dtype and device
        self.flow_distribution._check_value(theta)
        inside = prior_support(self.prior).check(theta)
        log_prob = self.flow_distribution.log_prob(torch.where(inside.unsqueeze(-1), theta, self._inside))
        if self.reject:
            if not bool((self.acceptance > 0).all()):
                raise ValueError(
                    f"NPEPosterior.log_prob: none of {self.acceptance_samples} draws of the flow lies in the prior's "
                    f"support {self.support} for some observation, so its density cannot be normalised there; the "
                    "estimator is not trained for it (train longer, or check x_obs against the simulations)"
                )
            log_prob = log_prob - self.acceptance.log()
        return log_prob.masked_fill(~inside, -torch.inf)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)})"


# --------------------------------------------------------------------------- objectives


class AtomicProposalLoss:
    r"""The atomic APT loss of sequential NPE (Greenberg et al. 2019; "SNPE-C"), an objective for ``fit``.

    For each row :math:`(\theta_n, x_n)` of a batch of :math:`B`, the atoms are :math:`\theta_n` and
    :math:`K - 1` other θ of the batch drawn without replacement; with
    :math:`\ell_{nk} = \log q(\theta_k \mid x_n) - \log p(\theta_k)`,

    .. math:: \mathcal L = -\frac1B \sum_n \Big(\ell_{nn} - \log \sum_{k \in \text{atoms}(n)} e^{\ell_{nk}}\Big).

    It is the likelihood of the proposal posterior restricted to the atoms, minimised by
    :math:`q(\theta \mid x) = p(\theta \mid x)` whatever proposal the θ came from. In eval mode
    (validation) the atoms are drawn by a fixed seed, so epochs are compared on the same atoms.
    ``objective(model, theta, x)``: ``model(x)`` is the posterior estimator's distribution
    over θ (batch ``(B,)``), ``theta (B, D)``, ``x (B, *x_shape)``.

    Args:
        prior: :math:`p(\theta)`.
        num_atoms: :math:`K \ge 2` (at most the batch size).
    """

    def __init__(self, prior: Distribution, num_atoms: int = 10) -> None:
        if not isinstance(num_atoms, int) or num_atoms < 2:
            raise ValueError(f"AtomicProposalLoss: num_atoms must be an integer >= 2, got {num_atoms!r}")
        self.prior, self.num_atoms = prior, num_atoms

    def __call__(self, model: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
        rows = theta.shape[0]
        if rows < 2:
            raise ValueError(f"AtomicProposalLoss: a batch needs at least 2 rows to draw atoms from, got {rows}")
        atoms = min(self.num_atoms, rows)
        others = torch.ones(rows, rows, device=theta.device).fill_diagonal_(0.0)
        generator = None if model.training else torch.Generator(theta.device).manual_seed(0)
        choices = torch.multinomial(others, atoms - 1, replacement=False, generator=generator)
        theta_atoms = torch.cat([theta.unsqueeze(1), theta[choices]], dim=1)  # (B, K, D), the true θ first
        log_q = model(x).log_prob(theta_atoms.transpose(0, 1)).transpose(0, 1)  # atoms against every row's x
        logits = log_q - self.prior.log_prob(theta_atoms)
        return -(logits[:, 0] - torch.logsumexp(logits, dim=1)).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_atoms={self.num_atoms})"


class PosteriorFlowMatching:
    r"""Flow matching for a continuous posterior estimator: :class:`~pyro_flows.FlowMatching` of its flow
    on the standardised unconstrained θ with the embedded x as context (the embedding gets gradients too).

    ``objective(model, theta, x)`` with ``model`` a :class:`PosteriorEstimator` whose flow is one
    :class:`~pyro_flows.transforms.ContinuousFlow`. ``flow_matching``: the objective (a
    :class:`~pyro_flows.FlowMatching`); or its keyword arguments.
    """

    def __init__(self, flow_matching: Optional[FlowMatching] = None, **flow_matching_kwargs) -> None:
        if flow_matching is not None and flow_matching_kwargs:
            raise ValueError("PosteriorFlowMatching: pass a FlowMatching or its keyword arguments, not both")
        self.flow_matching = FlowMatching(**flow_matching_kwargs) if flow_matching is None else flow_matching

    def __call__(self, model: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
        estimator = cast(PosteriorEstimator, getattr(model, "module", model))
        if model is not estimator:
            model(x)  # through the DDP wrapper, which then averages the gradients over the ranks
        return self.flow_matching(estimator.flow, estimator.unconstrained(theta), estimator.context(x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.flow_matching!r})"


# --------------------------------------------------------------------------- NPE


def _is_continuous(flow: Flow) -> bool:
    try:
        continuous_flow_of(flow)
    except ValueError:
        return False
    return True


class NPE:
    r"""Neural posterior estimation: a conditional flow :math:`q(\theta \mid x)` trained on simulations.

    Round 1 (``append_simulations(theta, x)`` with θ from the prior, then ``train()``) minimises
    :math:`-\frac1N \sum_n \log q(\theta_n \mid x_n)` (Papamakarios & Murray 2016). Later rounds
    with θ from a proposal (``append_simulations(theta, x, proposal=posterior)``, or
    ``append_simulations(theta, x).train(proposal=posterior)``) train on all
    rounds' pairs with the atomic APT loss (:class:`AtomicProposalLoss`, Greenberg et al. 2019),
    which needs no importance weights or correction: ``posterior(x_o)`` stays the posterior.

    Samples always lie in the prior's support, by one of two parameterisations (``constraint``): ``"reject"``
    models the standardised θ itself and the posterior rejects the flow's draws outside the support, its density
    renormalised by the acceptance rate (:class:`NPEPosterior`; sbi's way); ``"bijection"`` models the standardised
    unconstrained parameters :math:`b^{-1}(\theta)` and pushes them through :math:`b` = ``biject_to(prior.support)``
    (see :class:`PosteriorEstimator`). The default (``"auto"``) rejects for a box prior (every coordinate in an
    interval): on two moons (a uniform box prior, 10⁴ simulations, sbi's MAF, seeds 0 and 1) the bijection's
    sigmoid warps the posterior's crescents, and fitting θ itself gave a held-out NLL of -3.32 / -3.25 against
    -3.08 / -3.14 and a C2ST of 0.673 / 0.695 against 0.688 / 0.736 (benchmarks/README.md). Other supports (half-lines,
    simplices, ...) and the continuous flows keep the bijection; a real support needs neither.
    The z-scorings of θ (or of its unconstrained image) and x are learnt from the first round's simulations.

    ``flow="cnf"`` builds a conditional :func:`~pyro_flows.CNF` trained by flow matching
    (:class:`PosteriorFlowMatching`, Lipman et al. 2023; "FMPE", Dax et al. 2023); its
    ``log_prob`` and samples come from the ODE. Its network (:attr:`cnf_defaults`), objective
    (:meth:`default_flow_matching`) and training (:attr:`cnf_fit_options`) defaults were chosen by measurement:
    on two moons with 10⁴ simulations the posterior reaches a mean C2ST of 0.55 over 5 observations, each at most
    0.59 (it was 0.91 with the spline flow's defaults; benchmarks/README.md). Any flow
    that is one ContinuousFlow on a standard normal (e.g. from a callable) trains this way. Sequential rounds
    need the cheap atom log-probs of APT, so continuous flows accept only prior simulations (a ValueError
    otherwise).

    Args:
        prior: :math:`p(\theta)`, batch shape ``()`` and event shape ``(D,)``.
        flow: a name of :data:`pyro_flows.flows.FLOWS` (``"nsf"``, ``"maf"``, ``"realnvp"``, ``"cnf"``, ...) or
            a callable ``(theta_features, context_features) -> Flow`` (a conditional flow on the unconstrained
            space).
        embedding: ``nn.Module`` mapping standardised ``x (B, *x_shape)`` to ``(B, C)``, trained
            jointly; default ``nn.Flatten()``.
        transforms, hidden: the flow's layers and hidden widths (``transforms`` unused by ``"cnf"``, ``"ffjord"``);
            ``hidden=None``: (64, 64), or :attr:`cnf_defaults` for the continuous flows.
        num_atoms: atoms of the APT loss.
        flow_matching: the :class:`~pyro_flows.FlowMatching` objective of a continuous flow (default
            :meth:`default_flow_matching`; e.g. ``pf.FlowMatching(time_exponent=2, sigma_min=1e-3)``).
        constraint: ``"auto"``, ``"reject"`` or ``"bijection"``: how samples are kept in the prior's support
            (above); ``"reject"`` needs a support of full dimension (real, an interval or a half-line).
        flow_kwargs: more arguments of the flow factory (e.g. ``bins``, ``mixing``).

    Attributes:
        estimator: the :class:`PosteriorEstimator` (an ``nn.Module``; None before the first round):
            ``torch.save(npe.estimator.state_dict(), ...)`` saves the trained networks and z-scorings.
        constraint: ``"reject"`` or ``"bijection"``, what ``"auto"`` resolved to.
        rounds: the ``(theta, x, from_proposal)`` of every round.
        history: the :class:`~pyro_flows.FitHistory` of the last ``train``.

    Example:
        >>> prior = pyro.distributions.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
        >>> simulator = lambda theta: theta + 0.1 * torch.randn_like(theta)
        >>> theta, x = pf.infer.simulate(simulator, prior, 500, seed=0, progress=False)
        >>> npe = NPE(prior, transforms=2, hidden=(16,)).append_simulations(theta, x)
        >>> npe = npe.train(max_epochs=2, progress=False)  # a real run trains to convergence (the default)
        >>> npe.posterior(torch.tensor([0.2, -0.4])).sample((1000,)).shape
        torch.Size([1000, 2])
    """

    fit_options: ClassVar[FitOptions] = FitOptions().replace(
        max_epochs=1000, max_steps=8000, batch_size=512, lr=2e-3, schedule="cosine", validation_fraction=0.1,
        patience=40,
    )  # fmt: skip
    """The defaults of :meth:`train` (for a continuous flow: :attr:`cnf_fit_options`), chosen by measurement against
    sbi's NPE (``benchmarks/bench_sbi.py``, issue 17.3): batches of 512 pairs, Adam at 2e-3 annealed to 0 by a
    cosine schedule over 8000 steps, 10 % of the pairs held out, early stopping 40 epochs after the last better
    validation loss, and the best validation epoch's weights kept. sbi's recipe (batch 200, Adam 5e-4 held
    constant, patience 20) took 286 epochs on two moons at 10⁴ simulations; with its learning rate held, the
    validation loss is noisy and a shorter patience stops too early (held-out NLL -2.46 against sbi's -3.08), so
    the rate is annealed and the patience is long enough to let the annealing pay (on two moons it stops near the
    end of the schedule,
    on the linear-Gaussian task, which converges fast, after 60-90 epochs). Measured on both tasks at 10⁴
    simulations with sbi's MAF and NSF architecture (benchmarks/README.md): pyro_flows reaches sbi's C2ST in
    1.1-6.9x less wall time, its whole run is 1.2-2.1x shorter on a quiet machine, and it ends at a C2ST at least
    as good on average (two moons over two seeds, θ fitted in the prior's box, ``constraint="reject"``: MAF 0.684 +-
    0.015 against 0.701 +- 0.018, NSF 0.551 +- 0.005 against 0.597 +- 0.043), though in one seed of two MAF's
    0.695 stays above sbi's 0.688. ``max_epochs`` given
    to :meth:`train` without ``max_steps`` replaces the step budget (the cosine schedule then anneals over those
    epochs)."""

    cnf_fit_options: ClassVar[FitOptions] = FitOptions().replace(
        max_epochs=300, batch_size=512, lr=2e-3, schedule="cosine", validation_fraction=0.0, patience=None
    )
    """The defaults of :meth:`train` for a continuous flow (flow matching), chosen by measurement on two moons with
    10⁴ simulations (``benchmarks/bench_sbi.py --task two_moons``, benchmarks/README.md): a fixed number of epochs
    with a cosine-annealed learning rate on all simulations. Early stopping does not suit flow matching: its loss is
    a regression on random times and base draws, whose noise hides the late improvements (with :attr:`fit_options`,
    training stopped after about 110 epochs at a C2ST of 0.91)."""

    cnf_defaults: ClassVar[dict[str, Any]] = {"hidden": (256, 256), "field": "residual"}
    """The network of ``flow="cnf"`` / ``"ffjord"`` unless ``hidden`` or ``field`` are given: a
    :class:`~pyro_flows.nn.ResidualVectorField` (the time's embedding and the context in every block) of two blocks
    of 256 units. Measured on two moons (benchmarks/README.md), 150 epochs: C2ST 0.76 for 2 x 128 against 0.82
    for FFJORD's concat-squash (128, 128, 128) with uniform times; 0.57 for 2 x 256 against 0.63 for 2 x 128 with
    ``time_exponent=2``."""

    def __init__(
        self,
        prior: Distribution,
        flow: Union[str, FlowBuilder] = "nsf",
        embedding: Optional[nn.Module] = None,
        transforms: int = 5,
        hidden: Optional[Sequence[int]] = None,
        num_atoms: int = 10,
        *,
        flow_matching: Optional[FlowMatching] = None,
        constraint: str = "auto",
        **flow_kwargs,
    ) -> None:
        check_prior(prior, "NPE")
        if flow_matching is not None and not isinstance(flow_matching, FlowMatching):
            raise TypeError(f"NPE: flow_matching must be a pf.FlowMatching, got {type(flow_matching).__name__}")
        self.flow_matching = flow_matching
        if not callable(flow):
            check_flow_name(flow, "NPE", or_callable=True)
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(f"NPE: the embedding must be an nn.Module, got {type(embedding).__name__}")
        self.prior, self.flow, self.transforms = prior, flow, transforms
        self.hidden = None if hidden is None else tuple(hidden)
        self.embedding = embedding if embedding is not None else nn.Flatten()
        self.flow_kwargs = flow_kwargs
        self.loss = AtomicProposalLoss(prior, num_atoms)
        self.constraint = resolve_constraint(prior, constraint, flow)
        self.bijection: Transform
        try:
            support = constraints.real_vector if self.constraint == "reject" else prior_support(prior)
            self.bijection = biject_to(support)
        except NotImplementedError:
            raise ValueError(
                f"NPE: the prior's support {prior.support} has no bijection from the real numbers (torch's "
                "biject_to), so a flow cannot model it; NPE needs continuous parameters (e.g. a Uniform, "
                "(Log)Normal, Gamma or Beta prior)"
            ) from None
        self.estimator: Optional[PosteriorEstimator] = None
        self.rounds: list[tuple[Tensor, Tensor, bool]] = []
        self._rounds_trained = 0  # rounds appended before the last train(): not marked by train(proposal=...)
        self.history: Optional[FitHistory] = None

    def _build_flow(self, features: int, context: int) -> Flow:
        if callable(self.flow):
            flow = self.flow(features, context)
            if not isinstance(flow, Flow) or flow.context_features != context:
                raise ValueError(
                    f"NPE: the flow callable must return a pyro_flows.Flow with context_features={context}, "
                    f"got {type(flow).__name__} with context_features={getattr(flow, 'context_features', None)}"
                )
            return flow
        defaults = self.cnf_defaults if self.flow in CONTINUOUS_FLOWS else {"hidden": (64, 64)}
        kwargs = {**defaults, **self.flow_kwargs, **({} if self.hidden is None else {"hidden": self.hidden})}
        return build_flow(self.flow, features, context, transforms=self.transforms, **kwargs)

    def _build_estimator(self, theta: Tensor, x: Tensor) -> PosteriorEstimator:
        if theta.shape[0] < 2:
            raise ValueError(f"NPE: the first round needs at least 2 simulations to z-score, got {theta.shape[0]}")
        u = self.bijection.inv(theta)
        standardize = T.Standardize.from_data(u)
        x_zscore = T.Standardize.from_data(x.reshape(x.shape[0], -1))  # per element of x_shape
        x_loc, x_scale = x_zscore.loc.reshape(x.shape[1:]), x_zscore.scale.reshape(x.shape[1:])
        self.embedding.to(theta.dtype)  # the estimator follows the data's dtype (float64 θ: a float64 flow)
        self.embedding.eval()
        with torch.no_grad():
            context = self.embedding((x[:2] - x_loc) / x_scale)
        self.embedding.train()
        if context.dim() != 2 or context.shape[0] != 2:
            raise ValueError(
                f"NPE: the embedding must map x of shape (B, *x_shape) to (B, C); for x of shape "
                f"{tuple(x[:2].shape)} it returned {tuple(context.shape)}"
            )
        flow = self._build_flow(u.shape[-1], context.shape[-1]).to(theta.dtype)
        return PosteriorEstimator(flow, self.embedding, x_loc, x_scale, standardize, self.bijection)

    def default_flow_matching(self) -> FlowMatching:
        """The objective of a continuous flow when ``flow_matching`` is not given: straight paths, independent
        coupling, times drawn with density :math:`3t^2` (``time_exponent=2``: a posterior is narrow, so its field is
        steep near the data end; measured on two moons: C2ST 0.63 against 0.76 with uniform times)."""
        return FlowMatching(time_exponent=2.0)

    @property
    def continuous(self) -> bool:
        """Whether the estimator is one continuous flow, trained by flow matching."""
        return self.estimator is not None and _is_continuous(self.estimator.flow)

    def append_simulations(self, theta: Tensor, x: Tensor, proposal: Optional[Distribution] = None) -> NPE:
        r"""Add a round of simulated pairs: ``theta (N, D)`` from ``proposal`` (None: the prior), ``x (N, *x_shape)``.

        The first round builds the estimator and fixes the z-scorings. The estimator follows θ's dtype
        (float64 θ: the flow, z-scorings and embedding are float64; later rounds must have the same dtype), and
        ``x`` is cast to it (integer counts are fine). A round with a proposal switches training to the APT loss
        (on all rounds' pairs). Returns ``self``.
        """
        if proposal is not None and not isinstance(proposal, Distribution):
            raise TypeError(f"NPE: the proposal must be a Distribution (a posterior), got {type(proposal).__name__}")
        if isinstance(theta, Tensor) and theta.dim() > 0 and theta.shape[0] == 0:
            raise ValueError(
                "NPE.append_simulations: there are no simulations (θ has 0 rows); simulate drops the rows "
                "whose x has NaN or inf entries, so every simulation may have failed: check the simulator on a few θ"
            )
        _check_theta(theta, self.prior, "NPE.append_simulations")
        if not theta.is_floating_point():
            raise ValueError(f"NPE.append_simulations: θ must be a floating-point tensor, got {theta.dtype}")
        if self.estimator is not None and theta.dtype != self.estimator.x_loc.dtype:
            raise ValueError(
                f"NPE.append_simulations: θ has dtype {theta.dtype}, but the estimator was built in "
                f"{self.estimator.x_loc.dtype} from the first round's θ; pass θ of that dtype (theta.to(...))"
            )
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != theta.shape[0]:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"NPE.append_simulations: x must have shape (N, *x_shape) with the N = {theta.shape[0]} rows of θ, "
                f"got {shape}"
            )
        x = x.to(theta.dtype)  # e.g. integer counts
        check_finite_rows(x, "NPE.append_simulations: x")
        if self.estimator is None:
            self.estimator = self._build_estimator(theta, x)
        elif x.shape[1:] != self.estimator.x_shape:
            raise ValueError(
                f"NPE.append_simulations: x has x_shape {tuple(x.shape[1:])}, earlier rounds "
                f"{tuple(self.estimator.x_shape)}"
            )
        if proposal is not None:
            self._check_sequential()
        self.rounds.append((theta, x, proposal is not None))
        return self

    def _check_sequential(self) -> None:
        if self.continuous:
            raise ValueError(
                "NPE: sequential rounds (a proposal) need the APT loss, which evaluates many cheap log-probs of "
                "atoms; a continuous flow's log-prob is an ODE solve. Use flow='nsf' (or 'maf', 'realnvp') for "
                "sequential NPE, or simulate from the prior"
            )

    def train(
        self,
        *,
        proposal: Optional[Distribution] = None,
        validation_data: Optional[tuple[Tensor, Tensor]] = None,
        resume: Optional[PathLike] = None,
        **options: Any,
    ) -> NPE:
        """Train the estimator on every round's pairs with :func:`~pyro_flows.fit` (validation split, early stopping).

        The objective is the negative log-likelihood when every round came from the prior,
        :class:`AtomicProposalLoss` once a round had a proposal, and :class:`PosteriorFlowMatching`
        for a continuous flow. Training continues from the current weights; the best validation
        epoch's weights are kept. ``history`` holds the :class:`~pyro_flows.FitHistory`. Returns ``self``.

        ``proposal``: the distribution the θ of the rounds appended since the last ``train`` were
        drawn from (e.g. the previous round's posterior), the same as passing it to
        :meth:`append_simulations`: ``npe.append_simulations(theta, x).train(proposal=posterior)``.
        ``options`` change :attr:`fit_options` for this call (``max_epochs``, ``batch_size``, ``lr``,
        ``patience``, ``seed``, ``progress``, ``max_steps``, ``schedule``, ``device``, ...: any field of
        :class:`~pyro_flows.FitOptions`; ``max_epochs`` without ``max_steps`` lifts the default step budget, so
        that exactly those epochs run); ``validation_data`` ``(theta, x)`` (in place of the default
        ``validation_fraction``) and ``resume`` go to :func:`~pyro_flows.fit`.
        """
        if validation_data is not None:
            options.setdefault("validation_fraction", 0.0)
        if self.estimator is None:
            raise ValueError("NPE.train: no simulations yet; call append_simulations(theta, x) first")
        if "max_epochs" in options:
            options.setdefault("max_steps", None)  # the caller's epoch budget replaces the default step budget
        fit_options = (self.cnf_fit_options if self.continuous else self.fit_options).replace(**options)
        if proposal is not None:
            if not isinstance(proposal, Distribution):
                raise TypeError(
                    f"NPE.train: the proposal must be a Distribution (a posterior), got {type(proposal).__name__}"
                )
            if self._rounds_trained == len(self.rounds):
                raise ValueError(
                    "NPE.train: proposal= marks the rounds appended since the last train() as drawn from it, "
                    "but none were appended; call append_simulations(theta, x) with the proposal's θ first"
                )
            self._check_sequential()
            self.rounds[self._rounds_trained :] = [(t, o, True) for t, o, _ in self.rounds[self._rounds_trained :]]
        theta = torch.cat([r[0] for r in self.rounds])
        x = torch.cat([r[1] for r in self.rounds])
        objective: Optional[Callable[..., Tensor]]  # (estimator, theta, x) -> loss
        if self.continuous:
            objective = PosteriorFlowMatching(self.flow_matching or self.default_flow_matching())
        elif any(r[2] for r in self.rounds):
            objective = self.loss
        else:
            objective = None
        self.history = fit(
            self.estimator,
            theta,
            x,
            objective=cast(Optional[Objective], objective),
            validation_data=validation_data,
            resume=resume,
            options=fit_options,
        )
        self._rounds_trained = len(self.rounds)
        return self

    def posterior(self, x_obs: Tensor) -> NPEPosterior:
        """The posterior at ``x_obs`` of shape ``x_shape`` (batch shape ``()``) or ``(B, *x_shape)`` (batch ``(B,)``).

        ``x_obs`` is moved to the estimator's dtype and device (e.g. float64 observations into a float32 NPE).
        A ValueError for any other shape or NaN/inf entries.
        """
        if self.estimator is None:
            raise ValueError("NPE.posterior: not trained; call append_simulations(...).train() first")
        x_shape = tuple(self.estimator.x_shape)
        if (
            not isinstance(x_obs, Tensor)
            or tuple(x_obs.shape[-len(x_shape) :]) != x_shape
            or x_obs.dim() > len(x_shape) + 1
        ):
            shape = tuple(x_obs.shape) if isinstance(x_obs, Tensor) else type(x_obs).__name__
            raise ValueError(f"NPE.posterior: x_obs must have shape {x_shape} or (B, *{x_shape}), got {shape}")
        if not bool(torch.isfinite(x_obs).all()):
            raise ValueError("NPE.posterior: x_obs has NaN or inf entries")
        self.estimator.eval()
        x_obs = x_obs.to(self.estimator.x_loc)  # the estimator's dtype and device
        return NPEPosterior(self.estimator, x_obs, self.prior, reject=self.constraint == "reject")

    def save(self, path: PathLike) -> Path:
        """Write the configuration, weights and z-scorings to one file (:mod:`pyro_flows.saving`'s format, written
        atomically; the simulations are not saved).

        A callable ``flow`` or an ``embedding`` is code, not data: pass them again to :meth:`load`.
        """
        if self.estimator is None:
            raise ValueError("NPE.save: nothing to save; append simulations and train first")
        if not saving.is_plain(self.flow_kwargs):
            raise ValueError(
                "NPE.save: flow_kwargs must be plain values (numbers, strings, bools, lists, tuples, dicts of them), "
                f"got {self.flow_kwargs}"
            )
        return saving.save(
            {
                "flow": self.flow if isinstance(self.flow, str) else None,
                "transforms": self.transforms,
                "hidden": None if self.hidden is None else list(self.hidden),
                "num_atoms": self.loss.num_atoms,
                "constraint": self.constraint,
                "flow_kwargs": dict(self.flow_kwargs),
                "features": self.estimator.theta_standardize.loc.shape[0],
                "context_features": self.estimator.flow.context_features,
                "x_shape": list(self.estimator.x_shape),
                "state_dict": {k: v.detach().cpu() for k, v in self.estimator.state_dict().items()},
            },
            path,
            "NPE",
        )

    @classmethod
    def load(
        cls,
        path: PathLike,
        prior: Distribution,
        flow: Optional[FlowBuilder] = None,
        embedding: Optional[nn.Module] = None,
    ) -> NPE:
        """An NPE saved by :meth:`save`, ready for ``posterior``; loaded with ``weights_only=True``.

        ``prior`` is the one it was trained with; ``flow`` the callable and ``embedding`` the module
        it was built with, if any (its weights come from the file).
        """
        state = saving.load(path, "NPE")
        if state["flow"] is None and flow is None:
            raise ValueError(f"NPE.load: {path} was saved from a callable flow; pass it as flow=...")
        constraint = state.get("constraint", "bijection")  # files from before the choice modelled b⁻¹(θ)
        npe = cls(prior, state["flow"] if flow is None else flow, embedding, state["transforms"], state["hidden"],
                  state["num_atoms"], constraint=constraint, **state["flow_kwargs"])  # fmt: skip
        features, x_shape = state["features"], tuple(state["x_shape"])
        x_loc = state["state_dict"].get("x_loc")
        dtype = x_loc.dtype if isinstance(x_loc, Tensor) else torch.get_default_dtype()  # the dtype it was saved in
        with seeded_rng(0):  # the initial weights are overwritten below: no draw from the caller's stream
            flow_module = npe._build_flow(features, state["context_features"])
        npe.estimator = PosteriorEstimator(
            flow_module,
            npe.embedding,
            torch.zeros(x_shape),
            torch.ones(x_shape),
            T.Standardize(torch.zeros(features), torch.ones(features)),
            npe.bijection,
        ).to(dtype)
        npe.estimator.load_state_dict(state["state_dict"])
        npe.estimator.eval()
        return npe

    def __repr__(self) -> str:
        flow = self.flow if isinstance(self.flow, str) else getattr(self.flow, "__name__", "callable")
        return f"{type(self).__name__}(flow={flow!r}, rounds={len(self.rounds)})"
