r"""Distances between samples: how close a generative model's samples are to held-out data."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sliced_wasserstein(
    x: Tensor, y: Tensor, projections: int = 256, generator: Optional[torch.Generator] = None
) -> Tensor:
    r"""The sliced 2-Wasserstein distance between the empirical distributions of ``x`` and ``y``
    (Rabin et al. 2011; Bonneel et al. 2015), by Monte Carlo over ``projections`` random directions:

    .. math:: SW_2(\mu, \nu) = \Big(\mathbb E_{\theta \sim U(S^{D-1})}
              \int_0^1 \big|F^{-1}_{\theta_\# \mu}(q) - F^{-1}_{\theta_\# \nu}(q)\big|^2 dq\Big)^{1/2},

    where the 1-D distance between projections is that of their quantile functions (sorted samples; with
    unequal sizes both at the levels :math:`(k + \frac12)/K`, :math:`K` the larger size, by linear
    interpolation). It is a metric on distributions, in the data's units; between two samples of the same
    distribution it is of order :math:`N^{-1/2}`. For a shift, :math:`\nu = \mu(\cdot - s)`, every projection
    is shifted by :math:`\theta^\top s` and the estimate is :math:`(\frac1K \sum_k (\theta_k^\top s)^2)^{1/2}`,
    whose square has mean :math:`\|s\|^2 / D` over the directions.
    Shapes: ``x`` ``(N, D)``, ``y`` ``(M, D)``; returns a scalar.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2000, 2, generator=g)
        >>> round(sliced_wasserstein(x, x + torch.tensor([1.0, 0.0]), generator=g).item(), 1)  # |s| / sqrt(D)
        0.7
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(
            f"sliced_wasserstein: x and y must be non-empty rows (N, D), (M, D) of one D, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if projections < 1:
        raise ValueError(f"sliced_wasserstein: projections must be >= 1, got {projections}")
    directions = torch.randn(x.shape[1], projections, generator=generator, dtype=x.dtype).to(x.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px, py = (x @ directions).sort(0).values, (y @ directions).sort(0).values
    if px.shape[0] != py.shape[0]:
        size = max(px.shape[0], py.shape[0])
        levels = (torch.arange(size, dtype=x.dtype, device=x.device) + 0.5) / size
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return (px - py).square().mean().sqrt()


def _quantiles(sorted_rows: Tensor, levels: Tensor) -> Tensor:
    """Linear interpolation of each column of sorted samples at the levels, the k-th sample at ``(k + 1/2)/N``."""
    n = sorted_rows.shape[0]
    position = (levels * n - 0.5).clamp(0, n - 1)
    low = position.floor().long()
    high = (low + 1).clamp(max=n - 1)
    weight = (position - low).unsqueeze(-1)
    return sorted_rows[low] * (1 - weight) + sorted_rows[high] * weight
