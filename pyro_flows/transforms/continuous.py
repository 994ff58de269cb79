r"""Continuous normalizing flows: a layer that integrates an ODE (Chen et al. 2018; FFJORD, Grathwohl et al. 2019).

Convention: the base→data direction (``_call``, :meth:`~.FlowTransform.call_and_ladj`)
integrates :math:`\frac{dz}{dt} = f(z, t[, c])` from :math:`t_0` to :math:`t_1`
(default 0 → 1); the inverse integrates the same ODE backwards, from :math:`t_1` to
:math:`t_0`. By the instantaneous change of variables,

.. math:: \log\left|\det \frac{\partial z(t_1)}{\partial z(t_0)}\right|
          = \int_{t_0}^{t_1} \operatorname{tr} \frac{\partial f}{\partial z}(z(t), t)\, dt,

so :math:`\log p_1(z(t_1)) = \log p_0(z(t_0)) - \int_{t_0}^{t_1} \operatorname{tr} \partial f/\partial z\, dt`.
The log-det is carried in the same ODE state as :math:`z` (one solve gives both).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..nn import ResidualVectorField, VectorField
from .base import Conditional, FlowTransform, broadcast_context

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
REGULARIZERS = ("kinetic", "jacobian")
FIELDS: dict[str, type[nn.Module]] = {"concatsquash": VectorField, "residual": ResidualVectorField}
"""The default vector fields by name (``ContinuousFlow(field=...)``)."""
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
"""``torchdiffeq``'s adaptive Runge-Kutta methods: a solve with one of them ends on a step at :math:`t_1` (its
``step_t`` option), so the result is the method's own solution there, not its lower-order dense output past it."""
SAFETY = 0.8
r"""The step-size controller's safety factor for the adaptive solvers (``options["safety"]``; torchdiffeq's own is
0.9): the next step is :math:`h\,\min(10, \max(1, 0.8\, r^{-1/5}))` after an accepted step of error ratio
:math:`r \le 1`. 0.8 is one of the factors of Hairer, Nørsett & Wanner (*Solving ODEs I*, II.4: 0.8, 0.9,
:math:`0.38^{1/(q+1)} \approx 0.82`). torchdiffeq never shrinks a step after an accepted one, so with 0.9 the steps
settle at error ratios near 1 and one in a few is rejected (6 wasted evaluations with dopri5); with 0.8 they settle
lower. Measured with ``benchmarks/bench_cnf.py``'s field (random MLPs, D = 2, 3, 5, 8; the largest
:math:`|\log p - \text{reference}|` over 1024 points): at equal error, as many or fewer evaluations (D = 2: 50 against
55); at the same tolerance, a smaller error in 11 of 12 cases (up to 2.7 times), for up to 6 more or 6 fewer
evaluations."""
FIXED_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
"""``torchdiffeq``'s fixed-grid methods: the ones ``steps=`` takes (Euler: 1 evaluation a step; midpoint, Heun: 2;
Heun3: 3; RK4: 4)."""

Divergence = Callable[[Tensor, Tensor, Any, bool], tuple[Tensor, Tensor]]  # (f, z, probe, create_graph)


def _vjp(f: Tensor, z: Tensor, v: Tensor, create_graph: bool, batched: bool = False) -> Tensor:
    """``v^T ∂f/∂z`` (a batch of them over ``v``'s first dim when ``batched``); zeros if ``f`` ignores ``z``."""
    out = torch.autograd.grad(f, z, v, create_graph=create_graph, is_grads_batched=batched, allow_unused=True)[0]
    return torch.zeros_like(v) if out is None else out


def exact_divergence(f: Tensor, z: Tensor, probe: Optional[Tensor], create_graph: bool) -> tuple[Tensor, Tensor]:
    r"""``(tr J, ||J||_F^2)`` per sample of :math:`J = \partial f / \partial z`, exactly.

    All :math:`D` rows :math:`e_i^\top J` come from :math:`D` vector-Jacobian products with
    one-hot vectors, batched (``is_grads_batched``) over the rows and the samples.
    Shapes: ``f``, ``z`` ``(N, D)``; outputs ``(N,)``. ``probe`` is unused.
    """
    n, d = z.shape
    one_hot = torch.eye(d, dtype=z.dtype, device=z.device).unsqueeze(1).expand(d, n, d)
    rows = _vjp(f, z, one_hot, create_graph, batched=True)  # (D, N, D): rows[i, b] = e_i^T J_b
    return jacobian_divergence(rows.transpose(0, 1))


def jacobian_divergence(jacobian: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(tr J, ||J||_F^2)`` per sample of a batch of Jacobians ``(N, D, D)``: outputs ``(N,)``."""
    return jacobian.diagonal(dim1=-2, dim2=-1).sum(-1), jacobian.square().sum((-2, -1))


def hutchinson_divergence(f: Tensor, z: Tensor, probe: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    r"""Hutchinson's estimates ``(ε^T J ε, ||ε^T J||^2)`` of ``(tr J, ||J||_F^2)`` with one probe ``ε`` per sample.

    Unbiased when :math:`\mathbb{E}[\varepsilon\varepsilon^\top] = I` (Rademacher or standard
    Gaussian probes; Hutchinson 1989, Grathwohl et al. 2019, Finlay et al. 2020). One
    vector-Jacobian product. Shapes: ``f``, ``z``, ``probe`` ``(N, D)``; outputs ``(N,)``.
    """
    vjp = _vjp(f, z, probe, create_graph)
    return (vjp * probe).sum(-1), vjp.square().sum(-1)


def draw_probe(kind: str, like: Tensor) -> Tensor:
    """A Rademacher (±1) or standard Gaussian probe of ``like``'s shape, dtype and device."""
    if kind == "gaussian":
        return torch.randn_like(like)
    return torch.randint_like(like, 2) * 2 - 1


def no_divergence(f: Tensor, z: Tensor, probe: Optional[Tensor], create_graph: bool) -> tuple[Tensor, Tensor]:
    """Zeros ``(N,)`` for ``(tr J, ||J||_F^2)``: a solve that needs no log-det (guided sampling)."""
    zeros = f.new_zeros(f.shape[:-1])
    return zeros, zeros


def guided_velocity(
    field: nn.Module, z: Tensor, t: Tensor | float, context: Tensor, null: Tensor, scale: float
) -> Tensor:
    r"""Classifier-free guidance (Ho & Salimans 2022): :math:`f_\varnothing + w\,(f_c - f_\varnothing)`.

    :math:`f_c = f(z, t, c)` and :math:`f_\varnothing = f(z, t, \varnothing)` come from one call of ``field`` on the
    stacked batch; the combination is ``torch.lerp``, exact at :math:`w = 0` (:math:`f_\varnothing`) and
    :math:`w = 1` (:math:`f_c`). Shapes: ``z`` ``(N, D)``, ``context`` ``(N, C)``, ``null`` ``(C,)``, ``t`` a number,
    a scalar or ``(N,)``; output ``(N, D)``.
    """
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    both = field(
        torch.cat([z, z]),
        torch.cat([t, t]) if t.dim() else t,
        torch.cat([context, null.to(context).expand_as(context)]),
    )
    conditional, unconditional = both.chunk(2)
    return torch.lerp(unconditional, conditional, scale)


def check_guidance_scale(scale: float, name: str) -> float:
    """``scale`` as a float if it is a finite number >= 0; else a ValueError naming ``name``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise ValueError(
            f"{name}: the guidance scale must be a finite number >= 0 (0: the unconditional field, 1: the conditional "
            f"one, > 1: guided towards the context), got {scale!r}"
        )
    return float(scale)


class _Dynamics:
    r"""The augmented ODE :math:`\frac{d}{dt}(z, \ell, E[, F]) = (f, \operatorname{tr} J, \|f\|^2[, \|J\|_F^2])` on
    one flat state ``(N, D + 2)`` (``(N, D + 3)`` with ``frobenius``): torchdiffeq then steps one tensor.

    ``context`` and ``probe`` are fixed for one solve; ``nfe`` counts the evaluations.
    Under ``torch.no_grad()`` the Jacobian terms are computed without a graph. With ``trace`` (a field's
    ``forward_and_trace``) and no ``frobenius``, :math:`f` and :math:`\operatorname{tr} J` come from it; with
    ``jacobian`` (a field's ``forward_and_jacobian``), :math:`f` and :math:`J`; both without autograd.
    """

    def __init__(
        self,
        field: Callable[..., Tensor],
        context: Optional[Tensor],
        divergence: Divergence,
        probe: Optional[Tensor],
        jacobian: Optional[Callable[..., tuple[Tensor, Tensor]]] = None,
        trace: Optional[Callable[..., tuple[Tensor, Tensor]]] = None,
        frobenius: bool = True,
    ):
        self.field, self.context, self.divergence, self.probe = field, context, divergence, probe
        self.jacobian, self.trace, self.frobenius = jacobian, (None if frobenius else trace), frobenius
        self.nfe = 0

    @property
    def autograd_free(self) -> bool:
        """Whether the terms come from the field's own ``forward_and_trace``/``forward_and_jacobian`` (no autograd)."""
        return self.trace is not None or self.jacobian is not None

    def __call__(self, t: Tensor, state: Tensor) -> Tensor:
        self.nfe += 1
        z = state[:, : state.shape[-1] - (3 if self.frobenius else 2)]
        f, trace, frobenius = self._terms(t, z)
        columns = (f, trace.unsqueeze(-1), torch.linalg.vecdot(f, f).unsqueeze(-1))
        return torch.cat(columns + (frobenius.unsqueeze(-1),) if self.frobenius else columns, -1)

    def _terms(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, tr J, ||J||_F^2)`` at ``(z, t)``; the last one is only meaningful with ``frobenius``."""
        if self.trace is not None:  # exact trace, no Jacobian: plain ops, differentiable as they are
            f, trace = self.trace(z, t, self.context)
            return f, trace, trace
        if self.jacobian is not None:  # exact J by forward propagation: plain ops, differentiable as they are
            f, jacobian = self.jacobian(z, t, self.context)
            return (f, *jacobian_divergence(jacobian))
        create_graph = torch.is_grad_enabled()
        if self.divergence is no_divergence:  # no Jacobian terms: no graph to build for them
            f = self.field(z, t, self.context)
            zeros = f.new_zeros(f.shape[:-1])
            return f, zeros, zeros
        with torch.enable_grad():
            # a fresh leaf unless z carries a graph to differentiate through (a view taken under no_grad does not)
            z = z if create_graph and z.requires_grad else z.detach().requires_grad_(True)
            f = self.field(z, t, self.context)
            trace, frobenius = self.divergence(f, z, self.probe, create_graph)
        return (f, trace, frobenius) if create_graph else (f.detach(), trace.detach(), frobenius.detach())


def state_norm(state: Tensor, features: int) -> Tensor:
    """The default step-size control: the largest error ratio over the elements of :math:`z` and of the log-det (the
    regularisation integrals do not shrink steps), as zuko's solver and SciPy's ``max`` norms.

    Every sample's :math:`z` and log-det are held to the tolerances, whatever the batch around it (an RMS over
    the batch, torchdiffeq's default, lets one sample's error grow with the batch size). At equal log-density error
    it costs as many evaluations as the RMS norm at a tighter tolerance (zuko's field at D = 2 and 8,
    ``benchmarks/bench_cnf.py --norm rms``); at the same tolerance it is the stricter of the two.

    ``state`` ``(N, features + k)``: the solver's flat state ``[z, ℓ, E(, F)]`` (or its error ratios).
    Detached: the step sizes are a choice of discretisation, not part of the function being
    differentiated, so no gradient flows through them.
    """
    return torch.linalg.vector_norm(state[:, : features + 1].detach(), float("inf"))  # max |x|: one kernel


def check_steps(steps: Optional[int], solver: str, name: str) -> Optional[int]:
    """``steps`` if it is None or a positive integer with a fixed-grid ``solver``; else a ValueError naming ``name``."""
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: steps must be an integer >= 1, got {steps!r}")
    if solver not in FIXED_SOLVERS:
        raise ValueError(
            f"{name}: steps={steps} needs a fixed-grid solver, one of {FIXED_SOLVERS}, got solver={solver!r}"
        )
    return steps


class ContinuousFlow(FlowTransform):
    r"""A continuous normalizing flow layer: the flow map of :math:`\frac{dz}{dt} = f(z, t[, c])` (FFJORD).

    Base→data (``call_and_ladj``) integrates from :math:`t_0` to :math:`t_1`, data→base
    (``inverse_and_ladj``) from :math:`t_1` back to :math:`t_0`, with ``torchdiffeq.odeint``
    (``odeint_adjoint`` when ``adjoint=True``: memory constant in the number of steps,
    Chen et al. 2018). The ODE state carries, besides :math:`z`,

    .. math:: \ell = \int \operatorname{tr} \tfrac{\partial f}{\partial z}\, dt, \qquad
              E = \int \|f\|^2\, dt, \qquad F = \int \|\tfrac{\partial f}{\partial z}\|_F^2\, dt,

    so the log-det :math:`\ell` comes from the same solve as the output. The trace is
    ``"exact"`` (all :math:`D` diagonal terms: from the field's ``forward_and_trace(z, t, context)`` when it has
    one, which returns :math:`f` and :math:`\operatorname{tr} \partial f/\partial z` ``(N,)`` without the Jacobian
    (:func:`~pyro_flows.nn.vector_field.chain_trace`, as :class:`~pyro_flows.nn.VectorField` does); else from its
    ``forward_and_jacobian(z, t, context)``, which returns :math:`f` and :math:`\partial f/\partial z` ``(N, D, D)``
    by forward propagation through its layers (:func:`~pyro_flows.nn.vector_field.sequential_jacobian`; under
    ``torch.no_grad()`` these two run in ``torch.inference_mode()``, so they must not call autograd); else from
    :math:`D` batched vector-Jacobian products) or ``"hutchinson"``'s unbiased
    estimate :math:`\varepsilon^\top J \varepsilon` with one ``"rademacher"`` or
    ``"gaussian"`` probe per sample, drawn once per solve and held fixed during it
    (Grathwohl et al. 2019). :math:`E` (kinetic energy) and :math:`F` (Jacobian Frobenius
    norm; exact with the exact trace, Hutchinson's estimate otherwise) are the regularisers
    of Finlay et al. (2020): after every solve, ``regularization`` holds ``{"kinetic": E}`` and, for a solve
    inside :func:`record_regularization` (an objective that adds them to the loss, such as
    :class:`~pyro_flows.CNFRegularizedNLL`, which takes them attached from there), ``"jacobian": F`` too (per
    sample, integrated over :math:`|dt|`), detached from the autograd graph so that the layer keeps no graph
    alive. :math:`F` needs the whole Jacobian, so other solves do not integrate it (the exact trace then
    needs only the diagonal). ``nfe`` holds
    the number of evaluations of :math:`f` in the last solve (forward pass only). The integrals do not
    enter the step-size control unless ``options["norm"]`` says otherwise: the solver's state is one tensor
    ``(N, D + 2)``, :math:`[z, \ell, E]` (``(N, D + 3)`` with :math:`F`), and the default norm is
    :func:`state_norm`.

    Tolerances below the dtype's resolution (:math:`8\epsilon_\text{mach}`, 1e-6 in float32)
    are raised to it, so one layer works in float32 and float64.

    Shapes: ``x`` ``(..., features)``, or ``(..., C, H, W)`` when ``features`` is an event shape (the ODE
    then runs on the events flattened to :math:`D = C H W`, and the field sees ``(N, D)`` rows); the context
    ``(..., context_features)`` broadcasts with it; the log-det has the broadcast batch shape.

    Args:
        features: :math:`D`, or an event shape such as ``(C, H, W)``.
        vector_field: an ``nn.Module`` called as ``f(z, t, context)`` (``z`` ``(N, D)``, ``t`` a scalar
            tensor); default the network ``field`` names (zero output: a fresh layer is the identity).
        field: the default network: ``"concatsquash"`` (:class:`~pyro_flows.nn.VectorField`, FFJORD's) or
            ``"residual"`` (:class:`~pyro_flows.nn.ResidualVectorField`: residual blocks that all see the time's
            sinusoidal embedding and the context; the better field for conditional flow matching, e.g. NPE).
        hidden, activation: of the default vector field.
        context_features: context size (conditional twin only).
        trace: ``"exact"`` or ``"hutchinson"``.
        probe: ``"rademacher"`` or ``"gaussian"`` (Hutchinson only).
        t0, t1: the time span.
        solver: a ``torchdiffeq`` method (``"dopri5"``, ``"rk4"``, ...).
        atol, rtol: the solver's tolerances (adaptive solvers).
        options: passed to ``torchdiffeq`` (e.g. ``{"step_size": 0.05}`` for fixed-step solvers). With an adaptive
            solver (:data:`ADAPTIVE_SOLVERS`) and no ``step_t``/``jump_t`` of the user's, the last step lands on the
            end of the span (``step_t``), where torchdiffeq would step past it and interpolate; the step-size
            controller's ``safety`` is :data:`SAFETY` (0.8) unless given here.
        steps: with a fixed-grid ``solver`` (:data:`FIXED_SOLVERS`), integrate in exactly ``steps`` equal
            steps over :math:`[t_0, t_1]` (few-step sampling and likelihoods); None (default) leaves the grid
            to the solver (adaptive, or ``options``). See also :func:`fixed_steps`.
        adjoint: integrate with the adjoint method.
        null_context: give the layer a learned "null" context :math:`\varnothing` (``null_context``, a parameter
            ``(context_features,)`` initialised at zero; conditional twin only) for classifier-free guidance:
            :class:`~pyro_flows.FlowMatching` with ``context_dropout=p`` trains :math:`f(z, t, \varnothing)` on
            the marginal of the data, and :meth:`guided` integrates the guided field.

    Example:
        >>> layer = ContinuousFlow(2, hidden=(32, 32), trace="hutchinson")
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 2))
        >>> y.shape, ladj.shape, layer.nfe > 0, sorted(layer.regularization)  # F: in recorded solves only
        (torch.Size([10, 2]), torch.Size([10]), True, ['kinetic'])

    References:
        - Chen, Rubanova, Bettencourt & Duvenaud (2018), *Neural ordinary differential equations*, arXiv:1806.07366.
        - Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud (2019), *FFJORD: Free-form continuous dynamics for scalable
          reversible generative models*, arXiv:1810.01367.
        - Finlay, Jacobsen, Nurbekyan & Oberman (2020), *How to train your neural ODE: the world of Jacobian and kinetic
          regularization*, arXiv:2002.02798.
    """

    def __init__(
        self,
        features: Union[int, Sequence[int]],
        vector_field: Optional[nn.Module] = None,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.SiLU,
        trace: str = "exact",
        probe: str = "rademacher",
        t0: float = 0.0,
        t1: float = 1.0,
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        options: Optional[dict[str, Any]] = None,
        adjoint: bool = False,
        steps: Optional[int] = None,
        null_context: bool = False,
        field: str = "concatsquash",
    ) -> None:
        super().__init__((features,) if isinstance(features, int) else tuple(features), context_features)
        name = type(self).__name__
        if trace not in TRACES or probe not in PROBES:
            raise ValueError(
                f"{name}: trace must be one of {TRACES} and probe one of {PROBES}, got {trace!r}, {probe!r}"
            )
        if float(t0) == float(t1):
            raise ValueError(f"{name}: the time span is empty (t0 = t1 = {t0})")
        if field not in FIELDS:
            raise ValueError(f"{name}: unknown field {field!r}; known: {list(FIELDS)}")
        self.vector_field = (
            FIELDS[field](self.event_shape.numel(), hidden, context_features, activation)
            if vector_field is None
            else vector_field
        )
        self.trace, self.probe = trace, probe
        self.t0, self.t1 = float(t0), float(t1)
        self.solver, self.atol, self.rtol = solver, float(atol), float(rtol)
        self.options = dict(options or {})
        self.adjoint = bool(adjoint)
        self.steps = check_steps(steps, solver, name)
        if null_context and not context_features:
            raise ValueError(f"{name}: null_context=True needs a conditional layer (context_features > 0)")
        self.null_context = nn.Parameter(torch.zeros(context_features)) if null_context else None
        self.nfe = 0
        self.regularization: dict[str, Tensor] = {}
        self._recorder: Optional[list[dict[str, Tensor]]] = None

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._integrate(x, context, self.t0, self.t1)

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._integrate(y, context, self.t1, self.t0)

    def guided(self, z: Tensor, context: Tensor, scale: float) -> Tensor:
        r"""Integrate the classifier-free-guided field from :math:`t_0` to :math:`t_1`: samples, no log-density.

        .. math:: \frac{dz}{dt} = f(z, t, \varnothing) + w\,\big(f(z, t, c) - f(z, t, \varnothing)\big)

        (Ho & Salimans 2022; for flow matching, Zheng et al. 2023), with the layer's learned null context
        :math:`\varnothing` (``null_context=True``), solver and grid. :math:`w = 1` is the conditional flow,
        :math:`w = 0` the unconditional one, :math:`w > 1` pushes the samples towards what the context
        distinguishes (as :math:`p(x \mid c)\,p(c \mid x)^{w-1}` would). The guided field is not the velocity of
        the path of any distribution the model was trained on, so the samples have no exact likelihood: no
        log-det is integrated, and there is no guided ``log_prob``.

        Shapes: ``z`` ``(..., features)`` (base samples at :math:`t_0`), ``context`` ``(..., context_features)``
        (the layer's context, e.g. a flow's embedded one), broadcast together; returns ``z``'s broadcast shape.
        """
        name = f"{type(self).__name__}.guided"
        scale = check_guidance_scale(scale, name)
        if self.null_context is None:
            raise ValueError(
                f"{name}: the layer has no null context; build it with null_context=True (conditional flows only) "
                "and train it with FlowMatching(context_dropout=p)"
            )
        null = self.null_context
        field = functools.partial(guided_velocity, self.vector_field, null=null, scale=scale)
        return self._integrate(z, context, self.t0, self.t1, field, no_divergence)[0]

    def _integrate(
        self,
        z: Tensor,
        context: Optional[Tensor],
        start: float,
        end: float,
        field: Optional[Callable[..., Tensor]] = None,
        divergence: Optional[Divergence] = None,
    ) -> tuple[Tensor, Tensor]:
        """Solve from ``start`` to ``end``: ``(z(end), ∫ tr J dt)``; records ``nfe`` and ``regularization``.

        ``field`` ``(z, t, context)`` and ``divergence`` replace the layer's vector field and trace (guidance)."""
        k = len(self.event_shape)  # 1 for vectors, 3 for images: the ODE runs on the flattened events
        z, context = broadcast_context(z, context, k)
        batch, d = z.shape[: z.dim() - k], self.event_shape.numel()
        if batch.numel() == 0:  # nothing to integrate (an adaptive solver would fail on a step of 0)
            self.nfe, empty = 0, z.new_zeros(batch)
            self._record({"kinetic": empty, "jacobian": empty} if self._recorder is not None else {"kinetic": empty})
            return z.clone(), empty
        z = z.reshape(-1, d)
        context = None if context is None else context.reshape(-1, self.context_features)
        jacobian = trace = None
        if divergence is None:
            divergence = exact_divergence if self.trace == "exact" else hutchinson_divergence
            if self.trace == "exact" and field is None:
                jacobian = getattr(self.vector_field, "forward_and_jacobian", None)
                trace = getattr(self.vector_field, "forward_and_trace", None)
        probe = draw_probe(self.probe, z) if self.trace == "hutchinson" else None
        frobenius = self._recorder is not None  # F only for an objective that records it
        field = self.vector_field if field is None else field
        dynamics = _Dynamics(field, context, divergence, probe, jacobian, trace, frobenius)
        state = torch.cat([z, z.new_zeros(z.shape[0], 3 if frobenius else 2)], -1)
        times = torch.tensor([start, end], dtype=z.dtype, device=z.device)
        end_state = self._solve(dynamics, state, times, context)
        sign = 1.0 if end > start else -1.0
        self.nfe = dynamics.nfe
        integrals = {"kinetic": sign * end_state[:, d + 1].reshape(batch)}
        if frobenius:
            integrals["jacobian"] = sign * end_state[:, d + 2].reshape(batch)
        self._record(integrals)
        return end_state[:, :d].reshape(batch + self.event_shape), end_state[:, d].reshape(batch)

    def _record(self, regularization: dict[str, Tensor]) -> None:
        """Keep the solve's regularisers detached; hand them, attached, to an active :func:`record_regularization`."""
        self.regularization = {name: value.detach() for name, value in regularization.items()}
        if self._recorder is not None:
            self._recorder.append(regularization)

    def _solve(self, dynamics: _Dynamics, state: Tensor, times: Tensor, context: Optional[Tensor]) -> Tensor:
        """The state at ``times[-1]``. Without a graph to build (``torch.no_grad()``) and with the field's own exact
        trace (no autograd in the dynamics), the solve runs under ``torch.inference_mode()`` (no autograd bookkeeping
        per operation: 8 % of a D = 2 ``log_prob``, ``benchmarks/bench_cnf.py``) and the result is copied out of it,
        a normal tensor that a later graph may use."""
        from torchdiffeq import odeint, odeint_adjoint  # imports SciPy: here, not at import pyro_flows

        floor = 8 * torch.finfo(times.dtype).eps
        features = self.event_shape.numel()
        options: dict[str, Any] = {"norm": functools.partial(state_norm, features=features)}
        if self.solver in ADAPTIVE_SOLVERS and self.steps is None:
            options["safety"] = SAFETY
        options.update(self.options)
        if self.steps is not None:
            steps = self.steps
            options.pop("step_size", None)
            options["grid_constructor"] = lambda func, y0, t: torch.linspace(t[0], t[-1], steps + 1).to(t)
        elif self.solver in ADAPTIVE_SOLVERS and "step_t" not in options and "jump_t" not in options:
            options["step_t"] = times[-1:]  # the last step lands on t1 (measured: a smaller log p error, same NFE)
        kwargs = dict(method=self.solver, atol=max(self.atol, floor), rtol=max(self.rtol, floor), options=options)
        if not torch.is_grad_enabled() and dynamics.autograd_free:
            with torch.inference_mode():
                end_state = odeint(dynamics, state, times, **kwargs)[-1]
            return end_state.clone()
        if not self.adjoint:
            return odeint(dynamics, state, times, **kwargs)[-1]
        params: tuple[Tensor, ...] = tuple(self.vector_field.parameters())
        if context is not None and context.requires_grad:
            params += (context,)
        adjoint_options = {k: v for k, v in options.items() if k != "norm"}  # torchdiffeq's adjoint norm (ours inside)
        if "step_t" in adjoint_options and "step_t" not in self.options:
            adjoint_options["step_t"] = times[:1]  # the backward solve lands on t0
        solution = odeint_adjoint(
            dynamics, state, times, adjoint_params=params, adjoint_options=adjoint_options, **kwargs
        )
        return solution[-1]

    def __getstate__(self):
        state = super().__getstate__()
        state["regularization"], state["_recorder"] = {}, None  # the last solve's values: neither copied nor pickled
        return state

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, trace={self.trace!r}, solver={self.solver!r}, atol={self.atol:g}, "
            f"rtol={self.rtol:g}, t=({self.t0:g}, {self.t1:g}), adjoint={self.adjoint}"
            + ("" if self.steps is None else f", steps={self.steps}")
        )


class ConditionalContinuousFlow(Conditional, ContinuousFlow):
    """:class:`ContinuousFlow` whose vector field also sees a context :math:`c`: :math:`f(z, t, c)`.

    Example:
        >>> layer = ConditionalContinuousFlow(2, hidden=(16, 16), context_features=3)
        >>> layer.condition(torch.randn(5, 3))(torch.randn(2)).shape  # one point, five contexts
        torch.Size([5, 2])
    """


@contextlib.contextmanager
def record_regularization(layers: Sequence[ContinuousFlow]) -> Iterator[list[dict[str, Tensor]]]:
    """Inside the block, every solve of ``layers`` appends its regularisers ``{"kinetic": E, "jacobian": F}``
    (per sample, attached to the autograd graph) to the list it yields; after it, the layers record nothing.

    Example:
        >>> layer = ContinuousFlow(2, hidden=(8,))
        >>> with record_regularization([layer]) as solves:
        ...     y, ladj = layer.call_and_ladj(torch.randn(5, 2))
        >>> len(solves), solves[0]["kinetic"].shape
        (1, torch.Size([5]))
    """
    solves: list[dict[str, Tensor]] = []
    for layer in layers:
        layer._recorder = solves
    try:
        yield solves
    finally:
        for layer in layers:
            layer._recorder = None


@contextlib.contextmanager
def fixed_steps(module: nn.Module, steps: int, solver: str = "euler") -> Iterator[None]:
    r"""Inside the block, every :class:`ContinuousFlow` of ``module`` integrates in ``steps`` equal steps of the
    fixed-grid ``solver`` (:data:`FIXED_SOLVERS`), for sampling and likelihoods; after it, each layer's own
    solver and grid are back. The cost is ``steps`` times the solver's evaluations per step (Euler 1, midpoint 2,
    RK4 4); the error of the trajectories is :math:`O(h^p)`, :math:`h = (t_1 - t_0)/\text{steps}`, :math:`p` the
    solver's order, and vanishes at any ``steps`` for straight trajectories (rectified flow).

    Example:
        >>> flow = pf.CNF(features=2, hidden=(8,))
        >>> with fixed_steps(flow, 2, "midpoint"):
        ...     samples = flow().sample((3,))
        >>> flow.transforms[0].nfe, flow.transforms[0].steps  # 2 steps x 2 evaluations; then adaptive again
        (4, None)
    """
    check_steps(steps, solver, "fixed_steps")
    layers = [m for m in module.modules() if isinstance(m, ContinuousFlow)]
    saved = [(layer.solver, layer.steps) for layer in layers]
    for layer in layers:
        layer.solver, layer.steps = solver, steps
    try:
        yield
    finally:
        for layer, (old_solver, old_steps) in zip(layers, saved, strict=True):
            layer.solver, layer.steps = old_solver, old_steps
