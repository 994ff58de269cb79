r"""A time-conditioned convolutional vector field: a small U-Net for continuous flows over images.

The field :math:`f_\theta(x, t[, c])` of a continuous normalizing flow (or of flow matching) over
images :math:`x \in \mathbb{R}^{C \times H \times W}`, with the interface of
:class:`~.vector_field.VectorField`: called as ``f(z, t, context)``. It takes images ``(..., C, H, W)`` or
the same images flattened to rows ``(..., C·H·W)`` (what a :class:`~pyro_flows.transforms.ContinuousFlow`
over ``C·H·W`` features and :class:`~pyro_flows.FlowMatching` hand it) and answers in the same layout.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .cnn import aligned_context_features, split_aligned
from .mlp import check_hidden


def sinusoidal_embedding(t: Tensor, features: int, max_period: float = 10_000.0, scale: float = 1_000.0) -> Tensor:
    r"""The transformer's sinusoidal embedding of times ``t`` ``(...)``: ``(..., features)``, ``features`` even.

    .. math:: e(t) = \big(\cos(s t\, \omega_k),\ \sin(s t\, \omega_k)\big)_{k < F/2}, \qquad
              \omega_k = P^{-k/(F/2)},

    with :math:`s` = ``scale`` (times in :math:`[0, 1]` become positions in :math:`[0, 1000]`, as in DDPM)
    and :math:`P` = ``max_period`` (Vaswani et al. 2017; Ho et al. 2020). Smooth in :math:`t`.

    Example:
        >>> sinusoidal_embedding(torch.tensor([0.0, 0.5]), 8).shape
        torch.Size([2, 8])
    """
    half = features // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angles = (scale * t).unsqueeze(-1) * frequencies
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1)


def _groups(channels: int, most: int = 8) -> int:
    """The largest number of groups <= ``most`` that divides ``channels`` (GroupNorm normalises each sample alone)."""
    return math.gcd(channels, most)


class LayerNormGroups(nn.GroupNorm):
    r"""``nn.GroupNorm`` computed as ``F.layer_norm`` over each group, then the per-channel affine map: the same
    function, whose double backward also runs batched.

    The exact trace of :class:`~pyro_flows.transforms.ContinuousFlow` takes all :math:`D` vector-Jacobian
    products in one batched call (``is_grads_batched``); under gradients (maximum-likelihood training) it
    differentiates them again, and torch's native group-norm kernel has no batching rule for that double
    backward (a RuntimeError about mismatched sizes). Layer norm has one. It costs about 20 % of a U-Net's
    training step on a CPU, so :class:`UNet` uses it only where asked (``batched_jacobian=True``).

    Example:
        >>> x = torch.randn(2, 4, 3, 3)
        >>> norm, native = LayerNormGroups(2, 4), nn.GroupNorm(2, 4)
        >>> torch.allclose(norm(x), native(x), atol=1e-6)
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        groups = x.reshape(x.shape[0], self.num_groups, -1)
        h = F.layer_norm(groups, groups.shape[-1:], eps=self.eps).reshape(x.shape)
        return h if self.weight is None else torch.addcmul(self.bias[:, None, None], h, self.weight[:, None, None])


class ResidualBlock(nn.Module):
    r"""A U-Net's residual block conditioned on an embedding :math:`e` (time, and context when there is one).

    .. math:: h = W_1 * \sigma(\mathrm{GN}(x)) + A e, \qquad
              \mathrm{out} = W_2 * \sigma(\mathrm{GN}(h)) + S x

    (3×3 convolutions :math:`W_1, W_2`, a per-channel shift :math:`A e`, a 1×1 convolution :math:`S` where the
    widths differ, else the identity). GroupNorm normalises each image alone, so the samples of a batch stay
    independent (a batch norm would couple them and make the Jacobian's trace wrong).

    ``norm``: the group-norm class, ``nn.GroupNorm`` or :class:`LayerNormGroups` (see :class:`UNet`).

    Shapes: ``x`` ``(N, in_channels, H, W)``, ``embedding`` ``(N, embedding_features)``;
    output ``(N, out_channels, H, W)``.

    Example:
        >>> block = ResidualBlock(4, 8, embedding_features=16)
        >>> block(torch.randn(2, 4, 7, 7), torch.randn(2, 16)).shape
        torch.Size([2, 8, 7, 7])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_features: int,
        activation: type[nn.Module] = nn.SiLU,
        norm: type[nn.GroupNorm] = nn.GroupNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.shift = nn.Linear(embedding_features, out_channels)
        self.norm2 = norm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.activation = activation()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(self.activation(self.norm1(x))) + self.shift(embedding)[:, :, None, None]
        return self.conv2(self.activation(self.norm2(h))) + self.skip(x)


def _check_size(value: int, what: str) -> int:
    """``value`` as an int if it is an integer >= 0; else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"UNet: {what} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_image_shape(shape: Sequence[int]) -> torch.Size:
    valid = len(shape) == 3 and all(isinstance(n, Integral) and not isinstance(n, bool) and n >= 1 for n in shape)
    if not valid:
        raise ValueError(f"UNet: shape must be an image shape (C, H, W) of integers >= 1, got {tuple(shape)!r}")
    return torch.Size(int(n) for n in shape)


class UNet(nn.Module):
    r"""A small time-conditioned U-Net vector field :math:`f_\theta(x, t[, c])` over images (Ronneberger et al. 2015).

    The network of diffusion and flow-matching image models (Ho et al. 2020; Lipman et al. 2023), small:

    - **time**: a sinusoidal embedding of :math:`t` (:func:`sinusoidal_embedding`) through a two-layer MLP
      gives :math:`e(t)`; a context vector :math:`c_v` (e.g. a class label's
      :class:`~.cnn.ClassEmbedding`) adds a learned :math:`A c_v` to it; every :class:`ResidualBlock` is shifted
      by a linear map of :math:`e`;
    - **aligned context** (``context_shape=(C_c, H_c, W_c)``): an image :math:`c_I` laid out like :math:`x`
      (a low-resolution, masked or grey version, or an :class:`~.cnn.AlignedContext`'s features), resized to
      :math:`H \times W` (:func:`~.cnn.resize`) and concatenated to :math:`x` on the channels;
    - **down**: at level :math:`i` a residual block to ``channels[i]`` channels, then (except at the last
      level) a 3×3 convolution of stride 2, :math:`H \to \lceil H/2 \rceil`: any size works
      (28 → 14 → 7 → 4); a middle block at the lowest resolution;
    - **up**: nearest-neighbour upsampling to the size of the skip connection (7, not 8, above 4), a 3×3
      convolution, concatenation with the skip and a residual block;
    - **out**: GroupNorm, activation and a 3×3 convolution to :math:`C` channels that **starts at zero**
      (weights and bias), so a fresh field is :math:`f \equiv 0` and the flow it drives the identity.

    Every normalisation is per image (group norm) and the activation smooth (SiLU by default), so the
    samples of a batch are independent and the Jacobian's trace (exact or Hutchinson's) is well defined.

    Layout: ``z`` is images ``(..., C, H, W)`` or the same images flattened to ``(..., C·H·W)``; the output
    has ``z``'s layout. A :class:`~pyro_flows.transforms.ContinuousFlow` over ``C·H·W`` features
    (``vector_field=UNet(...)``) and :class:`~pyro_flows.FlowMatching` use it unchanged, on rows.

    Shapes: ``t`` a number, a scalar tensor or a batch ``(...)``; ``context`` ``(..., context_features)``: as every
    conditioner of the library takes it (:mod:`~.cnn`), the aligned context flattened first (if any), then the
    vector features; all batch dims broadcast.

    Args:
        shape: the image shape ``(C, H, W)``.
        channels: widths of the levels (one down-sampling between consecutive levels).
        context_features: size of the whole flat context (0: none; with ``context_shape``, 0 means the aligned
            context alone).
        context_shape: ``(C_c, H_c, W_c)`` of an aligned context (None: none).
        time_features: size of the sinusoidal time embedding (even); the embedding :math:`e` has
            ``4 * channels[0]`` features.
        activation: a smooth activation module class (default ``nn.SiLU``).
        batched_jacobian: normalise by :class:`LayerNormGroups` (default), whose double backward batches, so
            that the exact trace of a :class:`~pyro_flows.transforms.ContinuousFlow` works under gradients
            (maximum-likelihood training); False: torch's native ``nn.GroupNorm``, the same function about 20 %
            faster per training step, for flow matching, Hutchinson's trace, and the exact trace without
            gradients (evaluation) — what :func:`~pyro_flows.ImageCNF` builds unless ``trace="exact"``.

    References
    ----------
    - O. Ronneberger, P. Fischer and T. Brox.
      *U-Net: Convolutional Networks for Biomedical Image Segmentation*. MICCAI 2015.
      `arXiv:1505.04597 <https://arxiv.org/abs/1505.04597>`__
    - J. Ho, A. Jain and P. Abbeel. *Denoising Diffusion Probabilistic Models*. NeurIPS 2020.
      `arXiv:2006.11239 <https://arxiv.org/abs/2006.11239>`__
    - Y. Lipman, R. T. Q. Chen, H. Ben-Hamu, M. Nickel and M. Le. *Flow Matching for Generative Modeling*.
      ICLR 2023. `arXiv:2210.02747 <https://arxiv.org/abs/2210.02747>`__

    Example:
        >>> f = UNet((1, 28, 28), channels=(8, 16, 16), context_features=4)
        >>> f(torch.randn(3, 1, 28, 28), torch.rand(3), torch.randn(3, 4)).shape
        torch.Size([3, 1, 28, 28])
        >>> f(torch.randn(3, 784), 0.5, torch.randn(4)).shape  # rows, one time, one context for all
        torch.Size([3, 784])
        >>> g = UNet((1, 28, 28), channels=(8, 16), context_shape=(1, 14, 14))  # a 14×14 image condition
        >>> g(torch.randn(3, 1, 28, 28), torch.rand(3), torch.randn(3, 196)).shape
        torch.Size([3, 1, 28, 28])
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        context_features: int = 0,
        context_shape: Optional[Sequence[int]] = None,
        time_features: int = 32,
        activation: type[nn.Module] = nn.SiLU,
        batched_jacobian: bool = True,
    ) -> None:
        super().__init__()
        self.shape = _check_image_shape(shape)
        norm = LayerNormGroups if batched_jacobian else nn.GroupNorm
        widths = check_hidden(channels, "UNet")
        if not widths or isinstance(time_features, bool) or time_features < 2 or time_features % 2:
            raise ValueError(
                f"UNet: needs at least one level of channels and an even time_features >= 2, "
                f"got channels={channels!r}, time_features={time_features!r}"
            )
        self.context_features, self.context_shape = aligned_context_features(
            _check_size(context_features, "context_features"), context_shape, 2, "UNet"
        )
        aligned = 0 if self.context_shape is None else self.context_shape.numel()
        self.vector_features = self.context_features - aligned
        self.time_features = int(time_features)
        embedding = 4 * widths[0]
        self.time_mlp = nn.Sequential(
            nn.Linear(time_features, embedding), activation(), nn.Linear(embedding, embedding)
        )
        self.context_embedding = nn.Linear(self.vector_features, embedding) if self.vector_features else None
        context_channels = 0 if self.context_shape is None else self.context_shape[0]
        self.stem = nn.Conv2d(self.shape[0] + context_channels, widths[0], 3, padding=1)
        ins = (widths[0], *widths[:-1])
        self.down = nn.ModuleList(
            ResidualBlock(a, b, embedding, activation, norm) for a, b in zip(ins, widths, strict=True)
        )
        self.downsample = nn.ModuleList(nn.Conv2d(b, b, 3, stride=2, padding=1) for b in widths[:-1])
        self.middle = ResidualBlock(widths[-1], widths[-1], embedding, activation, norm)
        self.upsample = nn.ModuleList(
            nn.Conv2d(b, a, 3, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.up = nn.ModuleList(ResidualBlock(2 * b, b, embedding, activation, norm) for b in widths)
        self.out_norm = norm(_groups(widths[0]), widths[0])
        self.activation = activation()
        self.out = nn.Conv2d(widths[0], self.shape[0], 3, padding=1)
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:  # always: the layer is built with a bias
            nn.init.zeros_(self.out.bias)

    def _images(self, z: Tensor) -> tuple[Tensor, bool]:
        """``z`` as images ``(..., C, H, W)`` and whether it came as flat rows; a ValueError for any other shape."""
        if z.dim() >= 3 and z.shape[-3:] == self.shape:
            return z, False
        if z.dim() >= 1 and z.shape[-1] == self.shape.numel():
            return z.reshape(z.shape[:-1] + self.shape), True
        raise ValueError(
            f"UNet: z must be images (..., {', '.join(map(str, self.shape))}) or rows (..., {self.shape.numel()}), "
            f"got shape {tuple(z.shape)}"
        )

    def _embedding(self, t: Tensor, vector: Optional[Tensor]) -> Tensor:
        """:math:`e(t) + A c_v`, rows ``(N, 4 * channels[0])``."""
        e = self.time_mlp(sinusoidal_embedding(t, self.time_features))
        return e if self.context_embedding is None or vector is None else e + self.context_embedding(vector)

    def forward(self, z: Tensor, t: Tensor | float, context: Optional[Tensor] = None) -> Tensor:
        x, flat = self._images(z)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if context is None and self.context_features:
            raise ValueError(f"UNet: needs a context of shape (..., {self.context_features}), got none")
        if context is not None and not self.context_features:
            raise ValueError(f"UNet: built without a context, got one of shape {tuple(context.shape)}")
        batch = torch.broadcast_shapes(x.shape[:-3], t.shape, () if context is None else context.shape[:-1])
        x = x.expand(batch + self.shape).reshape(-1, *self.shape)
        t = t.expand(batch).reshape(-1)
        if context is not None:
            if context.shape[-1] != self.context_features:
                raise ValueError(
                    f"UNet: the context must have shape (..., {self.context_features}), got {tuple(context.shape)}"
                )
            context = context.expand(batch + context.shape[-1:]).reshape(-1, self.context_features)
        aligned, vector = split_aligned(context, self.context_shape, self.shape[1:])
        if aligned is not None:
            x = torch.cat((x, aligned), dim=1)
        out = self.out(self.activation(self.out_norm(self._unet(x, self._embedding(t, vector)))))
        return out.reshape(batch + ((self.shape.numel(),) if flat else self.shape))

    def _unet(self, x: Tensor, e: Tensor) -> Tensor:
        """The down path, the middle block and the up path with skip connections: ``(N, channels[0], H, W)``."""
        h, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, e)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, size=skips[i].shape[-2:], mode="nearest"))
            h = self.up[i](torch.cat((h, skips[i]), dim=1), e)
        return h

    def extra_repr(self) -> str:
        aligned = "" if self.context_shape is None else f", context_shape={tuple(self.context_shape)}"
        return f"shape={tuple(self.shape)}, context_features={self.context_features}{aligned}"
