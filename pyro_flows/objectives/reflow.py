r"""Rectified flow's reflow (Liu, Gong & Liu 2023, arXiv:2209.03003) and the straightness of a flow's trajectories.

A flow trained by flow matching transports :math:`z_0 \sim \mathcal N(0, I)` to
:math:`x_1 = \phi(z_0)` along its ODE. Retraining on the pairs :math:`(z_0, \phi(z_0))` (a coupling that is
already deterministic) makes the new flow's trajectories straighter, so that few fixed steps
(:func:`~pyro_flows.transforms.fixed_steps`) sample well; any number of rounds::

    for _ in range(rounds):
        pairs = reflow_pairs(flow, 4096)
        pf.fit(flow, pairs, objective=pf.FlowMatching(coupling="pairs"))
"""

from __future__ import annotations

import contextlib
from typing import Optional, cast

import torch
from torch import Tensor, nn

from ..flows import Flow
from ..transforms import ContinuousFlow
from ..transforms.continuous import fixed_steps
from .flow_matching import continuous_flow_of


def _base_draws(
    layer: ContinuousFlow, n: Optional[int], context: Optional[Tensor], base: Optional[Tensor]
) -> Optional[Tensor]:
    """``base`` checked against ``n``, the context's rows and the layer's event shape; None to draw from the base."""
    if base is None:
        return None
    rows = base.shape[0] if base.dim() > 0 else 0
    if (
        base.shape[1:] != layer.event_shape
        or rows < 1
        or n not in (None, rows)
        or (context is not None and context.shape[0] != rows)
    ):
        raise ValueError(
            f"reflow: base must be rows (N, *{tuple(layer.event_shape)}) with N >= 1 equal to n and to the "
            f"context's rows, got shape {tuple(base.shape)} (n={n}, context rows "
            f"{None if context is None else context.shape[0]})"
        )
    return base


def _transport(
    model: nn.Module,
    n: Optional[int],
    context: Optional[Tensor],
    steps: Optional[int],
    solver: str,
    base: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(z0, x1, kinetic)``: base draws (or ``base``), their images by the flow's ODE, and
    :math:`\int \|u\|^2 dt` per row over :math:`t \in [0, 1]` (from the layer's kinetic integral, rescaled from
    its time span)."""
    layer = continuous_flow_of(model)
    flow = cast(Flow, getattr(model, "module", model))  # a Flow: continuous_flow_of checked it
    embedded = flow.embed(context)
    parameter = next(layer.parameters())
    z0 = _base_draws(layer, n, context, base)
    if z0 is None:
        rows = n if context is None else context.shape[0]
        if rows is None or rows < 1 or (context is not None and n not in (None, rows)):
            raise ValueError(
                f"reflow: n must be a positive number of rows (the context's rows with a context), got {n}"
            )
        z0 = torch.randn(rows, *layer.event_shape, dtype=parameter.dtype, device=parameter.device)
    z0 = z0.to(parameter)
    grid = contextlib.nullcontext() if steps is None else fixed_steps(layer, steps, solver)
    with torch.no_grad(), grid:
        x1, _ = layer.call_and_ladj(z0, embedded)
        kinetic = layer.regularization["kinetic"] * (layer.t1 - layer.t0)
    return z0, x1, kinetic


def reflow_pairs(
    flow: nn.Module,
    n: Optional[int] = None,
    context: Optional[Tensor] = None,
    steps: Optional[int] = None,
    solver: str = "rk4",
    base: Optional[Tensor] = None,
) -> Tensor:
    r"""Pairs :math:`(z_0, \phi(z_0))` for reflow: ``n`` draws :math:`z_0 \sim \mathcal N(0, I)` pushed through
    the flow's ODE (the layer's own solver, or ``steps`` fixed steps of ``solver``), without gradients.

    With a conditional flow, one pair per row of ``context`` (its own context); pass the same ``context`` to
    :func:`pyro_flows.fit` with the pairs. Train on them with ``pf.FlowMatching(coupling="pairs")``.
    ``base``: the starting points ``(N, D)`` instead of ``n`` fresh :math:`\mathcal N(0, I)` draws: for a flow
    trained on fixed pairs from another source (e.g. 8 Gaussians to two moons), draws of that source.
    Shapes: returns ``(n, 2, D)``: ``[:, 0]`` the base samples, ``[:, 1]`` the flow's samples.

    Example:
        >>> flow = pf.CNF(features=2, hidden=(8,))
        >>> pairs = reflow_pairs(flow, 64, steps=4)
        >>> history = pf.fit(flow, pairs, objective=pf.FlowMatching(coupling="pairs"), max_steps=2, progress=False)
        >>> pairs.shape
        torch.Size([64, 2, 2])
    """
    z0, x1, _ = _transport(flow, n, context, steps, solver, base)
    return torch.stack([z0, x1], dim=1)


def straightness(
    flow: nn.Module,
    n: Optional[int] = None,
    context: Optional[Tensor] = None,
    steps: Optional[int] = None,
    solver: str = "rk4",
    base: Optional[Tensor] = None,
) -> Tensor:
    r"""The straightness of the flow's trajectories (Liu et al. 2023, eq. 6), over ``n`` base draws:

    .. math:: S = \mathbb E_{z_0} \int_0^1 \big\|u(x_t, t) - (x_1 - x_0)\big\|^2 dt
              = \mathbb E_{z_0} \Big[\int_0^1 \|u(x_t, t)\|^2 dt - \|x_1 - x_0\|^2\Big],

    (the cross term integrates :math:`u` to :math:`x_1 - x_0`): 0 exactly when every trajectory is a straight line
    at constant speed, which one Euler step integrates exactly. The kinetic integral comes from the same solve as
    :math:`x_1` (:class:`~pyro_flows.transforms.ContinuousFlow`'s ``regularization``); the solver as in
    :func:`reflow_pairs`, and so are ``base``'s starting points. Returns a scalar.

    Example:
        >>> abs(straightness(pf.CNF(features=2, hidden=(8,)), 100).item()) < 1e-6  # a fresh CNF does not move
        True
    """
    z0, x1, kinetic = _transport(flow, n, context, steps, solver, base)
    return (kinetic - (x1 - z0).square().sum(-1)).mean()
