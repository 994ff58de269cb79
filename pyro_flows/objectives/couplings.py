r"""Couplings for flow matching: which base sample :math:`x_0` is joined to which data row :math:`x_1`.

A pairing function ``pairing(z0, x1) -> indices`` returns, for each base row :math:`i`, the data row
``indices[i]`` it is joined to (shapes ``(N, D)``, ``(N, D)`` → ``(N,)``). The independent coupling is the
identity; :func:`ot_pairing` solves exact minibatch optimal transport; :func:`sinkhorn_pairing` draws from
the entropic plan. :func:`conditional_ot_pairing` runs either within each group of equal contexts.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

Pairing = Callable[[Tensor, Tensor], Tensor]


def ot_pairing(z0: Tensor, x1: Tensor) -> Tensor:
    r"""The permutation :math:`\pi` of the rows of ``x1`` minimising :math:`\sum_n \|z_{0,n} - x_{1,\pi(n)}\|^2`.

    Exact minibatch optimal transport (Tong et al. 2023; Pooladian et al. 2023) by
    ``scipy.optimize.linear_sum_assignment`` on the squared-distance cost matrix.
    Shapes: ``z0``, ``x1`` ``(N, D)``; returns indices ``(N,)``.

    Example:
        >>> ot_pairing(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.1], [0.1]]))
        tensor([1, 0])
    """
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(z0.detach().double(), x1.detach().double()).square().cpu().numpy()
    _, columns = linear_sum_assignment(cost)
    return torch.as_tensor(columns, device=x1.device)


def sinkhorn_plan(cost: Tensor, epsilon: float = 0.05, max_iterations: int = 1000, tolerance: float = 1e-4) -> Tensor:
    r"""The log of the entropic optimal-transport plan between uniform marginals (Cuturi 2013), by log-domain
    Sinkhorn iterations.

    With :math:`\varepsilon' = \varepsilon \cdot \operatorname{mean}(C)` (``epsilon`` is relative to the mean cost, so
    it does not depend on the data's scale), the plan minimising
    :math:`\langle P, C\rangle - \varepsilon' H(P)` over :math:`P \mathbf 1 = \mathbf 1/N`,
    :math:`P^\top \mathbf 1 = \mathbf 1/M` is :math:`\log P_{ij} = u_i + v_j - C_{ij}/\varepsilon'`, with the
    potentials alternately set to meet each marginal,

    .. math:: u_i = -\log N - \operatorname{logsumexp}_j (v_j - C_{ij}/\varepsilon'), \qquad
              v_j = -\log M - \operatorname{logsumexp}_i (u_i - C_{ij}/\varepsilon'),

    which never exponentiates :math:`-C/\varepsilon'` (no underflow in float32 at small :math:`\varepsilon`).
    After each ``v`` update the columns are exact; the iterations stop when every row sum is within
    ``tolerance`` (relative) of :math:`1/N`, or after ``max_iterations`` (an iteration: two passes over
    :math:`C`). Shapes: ``cost`` ``(N, M)``; returns ``(N, M)``.

    Example:
        >>> log_plan = sinkhorn_plan(torch.rand(5, 4))
        >>> torch.allclose(log_plan.exp().sum(0), torch.full((4,), 0.25), atol=1e-6)
        True
    """
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    n, m = cost.shape
    scaled = cost / (epsilon * cost.mean().clamp_min(torch.finfo(cost.dtype).tiny))
    log_a, log_b = -math.log(n), -math.log(m)
    u, v = cost.new_zeros(n), cost.new_zeros(m)
    for iteration in range(max_iterations):
        row = torch.logsumexp(v - scaled, dim=1)  # the log row sums are u + row: the check costs no extra pass
        if iteration > 0 and (u + row - log_a).abs().max() < tolerance:
            break
        u = log_a - row
        v = log_b - torch.logsumexp(u.unsqueeze(1) - scaled, dim=0)
    return u.unsqueeze(1) + v - scaled


def sinkhorn_pairing(z0: Tensor, x1: Tensor, epsilon: float = 0.05, max_iterations: int = 1000) -> Tensor:
    r"""Entropic minibatch optimal transport: for each base row :math:`i`, a data row drawn from the
    :func:`sinkhorn_plan`'s conditional :math:`P_{i\cdot} / P_{i\cdot}\mathbf 1` on the squared-distance cost
    (Tong et al. 2023, who draw pairs from the plan).

    Every base row is kept once, so :math:`z_0` stays an independent draw of :math:`\mathcal N(0, I)`; a data row
    may be drawn several times or not at all, but each is drawn with probability :math:`1/N` per base row on average
    (the plan's column marginal), so the data's distribution is kept in expectation. (The plan's argmax per row
    would bias it towards data rows near the base's mode.) As ``epsilon`` → 0 the plan tends to the exact
    :func:`ot_pairing`; as it grows, to the independent coupling. Works in float32 at :math:`N = 4096`
    (log domain, :math:`N^2` memory). Shapes: ``z0``, ``x1`` ``(N, D)``; returns indices ``(N,)``.

    Example:
        >>> sinkhorn_pairing(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.1], [0.1]]), epsilon=0.01)
        tensor([1, 0])
    """
    cost = torch.cdist(z0.detach(), x1.detach()).square()
    plan = sinkhorn_plan(cost, epsilon, max_iterations).exp()
    return torch.multinomial(plan, 1).squeeze(-1)


def conditional_ot_pairing(z0: Tensor, x1: Tensor, context: Tensor, pairing: Optional[Pairing] = None) -> Tensor:
    r"""``pairing`` (default :func:`ot_pairing`; or :func:`sinkhorn_pairing`) within each group of rows with equal
    ``context``: indices of rows of ``x1`` that never pair a base sample with a row of another context.

    Pairing across contexts would make the base samples of a context depend on it (the lowest :math:`z_0`
    would go to the context with the lowest data), while sampling draws :math:`z_0 \sim \mathcal N(0, I)`
    for every context: the learnt conditionals would be wrong. Within a group, the base samples stay
    independent draws of :math:`\mathcal N(0, I)`. Rows whose context no other row shares (a continuous
    context) keep the independent pairing. Shapes: ``z0``, ``x1`` ``(N, D)``, ``context`` ``(N, ...)``;
    returns indices ``(N,)``.

    Example:
        >>> z0, x1 = torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([[1.1], [0.1], [-3.0]])
        >>> conditional_ot_pairing(z0, x1, torch.tensor([0, 0, 1]))
        tensor([1, 0, 2])
    """
    pair = ot_pairing if pairing is None else pairing
    order = torch.arange(x1.shape[0], device=x1.device)
    _, group = torch.unique(context.detach().reshape(x1.shape[0], -1), dim=0, return_inverse=True)
    counts = torch.bincount(group)
    for g in (counts > 1).nonzero().flatten().tolist():
        rows = (group == g).nonzero().flatten()
        order[rows] = rows[pair(z0[rows], x1[rows])]
    return order
