"""Convolutional conditioners of image coupling layers, and a class-label embedding for conditional flows."""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .mlp import check_hidden


class CNN(nn.Module):
    r"""Glow's coupling network (Kingma & Dhariwal 2018): 3×3 conv, 1×1 convs, 3×3 conv, shapes preserved.

    ``forward(x, context)`` maps images ``(..., in_channels, H, W)`` (and an
    optional context ``(..., context_features)``, broadcast against their batch
    dims) to ``(..., out_channels, H, W)``. Hidden layers: a 3×3 convolution to
    ``hidden[0]`` channels, then a 1×1 convolution per further width, each
    followed by the activation; the context enters as a learned per-channel
    bias of the first hidden layer. The last (3×3) layer starts at zero, so a
    coupling conditioned by a fresh network is the identity.

    References
    ----------
    - D. P. Kingma and P. Dhariwal.
      *Glow: Generative Flow with Invertible 1x1 Convolutions*. NeurIPS 2018.
      `arXiv:1807.03039 <https://arxiv.org/abs/1807.03039>`__

    Example:
        >>> net = CNN(2, 4, hidden=(32, 32), context_features=3)
        >>> net(torch.randn(10, 2, 8, 8), torch.randn(3)).shape
        torch.Size([10, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        hidden = check_hidden(hidden, "CNN")
        if not hidden:
            raise ValueError("CNN: needs at least one hidden width")
        self.in_channels, self.out_channels, self.context_features = in_channels, out_channels, context_features
        widths = [in_channels, *hidden]
        kernels = [3] + [1] * (len(hidden) - 1)
        self.hidden = nn.ModuleList(
            nn.Conv2d(a, b, k, padding=k // 2) for a, b, k in zip(widths[:-1], widths[1:], kernels, strict=True)
        )
        self.context_bias = nn.Linear(context_features, hidden[0]) if context_features else None
        self.activation = activation()
        self.output = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        if self.output.bias is not None:  # always: the layer is built with a bias
            nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        batch = x.shape[:-3]
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
            context = context.expand(batch + context.shape[-1:]).reshape(-1, context.shape[-1])
        h = x.expand(batch + x.shape[-3:]).reshape(-1, *x.shape[-3:])
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if i == 0 and self.context_bias is not None:
                h = h + self.context_bias(context)[:, :, None, None]
            h = self.activation(h)
        out = self.output(h)
        return out.reshape(batch + out.shape[1:])


class ClassEmbedding(nn.Module):
    r"""Integer class labels ``(...)`` to learned vectors ``(..., features)``: the context of a class-conditional flow.

    Labels must be integers in ``[0, classes)`` (an integer tensor, or a float
    tensor holding whole numbers); anything else raises a ValueError naming the
    problem. The output has the embedding's dtype and device.

    Example:
        >>> ClassEmbedding(10, 16)(torch.tensor([3, 7])).shape
        torch.Size([2, 16])
    """

    def __init__(self, classes: int, features: int) -> None:
        super().__init__()
        integers = all(isinstance(n, Integral) and not isinstance(n, bool) for n in (classes, features))
        if not (integers and classes >= 2 and features >= 1):
            raise ValueError(
                f"ClassEmbedding: need integers classes >= 2 and features >= 1, got {classes!r}, {features!r}"
            )
        self.classes, self.features = int(classes), int(features)
        self.embedding = nn.Embedding(classes, features)

    def forward(self, labels: Tensor) -> Tensor:
        if not isinstance(labels, Tensor):
            raise TypeError(f"ClassEmbedding: labels must be a tensor of class indices, got {type(labels).__name__}")
        if labels.is_floating_point():
            if not bool((torch.isfinite(labels) & (labels == labels.round())).all()):
                raise ValueError("ClassEmbedding: labels must be whole numbers (class indices), got non-integers")
            labels = labels.long()
        elif labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"ClassEmbedding: labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() and not bool(((labels >= 0) & (labels < self.classes)).all()):
            raise ValueError(
                f"ClassEmbedding: labels must lie in [0, {self.classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return self.embedding(labels.to(self.embedding.weight.device))

    def extra_repr(self) -> str:
        return f"classes={self.classes}, features={self.features}"
