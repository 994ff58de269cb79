"""Time-conditioned vector fields :math:`f(z, t[, c])` for continuous normalizing flows."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .mlp import broadcast_cat, check_hidden


def time_column(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` (a number, a scalar tensor or a batch ``(...)``) as a column ``(..., 1)`` with ``like``'s dtype/device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(1) if t.dim() == 0 else t.unsqueeze(-1)


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's concat-squash layer (Grathwohl et al. 2019): a linear map gated and shifted by the time.

    .. math:: \mathrm{CS}(h, t) = (W h + b) \odot \sigma(w_g t + b_g) + w_b t

    Shapes: ``h`` is ``(..., in_features)``, ``t`` a column ``(..., 1)`` broadcastable against it.

    References
    ----------
    - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and D. Duvenaud.
      *FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models*. ICLR 2019.
      `arXiv:1810.01367 <https://arxiv.org/abs/1810.01367>`__

    Example:
        >>> layer = ConcatSquashLinear(3, 8)
        >>> layer(torch.randn(10, 3), torch.rand(10, 1)).shape
        torch.Size([10, 8])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.time_bias = nn.Linear(1, out_features, bias=False)

    def forward(self, h: Tensor, t: Tensor) -> Tensor:
        return self.linear(h) * torch.sigmoid(self.gate(t)) + self.time_bias(t)

    def zero_(self) -> ConcatSquashLinear:
        """Make the layer output zero for every input (a fresh CNF built on it is the identity)."""
        for p in (self.linear.weight, self.linear.bias, self.time_bias.weight):
            nn.init.zeros_(p)
        return self


class VectorField(nn.Module):
    r"""A time-conditioned MLP vector field :math:`f_\theta(z, t[, c]) \in \mathbb{R}^D` of concat-squash layers.

    The dynamics of a continuous normalizing flow (Chen et al. 2018; Grathwohl et al. 2019),
    :math:`\frac{dz}{dt} = f_\theta(z, t, c)`. Every layer sees the time through
    :class:`ConcatSquashLinear`; a context :math:`c` (constant in time) is concatenated to
    :math:`z`. The activation should be smooth (the trace of the Jacobian is differentiated
    during training). The last layer starts at zero, so a fresh field is :math:`f \equiv 0`
    and the flow it drives is the identity.

    Shapes: ``z`` ``(..., features)``; ``t`` a number, a scalar tensor or a batch broadcastable
    with ``z``'s batch dims; ``context`` ``(..., context_features)``. Output: ``(..., features)``.

    Args:
        features: :math:`D`.
        hidden: widths of the hidden layers.
        context_features: size of :math:`c` (0: unconditional).
        activation: a smooth activation module class (default ``nn.SiLU``; ``nn.Softplus``, ``nn.Tanh`` work too).

    References
    ----------
    - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and D. Duvenaud.
      *FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models*. ICLR 2019.
      `arXiv:1810.01367 <https://arxiv.org/abs/1810.01367>`__

    Example:
        >>> f = VectorField(2, hidden=(32, 32))
        >>> f(torch.randn(10, 2), torch.tensor(0.5)).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.features, self.context_features = int(features), int(context_features)
        widths = [features + context_features, *check_hidden(hidden, "VectorField"), features]
        layers = [ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        layers[-1].zero_()
        self.layers = nn.ModuleList(layers)
        self.activation = activation()

    def forward(self, z: Tensor, t: Tensor | float, context: Optional[Tensor] = None) -> Tensor:
        h = broadcast_cat(z, context)
        t = time_column(t, h)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h, t))
        return self.layers[-1](h, t)
