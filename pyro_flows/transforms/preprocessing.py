"""Fixed preprocessing bijections between a flow and bounded data."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import constraints

from .base import FlowTransform


class Logit(FlowTransform):
    r"""Squashes the flow into the unit interval: the inverse of RealNVP's logit preprocessing (Dinh et al. 2017).

    Base→data, elementwise,

    .. math::
        y = \frac{\sigma(x) - \alpha}{1 - 2\alpha}, \qquad
        \log|\det J| = \sum_i \big(\log \sigma(x_i) + \log \sigma(-x_i)\big) - D \log(1 - 2\alpha),

    so data :math:`y \in [0, 1]` are mapped to the base side by
    :math:`x = \operatorname{logit}(\alpha + (1 - 2\alpha) y)`, which stays finite
    at the edges for :math:`\alpha > 0`. Data outside the open interval
    :math:`(-\tfrac{\alpha}{1 - 2\alpha}, 1 + \tfrac{\alpha}{1 - 2\alpha})`
    have no preimage: the inverse raises a ValueError naming them.

    Args:
        features: :math:`D`, or an image shape ``(C, H, W)``.
        alpha: :math:`\alpha \in [0, 1/2)` (Dinh et al. use 0.05).

    Example:
        >>> layer = Logit((1, 2, 2), alpha=0.05)
        >>> x, ladj = layer.inverse_and_ladj(torch.tensor([[[0.0, 0.5], [0.9, 1.0]]]))
        >>> bool(torch.isfinite(x).all())
        True

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP* (the logit of the jittered, rescaled
          data), arXiv:1605.08803.
    """

    def __init__(self, features: Union[int, Sequence[int]], alpha: float = 0.05) -> None:
        super().__init__((features,) if isinstance(features, int) else tuple(features))
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit: alpha must be in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)
        self.log_width = math.log1p(-2 * self.alpha)

    @property
    def codomain(self):
        margin = self.alpha / (1 - 2 * self.alpha)
        return constraints.independent(constraints.interval(-margin, 1 + margin), len(self.event_shape))

    def _log_det(self, x: Tensor) -> Tensor:
        log_derivative = -F.softplus(-x) - F.softplus(x) - self.log_width
        return log_derivative.flatten(x.dim() - len(self.event_shape)).sum(-1)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha), self._log_det(x)

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * y
        outside = ~((s > 0) & (s < 1))
        if bool(outside.any()):
            low, high = self.codomain.base_constraint.lower_bound, self.codomain.base_constraint.upper_bound
            raise ValueError(
                f"Logit: {int(outside.sum())} values lie outside its support ({low:.4g}, {high:.4g}); "
                f"e.g. {float(y[outside][0]):.4g}. Scale the data to [0, 1] first"
            )
        x = torch.log(s) - torch.log1p(-s)
        return x, -self._log_det(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
