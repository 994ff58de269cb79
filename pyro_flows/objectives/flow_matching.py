r"""Flow matching: train a continuous flow's vector field by regression, without integrating the ODE.

Conditional flow matching (Lipman et al. 2023; Liu et al. 2023; Albergo & Vanden-Eijnden 2023): a base
sample :math:`z_0 \sim \mathcal{N}(0, I)` and a data point :math:`x_1`, paired by a coupling
(:mod:`.couplings`), are joined by an affine path of a scheduler (:mod:`.paths`),

.. math:: x_t = \alpha_t x_1 + \sigma_t z_0, \qquad u = \frac{dx_t}{dt} = \dot\alpha_t x_1 + \dot\sigma_t z_0,
          \qquad t \in [0, 1],

and the vector field regresses :math:`u`:
:math:`\mathcal{L} = \mathbb{E}_{t, (z_0, x_1)} \|f(x_t, t[, c]) - u\|^2`, whose minimiser is
:math:`f^*(x, t) = \mathbb E[u \mid x_t = x]`. Time 0 is the base and time 1 the data, whatever the
scheduler, matching :class:`~.transforms.ContinuousFlow`'s base→data direction
(:math:`t_0 \to t_1`); a layer with another time span is trained at
:math:`s = t_0 + t\,(t_1 - t_0)` with target :math:`u / (t_1 - t_0)`. After training, the
likelihood and sampling of the flow go through the ODE as for a flow trained by maximum likelihood
(with fixed steps: :func:`~pyro_flows.transforms.fixed_steps`).
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional, Sequence, Union, cast

import torch
from torch import Tensor, nn
from torch.distributions import Transform
from torch.nn import functional as F

from .. import transforms as T
from ..flows import Flow, StandardNormal
from ..transforms import ContinuousFlow
from ..transforms.continuous import check_guidance_scale
from .couplings import Pairing, conditional_ot_pairing, ot_pairing, sinkhorn_pairing
from .likelihood import continuous_layers
from .paths import Scheduler, scheduler_of

COUPLINGS = ("independent", "ot", "sinkhorn", "pairs")


def continuous_flow_of(
    model: nn.Module, tail: int = 0, layers: Optional[list[ContinuousFlow]] = None
) -> ContinuousFlow:
    """The one :class:`~.transforms.ContinuousFlow` of a ``Flow`` (maybe DDP-wrapped) on a standard normal base.

    ``tail``: the number of (fixed) layers allowed after it (:func:`fixed_tail`); ``layers``: the model's
    :func:`~.continuous_layers` when the caller has them (a walk of the module tree per call otherwise)."""
    flow = getattr(model, "module", model)
    layers = continuous_layers(flow) if layers is None else layers
    if (
        not isinstance(flow, Flow)
        or len(flow.transforms) != 1 + tail
        or len(layers) != 1
        or flow.transforms[0] is not layers[0]
    ):
        raise ValueError(
            "FlowMatching: the model must be a Flow consisting of exactly one ContinuousFlow (e.g. pf.CNF(...)); "
            f"got {type(flow).__name__} with layers {[type(t).__name__ for t in getattr(flow, 'transforms', [])]}"
        )
    if not isinstance(flow.base, StandardNormal):
        raise ValueError(f"FlowMatching: the base must be a StandardNormal, got {type(flow.base).__name__}")
    return layers[0]


def fixed_tail(model: nn.Module, layers: Optional[list[ContinuousFlow]] = None) -> list[Transform]:
    r"""The layers after a flow's first, continuous one: fixed, unconditional bijections (e.g. the
    :class:`~.transforms.Standardize` and :class:`~.transforms.preprocessing.Whiten` of a
    :class:`~pyro_flows.DensityEstimator`), whose inverse carries data to the ODE's end; [] for a bare CNF.

    A ValueError names what else was found: a flow matching objective trains the vector field only.
    """
    flow = getattr(model, "module", model)
    transforms = list(getattr(flow, "transforms", []))
    layers = continuous_layers(flow) if layers is None else layers
    if isinstance(flow, Flow) and len(layers) == 1 and transforms and transforms[0] is layers[0]:
        tail = transforms[1:]
        for t in tail:
            trainable = isinstance(t, nn.Module) and any(p.requires_grad for p in t.parameters())
            if trainable or isinstance(t, T.Conditional) or not t.bijective:
                raise ValueError(
                    "FlowMatching: the layers after the ContinuousFlow must be fixed, unconditional bijections "
                    f"(e.g. Standardize), got {type(t).__name__}, which flow matching would not train"
                )
        return tail
    continuous_flow_of(model)  # raises, naming the layers
    return []


class FlowMatching:
    r"""The flow-matching objective for :func:`pyro_flows.fit` (Lipman et al. 2023; Liu et al. 2023).

    ``objective(model, x, context)`` draws :math:`z_0 \sim \mathcal{N}(0, I)` and
    :math:`t \sim U[0, 1)` per row, pairs base and data rows by the coupling, and returns
    :math:`\frac{1}{N}\sum_n \|f(x_{t_n}, t_n[, c_n]) - u_n\|^2` on the scheduler's paths
    :math:`x_t = \alpha_t x_1 + \sigma_t z_0`, :math:`u = \dot\alpha_t x_1 + \dot\sigma_t z_0` (module
    docstring); with a conditional flow, the field sees the row's context embedded by
    :meth:`~.flows.Flow.embed`, as in ``log_prob`` and sampling (the embedding trains with the field).
    ``model`` must be a :class:`~.flows.Flow` of exactly one :class:`~.transforms.ContinuousFlow`
    on a :class:`~.flows.StandardNormal` base (a ValueError says so otherwise), maybe followed by fixed
    bijections (:func:`fixed_tail`: a :class:`~pyro_flows.DensityEstimator`'s standardisation and whitening),
    whose inverse maps the data to the end of the ODE before the regression: so
    ``DensityEstimator(flow="cnf").fit(X, objective=pf.FlowMatching())`` trains by flow matching.

    Args:
        sigma_min: :math:`\sigma_\min \ge 0`, the width of the ``"cond_ot"`` paths at the data end.
        ot_pairing: the same as ``coupling="ot"`` (kept for older code).
        scheduler: ``"cond_ot"`` (straight paths, the default), ``"vp"``, ``"cosine"``, ``"polynomial"``
            (:data:`~.paths.SCHEDULERS`, default parameters) or a :class:`~.paths.Scheduler` object
            (``CondOT(sigma_min)``, ``VP(beta_min, beta_max)``, ``Cosine()``, ``Polynomial(n)``).
        coupling: ``"independent"`` (default); ``"ot"``, exact minibatch optimal transport
            (:func:`~.couplings.ot_pairing`, SciPy), which straightens the learnt trajectories;
            ``"sinkhorn"``, entropic OT (:func:`~.couplings.sinkhorn_pairing`, torch, any batch size);
            with a context, both OT kinds pair within the rows of equal context only
            (:func:`~.couplings.conditional_ot_pairing`: pairing across contexts would bias every
            conditional), so a continuous context gets the independent pairing. ``"pairs"``: the rows
            are fixed pairs ``x`` ``(N, 2, D)``, ``x[:, 0]`` the base sample and ``x[:, 1]`` the data, as
            :func:`~.reflow.reflow_pairs` returns them (rectified flow's reflow, Liu et al. 2023).
        epsilon: the entropic regularisation of ``"sinkhorn"``, relative to the mean squared distance.
        context_dropout: :math:`p \in [0, 1)`, the probability that a row's (embedded) context is replaced by the
            layer's learned null context :math:`\varnothing` (classifier-free guidance, Ho & Salimans 2022): the
            field then learns both :math:`f(x, t, c)` and the marginal field :math:`f(x, t, \varnothing)` (its
            regression target averaged over the contexts), which :func:`guided_sample` combines. Needs a
            conditional flow built with ``null_context=True``; OT couplings pair before the dropout.
        time_exponent: :math:`k \ge 0`: the times are drawn with density :math:`(1 + k)\,t^k` on :math:`[0, 1)`
            (:math:`t = U^{1/(1+k)}`; 0: uniform). Any positive density has the same minimiser (the regression is
            pointwise in :math:`t`); :math:`k > 0` spends more of the batch near the data end, where the field of a
            narrow target (a posterior) is steep (the power law of Dax et al. 2023, FMPE).

    Shapes: ``x`` ``(N, D)`` (``(N, 2, D)`` with ``"pairs"``); ``context`` ``(N, ...)``, what the flow is called
    with (``(N, C)`` without an embedding).

    Example:
        >>> X = pf.data.two_moons(256, generator=torch.Generator().manual_seed(0))
        >>> flow = pf.CNF(features=2, hidden=(16, 16))
        >>> objective = pf.FlowMatching(scheduler="cosine", coupling="sinkhorn")
        >>> history = pf.fit(flow, X, objective=objective, max_steps=5, progress=False)
        >>> flow().log_prob(X[:5]).shape  # the likelihood through the ODE
        torch.Size([5])
    """

    def __init__(
        self,
        sigma_min: float = 0.0,
        ot_pairing: bool = False,
        *,
        scheduler: Union[str, Scheduler] = "cond_ot",
        coupling: Optional[str] = None,
        epsilon: float = 0.05,
        context_dropout: float = 0.0,
        time_exponent: float = 0.0,
    ) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"FlowMatching: sigma_min must be in [0, 1), got {sigma_min}")
        if ot_pairing and coupling not in (None, "ot"):
            raise ValueError(f"FlowMatching: ot_pairing=True contradicts coupling={coupling!r}; pass coupling only")
        coupling = ("ot" if ot_pairing else "independent") if coupling is None else coupling
        if coupling not in COUPLINGS:
            raise ValueError(f"FlowMatching: unknown coupling {coupling!r}; known: {list(COUPLINGS)}")
        if not epsilon > 0:
            raise ValueError(f"FlowMatching: epsilon must be > 0, got {epsilon}")
        if isinstance(context_dropout, bool) or not 0.0 <= context_dropout < 1.0:
            raise ValueError(
                f"FlowMatching: context_dropout must be a probability in [0, 1) (1 would never show the field a "
                f"context), got {context_dropout!r}"
            )
        self.context_dropout = float(context_dropout)
        if isinstance(time_exponent, bool) or not 0.0 <= time_exponent < float("inf"):
            raise ValueError(f"FlowMatching: time_exponent must be a finite number >= 0, got {time_exponent!r}")
        self.time_exponent = float(time_exponent)
        try:
            self.scheduler = scheduler_of(scheduler, sigma_min)
        except ValueError as error:
            raise ValueError(f"FlowMatching: {error}") from None
        self.coupling, self.epsilon = coupling, float(epsilon)
        self._checked: Optional[tuple] = None  # (weakref to the flow, its layers and base, layer, tail): _parts

    def _pairing(self) -> Optional[Pairing]:
        """The pairing function of an OT coupling; None for ``"independent"`` and ``"pairs"``."""
        if self.coupling == "ot":
            return ot_pairing
        if self.coupling == "sinkhorn":
            return functools.partial(sinkhorn_pairing, epsilon=self.epsilon)
        return None

    def _parts(self, model: nn.Module) -> tuple[Flow, ContinuousFlow, list[Transform]]:
        """The flow (unwrapped from DDP), its :class:`~.transforms.ContinuousFlow` and its :func:`fixed_tail`,
        checked at the first call with this flow and kept while its layers and base are the same objects: a
        training step then walks no module tree."""
        flow = getattr(model, "module", model)
        key = (tuple(getattr(flow, "transforms", ())), getattr(flow, "base", None))
        if self._checked is not None and self._checked[0]() is flow and self._checked[1] == key:
            return flow, self._checked[2], self._checked[3]
        layers = continuous_layers(flow)
        tail = fixed_tail(model, layers)
        layer = continuous_flow_of(model, len(tail), layers)
        self._checked = (weakref.ref(flow), key, layer, tail)
        return cast(Flow, flow), layer, tail  # a Flow: continuous_flow_of checked it

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the checked flow (:meth:`_parts`)."""
        return {**self.__dict__, "_checked": None}

    def __call__(self, model: nn.Module, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        flow, layer, tail = self._parts(model)
        pairs = self.coupling == "pairs"
        if x.dim() != (2 if pairs else 1) + len(layer.event_shape) or (pairs and x.shape[1] != 2):
            event = "D" if len(layer.event_shape) == 1 else ", ".join(map(str, layer.event_shape))
            expected = f"fixed pairs (N, 2, {event})" if pairs else f"rows (N, {event})"
            raise ValueError(f"FlowMatching: x must be {expected}, got shape {tuple(x.shape)}")
        if model is not flow:
            model() if context is None else model(context)  # through the DDP wrapper, which then syncs the gradients
        raw, context = context, flow.embed(context)  # the field sees what log_prob and sampling see: the embedding
        n = x.shape[0]
        if context is not None and (context.dim() != 2 or context.shape[0] != n):
            raise ValueError(
                f"FlowMatching: the (embedded) context must have one row per row of x ({n}), "
                f"got shape {tuple(context.shape)}"
            )
        if pairs:
            z0, x = x.unbind(1)
        if tail:
            with torch.no_grad():  # the data at the ODE's end: through the fixed layers' inverses
                for fixed in reversed(tail):
                    x = fixed.inv(x)
        if x.dim() != 2:  # events as rows (images flattened): what the field sees inside the ODE too
            x = x.reshape(n, -1)
            if pairs:
                z0 = z0.reshape(n, -1)
        if not pairs:
            z0 = torch.randn_like(x)
            pairing = self._pairing()
            if pairing is not None:
                order = pairing(z0, x) if raw is None else conditional_ot_pairing(z0, x, raw, pairing)
                x, context = x[order], None if context is None else context[order]
        if self.context_dropout:
            context = self._drop_context(layer, context)
        t = torch.rand(n, 1, dtype=x.dtype, device=x.device)
        if self.time_exponent:
            t = t.pow(1.0 / (1.0 + self.time_exponent))
        x_t, target = self.scheduler.path(t, z0, x)
        time, span = t.view(n), layer.t1 - layer.t0
        if layer.t0 != 0.0 or span != 1.0:
            time = layer.t0 + span * time
        velocity = layer.vector_field(x_t, time, context)
        if span != 1.0:
            velocity = span * velocity
        return F.mse_loss(velocity, target, reduction="sum") / n  # the mean over rows of the squared error

    def _drop_context(self, layer: ContinuousFlow, context: Optional[Tensor]) -> Tensor:
        """``context`` with each row replaced by the layer's null context with probability ``context_dropout``."""
        if context is None or layer.null_context is None:
            raise ValueError(
                f"FlowMatching: context_dropout={self.context_dropout:g} needs a conditional flow built with "
                "null_context=True (e.g. pf.CNF(features, context=C, null_context=True)), got "
                + ("an unconditional flow" if context is None else "a layer without a null context")
            )
        drop = torch.rand(context.shape[0], 1, device=context.device) < self.context_dropout
        return torch.where(drop, layer.null_context.to(context), context)

    def __repr__(self) -> str:
        dropout = f", context_dropout={self.context_dropout:g}" if self.context_dropout else ""
        dropout += f", time_exponent={self.time_exponent:g}" if self.time_exponent else ""
        return (
            f"{type(self).__name__}(scheduler={self.scheduler!r}, coupling={self.coupling!r}, "
            f"epsilon={self.epsilon:g}{dropout})"
        )


def guided_sample(flow: nn.Module, context: Tensor, scale: float, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
    r"""Samples of a conditional continuous flow with classifier-free guidance (Ho & Salimans 2022; Zheng et al. 2023).

    Base draws :math:`z_0 \sim \mathcal N(0, I)` are carried from :math:`t_0` to :math:`t_1` by the guided field

    .. math:: \tilde f_w(z, t, c) = f(z, t, \varnothing) + w\,\big(f(z, t, c) - f(z, t, \varnothing)\big)

    (:meth:`~.transforms.ContinuousFlow.guided`), with the flow's embedded ``context`` :math:`c` and the layer's
    learned null context :math:`\varnothing`. The flow must be a :func:`~pyro_flows.CNF` built with
    ``null_context=True`` and trained by :class:`FlowMatching` with ``context_dropout > 0``, so that
    :math:`f(\cdot, \varnothing)` is the marginal field. :math:`w = 1` samples ``flow(context)``, :math:`w = 0` the
    marginal (unconditional) flow, :math:`w > 1` sharpens the samples towards what distinguishes :math:`c`, as
    :math:`p(x \mid c)\,p(c \mid x)^{w - 1}` would (the usual guidance scales are 1-5).

    **No likelihood**: the guided field is not the velocity of a probability path of any distribution the model
    learnt (in particular not of :math:`p(x \mid c)^w p(x)^{1-w}`, Zheng et al. 2023), so guided samples have no
    exact density: guidance is offered for sampling only, as a function returning samples and not a distribution
    with a ``log_prob``; ``flow(context).log_prob`` is the unguided conditional density.

    Shapes: ``context`` ``(*batch, ...)`` as ``flow`` takes it (vectors ``(*batch, C)`` or labels ``(*batch,)``);
    returns ``(*sample_shape, *batch, D)``. Solver and grid are the layer's (few steps: ``fixed_steps``).

    References:
        - Ho & Salimans (2022), *Classifier-free diffusion guidance*, arXiv:2207.12598.
        - Zheng, Le, Shaul, Lipman, Grover & Chen (2023), *Guided flows for generative modeling and decision making*,
          arXiv:2311.13443.

    Example:
        >>> flow = pf.CNF(features=2, classes=3, hidden=(16,), null_context=True)
        >>> labels = torch.randint(3, (64,))
        >>> objective = pf.FlowMatching(context_dropout=0.2)
        >>> history = pf.fit(flow, torch.randn(64, 2), context=labels, objective=objective, max_steps=2, progress=False)
        >>> pf.guided_sample(flow, torch.tensor([0, 2]), scale=3.0, sample_shape=(5,)).shape
        torch.Size([5, 2, 2])
    """
    name = "guided_sample"
    check_guidance_scale(scale, name)
    flow_module = getattr(flow, "module", flow)
    if isinstance(flow_module, Flow) and flow_module.context_features == 0:
        raise ValueError(f"{name}: the flow is unconditional; guidance needs a conditional flow (context= or classes=)")
    try:
        layer = continuous_flow_of(flow)
    except ValueError as error:
        raise ValueError(f"{name}: {str(error).removeprefix('FlowMatching: ')}") from None
    model = cast(Flow, flow_module)
    embedded = cast(Tensor, model.embed(context))
    base = cast(StandardNormal, model.base)(embedded.shape[:-1])  # continuous_flow_of checked the base
    return layer.guided(base.sample(torch.Size(sample_shape)), embedded, scale)
