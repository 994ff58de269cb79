"""Multilayer perceptrons that condition coupling layers."""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


def broadcast_cat(x: Tensor, context: Optional[Tensor]) -> Tensor:
    """Concatenate ``x`` and ``context`` on the last dim after broadcasting their batch dims."""
    if context is None:
        return x
    batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return torch.cat((x.expand(batch + x.shape[-1:]), context.expand(batch + context.shape[-1:])), dim=-1)


def check_hidden(hidden: Sequence[int], name: str) -> tuple[int, ...]:
    """``hidden`` as a tuple of widths; a ValueError naming ``hidden`` unless each is an integer >= 1."""
    try:
        widths = tuple(operator.index(h) for h in hidden)
        valid = all(w >= 1 and not isinstance(h, bool) for w, h in zip(widths, hidden, strict=True))
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{name}: hidden must be a sequence of layer widths, each an integer >= 1; got {hidden!r}")
    return widths


class MLP(nn.Module):
    r"""Fully connected network :math:`\mathbb{R}^{n + c} \to \mathbb{R}^m` with an optional context.

    ``forward(x, context)`` maps ``(..., in_features)`` (and ``(..., context_features)``,
    broadcast against it) to ``(..., out_features)``. With ``residual=True``
    every hidden layer after the first whose width equals its input's adds a
    skip connection, :math:`h \leftarrow h + \sigma(W h + b)`. The last layer
    starts at zero, so a conditioner built from it outputs zeros until trained.

    Example:
        >>> net = MLP(3, 8, hidden=(32, 32), context_features=2)
        >>> net(torch.randn(10, 3), torch.randn(2)).shape
        torch.Size([10, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        residual: bool = False,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.context_features = in_features, out_features, context_features
        self.residual = residual
        widths = [in_features + context_features, *check_hidden(hidden, "MLP")]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.activation = activation()
        self.output = nn.Linear(widths[-1], out_features)
        if zero_init:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h = broadcast_cat(x, context)
        for i, layer in enumerate(self.hidden):
            z = self.activation(layer(h))
            h = h + z if self.residual and i > 0 and z.shape[-1] == h.shape[-1] else z
        return self.output(h)
