r"""Flow matching: train a continuous flow's vector field by regression, without integrating the ODE.

Conditional flow matching (Lipman et al. 2023) with straight-line paths, also known as
rectified flow (Liu et al. 2023): a base sample :math:`z_0 \sim \mathcal{N}(0, I)` and a data
point :math:`x_1` are joined by

.. math:: x_t = \big(1 - (1 - \sigma_\min)\, t\big)\, z_0 + t\, x_1, \qquad
          u = \frac{dx_t}{dt} = x_1 - (1 - \sigma_\min)\, z_0, \qquad t \in [0, 1],

and the vector field regresses :math:`u`:
:math:`\mathcal{L} = \mathbb{E}_{t, z_0, x_1} \|f(x_t, t[, c]) - u\|^2`. Time 0 is the base
and time 1 the data, matching :class:`~.transforms.ContinuousFlow`'s base→data direction
(:math:`t_0 \to t_1`); a layer with another time span is trained at
:math:`s = t_0 + t\,(t_1 - t_0)` with target :math:`u / (t_1 - t_0)`. After training, the
likelihood and sampling of the flow go through the ODE as for a flow trained by maximum likelihood.
"""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import Tensor, nn

from ..flows import Flow, StandardNormal
from ..transforms import ContinuousFlow
from .likelihood import continuous_layers


def ot_pairing(z0: Tensor, x1: Tensor) -> Tensor:
    r"""The permutation :math:`\pi` of the rows of ``x1`` minimising :math:`\sum_n \|z_{0,n} - x_{1,\pi(n)}\|^2`.

    Exact minibatch optimal transport (Tong et al. 2023; Pooladian et al. 2023) by
    ``scipy.optimize.linear_sum_assignment`` on the squared-distance cost matrix.
    Shapes: ``z0``, ``x1`` ``(N, D)``; returns indices ``(N,)``.
    """
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(z0.detach().double(), x1.detach().double()).square().cpu().numpy()
    _, columns = linear_sum_assignment(cost)
    return torch.as_tensor(columns, device=x1.device)


def conditional_ot_pairing(z0: Tensor, x1: Tensor, context: Tensor) -> Tensor:
    r""":func:`ot_pairing` within each group of rows with equal ``context``: a permutation of the rows of ``x1``
    that never pairs a base sample with a row of another context.

    Pairing across contexts would make the base samples of a context depend on it (the lowest :math:`z_0`
    would go to the context with the lowest data), while sampling draws :math:`z_0 \sim \mathcal N(0, I)`
    for every context: the learnt conditionals would be wrong. Within a group, the base samples stay
    independent draws of :math:`\mathcal N(0, I)`. Rows whose context no other row shares (a continuous
    context) keep the independent pairing. Shapes: ``z0``, ``x1`` ``(N, D)``, ``context`` ``(N, ...)``;
    returns indices ``(N,)``.
    """
    order = torch.arange(x1.shape[0], device=x1.device)
    _, group = torch.unique(context.detach().reshape(x1.shape[0], -1), dim=0, return_inverse=True)
    counts = torch.bincount(group)
    for g in (counts > 1).nonzero().flatten().tolist():
        rows = (group == g).nonzero().flatten()
        order[rows] = rows[ot_pairing(z0[rows], x1[rows])]
    return order


def continuous_flow_of(model: nn.Module) -> ContinuousFlow:
    """The one :class:`~.transforms.ContinuousFlow` of a ``Flow`` (maybe DDP-wrapped) on a standard normal base."""
    flow = getattr(model, "module", model)
    layers = continuous_layers(flow)
    if (
        not isinstance(flow, Flow)
        or len(flow.transforms) != 1
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


class FlowMatching:
    r"""The flow-matching objective for :func:`pyro_flows.fit` (Lipman et al. 2023; Liu et al. 2023).

    ``objective(model, x, context)`` draws :math:`z_0 \sim \mathcal{N}(0, I)` and
    :math:`t \sim U[0, 1]` per row and returns
    :math:`\frac{1}{N}\sum_n \|f(x_{t_n}, t_n[, c_n]) - u_n\|^2` on the straight paths of the
    module docstring; with a conditional flow, the field sees the row's context embedded by
    :meth:`~.flows.Flow.embed`, as in ``log_prob`` and sampling (the embedding trains with the field).
    ``model`` must be a :class:`~.flows.Flow` of exactly one :class:`~.transforms.ContinuousFlow`
    on a :class:`~.flows.StandardNormal` base (a ValueError says so otherwise).

    Args:
        sigma_min: :math:`\sigma_\min \ge 0`, the width of the paths at the data end.
        ot_pairing: pair base samples and data rows by exact minibatch optimal transport
            (:func:`ot_pairing`), which straightens the learnt trajectories; with a context, within
            the rows of equal context only (:func:`conditional_ot_pairing`: pairing across contexts
            would bias every conditional), so a continuous context gets the independent pairing.

    Shapes: ``x`` ``(N, D)``; ``context`` ``(N, ...)``, what the flow is called with (``(N, C)`` without an embedding).

    Example:
        >>> X = pf.data.two_moons(256, generator=torch.Generator().manual_seed(0))
        >>> flow = pf.CNF(features=2, hidden=(16, 16))
        >>> history = pf.fit(flow, X, objective=pf.FlowMatching(ot_pairing=True), max_steps=5, progress=False)
        >>> flow().log_prob(X[:5]).shape  # the likelihood through the ODE
        torch.Size([5])
    """

    def __init__(self, sigma_min: float = 0.0, ot_pairing: bool = False) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"FlowMatching: sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min, self.ot_pairing = float(sigma_min), bool(ot_pairing)

    def __call__(self, model: nn.Module, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        layer = continuous_flow_of(model)
        flow = cast(Flow, getattr(model, "module", model))  # a Flow: continuous_flow_of checked it
        if x.dim() != 2:
            raise ValueError(f"FlowMatching: x must be rows (N, D), got shape {tuple(x.shape)}")
        if model is not flow:
            model() if context is None else model(context)  # through the DDP wrapper, which then syncs the gradients
        raw, context = context, flow.embed(context)  # the field sees what log_prob and sampling see: the embedding
        if context is not None and (context.dim() != 2 or context.shape[0] != x.shape[0]):
            raise ValueError(
                f"FlowMatching: the (embedded) context must have one row per row of x ({x.shape[0]}), "
                f"got shape {tuple(context.shape)}"
            )
        z0 = torch.randn_like(x)
        if self.ot_pairing:
            order = ot_pairing(z0, x) if raw is None else conditional_ot_pairing(z0, x, raw)
            x, context = x[order], None if context is None else context[order]
        t = torch.rand(x.shape[0], 1, dtype=x.dtype, device=x.device)
        x_t = (1 - (1 - self.sigma_min) * t) * z0 + t * x
        target = x - (1 - self.sigma_min) * z0
        span = layer.t1 - layer.t0
        velocity = layer.vector_field(x_t, layer.t0 + span * t.squeeze(-1), context)
        return (span * velocity - target).square().sum(-1).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min:g}, ot_pairing={self.ot_pairing})"
