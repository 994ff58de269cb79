"""Convolutional conditioners of image coupling layers, a class-label embedding, and aligned contexts.

An *aligned* context is an image ``(C_c, H_c, W_c)`` (or a signal ``(C_c, L_c)``) laid out like the data, e.g. the
low-resolution image of super-resolution. Layers see every context as one vector ``(..., context_features)``; an
aligned context is carried as its flattening, which leads that vector (any vector features follow it), and a
conditioner unflattens it, resizes it to its own resolution (:func:`resize`) and concatenates it on the channels of
its input. :class:`AlignedContext` makes that vector from a user's condition image (and labels or a vector).
"""

from __future__ import annotations

import functools
from numbers import Integral
from typing import Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import check_hidden

_KIND = {1: "a feature sequence", 2: "an image"}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


def check_context_shape(context_shape: Sequence[int], spatial: int, name: str) -> torch.Size:
    """``context_shape`` as a ``torch.Size`` if it is ``(C_c, H_c, W_c)`` (``spatial=2``) or ``(C_c, L_c)``
    (``spatial=1``) of integers >= 1; a ValueError naming it otherwise."""
    form = "(C_c, H_c, W_c)" if spatial == 2 else "(C_c, L_c)"
    try:
        shape = torch.Size(int(n) for n in context_shape)
        valid = len(shape) == spatial + 1 and min(shape) >= 1 and all(isinstance(n, Integral) for n in context_shape)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{name}: context_shape must be the shape {form} of {_KIND[spatial]}, got {context_shape!r}")
    return shape


def aligned_context_features(
    context_features: int, context_shape: Optional[Sequence[int]], spatial: int, name: str
) -> tuple[int, Optional[torch.Size]]:
    """``(context_features, context_shape)`` of a conditioner or layer whose context may lead with an aligned one.

    ``context_features`` counts the whole flat context: the flattened ``context_shape`` (if any) and the vector
    features after it; 0 with a ``context_shape`` means the aligned context alone. A ValueError names a
    ``context_features`` smaller than the flattened ``context_shape``.

    Example:
        >>> aligned_context_features(0, (1, 14, 14), 2, "CNN")
        (196, torch.Size([1, 14, 14]))
    """
    if context_shape is None:
        return int(context_features), None
    shape = check_context_shape(context_shape, spatial, name)
    if not context_features:
        return shape.numel(), shape
    if context_features < shape.numel():
        raise ValueError(
            f"{name}: context_features={context_features} counts the flattened context_shape {tuple(shape)} "
            f"({shape.numel()} entries) and the vector features after it, so it must be >= {shape.numel()}"
        )
    return int(context_features), shape


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Signals ``(..., C, L)`` or images ``(..., C, H, W)`` resized to ``size`` (``(L',)`` or ``(H', W')``).

    Shrinking averages the input over each output cell (``"area"``: halving takes the mean of each 2×2 block);
    growing interpolates linearly (1-D) or bilinearly (2-D) between pixel centres (``align_corners=False``); the
    same size returns ``x`` itself.

    Example:
        >>> resize(torch.tensor([[[0.0, 2.0]]]), (4,))
        tensor([[[0.0000, 0.5000, 1.5000, 2.0000]]])
    """
    spatial = len(size)
    old = tuple(x.shape[x.dim() - spatial :])
    if old == tuple(size):
        return x
    flat = x.reshape((-1,) + x.shape[x.dim() - spatial - 1 :])
    if all(new <= n for new, n in zip(size, old, strict=True)):
        out = F.interpolate(flat, size=tuple(size), mode="area")
    else:
        out = F.interpolate(flat, size=tuple(size), mode="linear" if spatial == 1 else "bilinear", align_corners=False)
    return out.reshape(x.shape[: x.dim() - spatial] + out.shape[-spatial:])


def flatten_batch(x: Tensor, context: Optional[Tensor], event_dim: int) -> tuple[Tensor, Optional[Tensor], torch.Size]:
    """``x`` ``(..., *event)`` and ``context`` ``(..., F)`` broadcast and flattened to ``(N, *event)`` and ``(N, F)``,
    with the broadcast batch shape (a network's output is reshaped back to it)."""
    event = x.shape[x.dim() - event_dim :]
    batch = x.shape[: x.dim() - event_dim]
    if context is not None and context.dim() == 2 and len(batch) == 1 and context.shape[0] == batch[0]:
        return x, context, batch  # already flat, one context row per input
    if context is not None:
        batch = torch.broadcast_shapes(batch, context.shape[:-1])
        context = context.expand(batch + context.shape[-1:]).reshape(-1, context.shape[-1])
    return x.expand(batch + event).reshape((-1,) + event), context, batch


def unflatten_batch(out: Tensor, batch: torch.Size) -> Tensor:
    """A network's output ``(N, ...)`` with its batch dims restored to ``batch`` (itself when ``batch`` is ``(N,)``)."""
    return out if len(batch) == 1 else out.reshape(batch + out.shape[1:])


def split_aligned(
    context: Optional[Tensor], context_shape: Optional[torch.Size], size: Sequence[int]
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A flat context ``(N, F)`` split into its aligned part, unflattened to ``context_shape`` and resized to
    ``size`` (``(N, C_c, *size)``; None without a ``context_shape``), and its vector part (None when empty)."""
    if context is None:
        return None, None
    if context_shape is None:
        return None, context
    aligned = resize(context[:, : context_shape.numel()].unflatten(-1, context_shape), size)
    vector = context[:, context_shape.numel() :]
    return aligned, vector if vector.shape[-1] else None


def with_aligned_context(
    x: Tensor, context: Optional[Tensor], context_shape: Optional[torch.Size]
) -> tuple[Tensor, Optional[Tensor], torch.Size]:
    """The input of an image network: ``x`` ``(..., C, H, W)`` flattened to ``(N, C, H, W)`` with the aligned part
    of ``context`` resized to ``H × W`` and concatenated on its channels, the vector part ``(N, V)`` (or None), and
    the broadcast batch shape. Without a context, ``x`` passes untouched (a view)."""
    if context is None and x.dim() == 4:
        return x, None, x.shape[:1]
    h, context, batch = flatten_batch(x, context, 3)
    aligned, vector = split_aligned(context, context_shape, x.shape[-2:])
    if aligned is not None:
        h = torch.cat((h, aligned), dim=1)
    return h, vector, batch


def conv_layout(h: Tensor) -> Tensor:
    """``h`` ``(N, C, H, W)`` in the channels-last memory layout on the CPU in float32, the layout in which oneDNN's
    convolutions and their backward run fastest at the sizes of image flows (1.3-4x faster than on NCHW tensors
    for Glow's coupling networks at 4×4 to 14×14, 1 thread); elsewhere ``h`` itself. The values are the same: only
    the strides change; the networks return their outputs in the usual (NCHW) layout.

    Example:
        >>> conv_layout(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)
        True
    """
    if h.device.type == "cpu" and h.dtype == torch.float32:
        return h.contiguous(memory_format=torch.channels_last)
    return h


DENSE_CONV_ENTRIES = 65536
r"""A 3×3 convolution of images ``(C, H, W)`` to ``O`` channels runs as one matmul (:func:`dense_conv`) when its
matrix has at most this many entries, :math:`C O (HW)^2`, on images of at most 4×4 pixels: at 4×4 that admits
:math:`C O \le 256` (Glow's 64-channel coupling networks on 8×8 digits), at 2×2 :math:`C O \le 4096`. Measured at
batch 32 and 128, one CPU thread: inside these bounds the matmul is 1.4-2.9× faster than oneDNN's kernels (forward
and backward), at 4×4 with :math:`C O \ge 512` it is slower (0.2-0.9×)."""


def shift_matrices(k: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``S`` ``(k·k, H·W·H·W)``: ``S[t].view(H·W, H·W)[p, q]`` is 1 where kernel tap ``t`` of a zero-padded
    ``k × k`` convolution reads input pixel ``p`` for output pixel ``q`` (pixels flattened row-major), else 0.

    Built from comparisons only (no data-dependent shapes), so that ``torch.compile`` traces it into one graph.

    Example:
        >>> shift_matrices(3, (2, 2), torch.float32, torch.device("cpu"))[4].view(4, 4)  # the centre tap: identity
        tensor([[1., 0., 0., 0.],
                [0., 1., 0., 0.],
                [0., 0., 1., 0.],
                [0., 0., 0., 1.]])
    """
    height, width = size
    pixels = torch.arange(height * width, device=device)
    rows, cols = pixels // width, pixels % width
    taps = []
    for tap in range(k * k):
        dy, dx = tap // k - k // 2, tap % k - k // 2  # output pixel q = (y, x) reads input pixel (y + dy, x + dx)
        inside = (rows + dy >= 0) & (rows + dy < height) & (cols + dx >= 0) & (cols + dx < width)
        source = (rows + dy) * width + cols + dx
        taps.append((pixels[:, None] == source[None, :]) & inside[None, :])
    return torch.stack(taps).flatten(1).to(dtype)


_cached_shift_matrices = functools.lru_cache(maxsize=64)(shift_matrices)


def dense_conv(
    x: Tensor,
    weight: Tensor,
    size: Sequence[int],
    pixels_first: tuple[bool, bool] = (False, False),
    bias: Optional[Tensor] = None,
) -> Tensor:
    r"""A stride-1 convolution of images of ``size`` ``(H, W)`` by a ``k × k`` kernel ``weight`` ``(O, C, k, k)``,
    zero-padded by ``k // 2`` (an odd ``k``), given flat, as one matmul: ``x`` ``(N, C·H·W)`` times the
    convolution's matrix :math:`M` ``(C·H·W, O·H·W)``,
    :math:`M_{(c, p), (o, q)} = w_{o, c, p - q + \lfloor k/2 \rfloor}` (zero where the offset leaves the kernel),
    plus ``bias`` ``(O,)``. ``x`` and the output ``(N, O·H·W)`` are ordered
    channel-major as NCHW flattens, or pixel-major (NHWC) per ``pixels_first`` (input, output).

    :math:`M` is itself one matmul, of the kernel ``(O·C, k²)`` and the fixed 0/1 shift matrices of the taps
    ``(k², (HW)²)``, so its gradient is one matmul too. On tiny images with few channels (:data:`DENSE_CONV_ENTRIES`)
    this beats a convolution's kernels; the matmul's :math:`H W / k^2` times more multiplications make it slower on
    larger images and wider networks.

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> x = torch.randn(5, 2, 4, 4)
        >>> out = dense_conv(x.flatten(1), conv.weight, (4, 4), bias=conv.bias).view(5, 3, 4, 4)
        >>> torch.allclose(out, conv(x), atol=1e-5)
        True
    """
    out_channels, in_channels, k, _ = weight.shape
    size = (int(size[0]), int(size[1]))
    pixels = size[0] * size[1]
    # cached in eager; traced into the graph (constants) under torch.compile, which does not use lru_cache
    build = shift_matrices if torch.compiler.is_compiling() else _cached_shift_matrices
    shifts = build(k, size, weight.dtype, weight.device)
    matrix = (weight.reshape(out_channels * in_channels, k * k) @ shifts).view(out_channels, in_channels, pixels, -1)
    rows, cols = (2, 1) if pixels_first[0] else (1, 2), (3, 0) if pixels_first[1] else (0, 3)
    matrix = matrix.permute(*rows, *cols).reshape(in_channels * pixels, out_channels * pixels)
    if bias is None:
        return x @ matrix
    per_pixel = bias.expand(pixels, out_channels) if pixels_first[1] else bias[:, None].expand(out_channels, pixels)
    return torch.addmm(per_pixel.flatten(), x, matrix)


def dense_pays(size: Sequence[int], *channels: tuple[int, int]) -> bool:
    """Whether 3×3 convolutions of images of ``size`` ``(H, W)`` with these ``(in, out)`` channels all run faster as
    matmuls (:func:`dense_conv`, within :data:`DENSE_CONV_ENTRIES`).

    Example:
        >>> dense_pays((4, 4), (2, 64), (64, 4)), dense_pays((4, 4), (24, 512), (512, 48))
        (True, False)
    """
    pixels = int(size[-2]) * int(size[-1])
    return pixels <= 16 and all(a * b * pixels**2 <= DENSE_CONV_ENTRIES for a, b in channels)


class Conv2dZeros(nn.Module):
    r"""One zero-initialised 3×3 convolution: the network of Glow's learned split prior (Kingma & Dhariwal 2018).

    ``forward(x, context)`` maps images ``(..., in_channels, H, W)`` to ``(..., out_channels, H, W)``,
    :math:`h = W * [x;\ \mathrm{resize}(c_{\text{aligned}})] + b + A c_{\text{vector}}`: a linear function of its
    input, which starts at zero (so the prior of a fresh :class:`~pyro_flows.transforms.FactorOut` is standard
    normal). Contexts as in :class:`CNN`: an aligned image (``context_shape``) joins the channels, a vector context
    of ``context_features`` minus the image's features adds a learned (zero-initialised) per-channel bias. It is
    ``conv2d_zeros`` of Glow's reference code, a fraction of the cost of a :class:`CNN`. Tiny images
    with few channels (:func:`dense_pays`) convolve by one matmul (:func:`dense_conv`).

    References
    ----------
    - D. P. Kingma and P. Dhariwal.
      *Glow: Generative Flow with Invertible 1x1 Convolutions*. NeurIPS 2018.
      `arXiv:1807.03039 <https://arxiv.org/abs/1807.03039>`__

    Example:
        >>> net = Conv2dZeros(2, 4, context_features=3)
        >>> net(torch.randn(10, 2, 8, 8), torch.randn(3)).abs().max()
        tensor(0., grad_fn=<MaxBackward1>)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        context_features: int = 0,
        context_shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        context_features, self.context_shape = aligned_context_features(
            context_features, context_shape, 2, "Conv2dZeros"
        )
        self.in_channels, self.out_channels, self.context_features = in_channels, out_channels, context_features
        aligned = 0 if self.context_shape is None else self.context_shape.numel()
        width = in_channels + (0 if self.context_shape is None else self.context_shape[0])
        self.output = nn.Conv2d(width, out_channels, 3, padding=1)
        vector = context_features - aligned
        self.context_bias = nn.Linear(vector, out_channels) if vector else None
        for layer in (self.output, self.context_bias):
            for parameter in layer.parameters() if layer is not None else ():
                nn.init.zeros_(parameter)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h, vector, batch = with_aligned_context(x, context, self.context_shape)
        if dense_pays(h.shape[-2:], (self.output.in_channels, self.output.out_channels)):  # one matmul
            n, size = h.shape[0], h.shape[-2:]
            out = dense_conv(h.reshape(n, -1), self.output.weight, size, bias=self.output.bias).view((n, -1) + size)
        else:
            out = self.output(conv_layout(h)).contiguous()
        if self.context_bias is not None:
            out = out + self.context_bias(vector)[:, :, None, None]
        return unflatten_batch(out, batch)


class CNN(nn.Module):
    r"""Glow's coupling network (Kingma & Dhariwal 2018): 3×3 conv, 1×1 convs, 3×3 conv, shapes preserved.

    ``forward(x, context)`` maps images ``(..., in_channels, H, W)`` (and an
    optional context ``(..., context_features)``, broadcast against their batch
    dims) to ``(..., out_channels, H, W)``. Hidden layers: a 3×3 convolution to
    ``hidden[0]`` channels, then a 1×1 convolution per further width, each
    followed by the activation; a vector context enters as a learned per-channel
    bias of the first hidden layer. The last (3×3) layer starts at zero, so a
    coupling conditioned by a fresh network is the identity.

    Aligned context (``context_shape=(C_c, H_c, W_c)``): the first :math:`C_c H_c W_c` context features are
    an image, resized to ``H × W`` (:func:`resize`) and concatenated on the channels of ``x`` before the first
    convolution, :math:`h_1 = \sigma(W_1 * [x;\ \mathrm{resize}(c)] + b_1)` (the conditional coupling of
    Ardizzone et al. 2019 and SRFlow, Lugmayr et al. 2020); any features after them are a vector context.

    Computation: float32 CPU images convolve in the channels-last layout (:func:`conv_layout`); tiny images with few
    channels (:func:`dense_pays`, e.g. the 4×4 and 2×2 levels of an 8×8 Glow of 64 channels) by matmuls instead
    (:func:`dense_conv`; each 1×1 convolution one ``linear`` of the channels at every pixel). The same function and
    parameters either way.

    References
    ----------
    - D. P. Kingma and P. Dhariwal.
      *Glow: Generative Flow with Invertible 1x1 Convolutions*. NeurIPS 2018.
      `arXiv:1807.03039 <https://arxiv.org/abs/1807.03039>`__
    - L. Ardizzone, C. Lüth, J. Kruse, C. Rother and U. Köthe.
      *Guided Image Generation with Conditional Invertible Neural Networks*. 2019.
      `arXiv:1907.02392 <https://arxiv.org/abs/1907.02392>`__

    Example:
        >>> net = CNN(2, 4, hidden=(32, 32), context_features=3)
        >>> net(torch.randn(10, 2, 8, 8), torch.randn(3)).shape
        torch.Size([10, 4, 8, 8])
        >>> net = CNN(2, 4, hidden=(32,), context_shape=(1, 4, 4))  # a 4×4 image aligned with 8×8 inputs
        >>> net(torch.randn(10, 2, 8, 8), torch.randn(10, 16)).shape
        torch.Size([10, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        context_shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        hidden = check_hidden(hidden, "CNN")
        if not hidden:
            raise ValueError("CNN: needs at least one hidden width")
        context_features, self.context_shape = aligned_context_features(context_features, context_shape, 2, "CNN")
        self.in_channels, self.out_channels, self.context_features = in_channels, out_channels, context_features
        aligned = 0 if self.context_shape is None else self.context_shape.numel()
        widths = [in_channels + (0 if self.context_shape is None else self.context_shape[0]), *hidden]
        kernels = [3] + [1] * (len(hidden) - 1)
        self.hidden = nn.ModuleList(
            nn.Conv2d(a, b, k, padding=k // 2) for a, b, k in zip(widths[:-1], widths[1:], kernels, strict=True)
        )
        vector = context_features - aligned
        self.context_bias = nn.Linear(vector, hidden[0]) if vector else None
        # a ReLU rectifies each convolution's fresh output in place (a convolution does not save its output)
        self.activation = activation(inplace=True) if activation is nn.ReLU else activation()
        self.output = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        if self.output.bias is not None:  # always: the layer is built with a bias
            nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h, vector, batch = with_aligned_context(x, context, self.context_shape)
        first, output = cast(nn.Conv2d, self.hidden[0]), self.output
        if dense_pays(h.shape[-2:], (first.in_channels, first.out_channels), (output.in_channels, output.out_channels)):
            return unflatten_batch(self._dense_forward(h, vector), batch)
        h = conv_layout(h)
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if i == 0 and self.context_bias is not None:  # in place: a convolution does not save its output
                h = h.add_(self.context_bias(vector)[:, :, None, None])
            h = self.activation(h)
        out = self.output(h).contiguous()  # back to NCHW (from conv_layout): the map's elementwise work runs on it
        return unflatten_batch(out, batch)

    def _dense_forward(self, h: Tensor, vector: Optional[Tensor]) -> Tensor:
        """:meth:`forward` on tiny images ``(N, C, H, W)`` by matmuls (:func:`dense_conv`): the hidden activations
        ``(N, H·W, channels)`` pixel-major, so that each 1×1 convolution is one ``linear`` of the channels; the output
        in NCHW. (Every in-place op acts on a matmul's whole output, which it does not save: no view is modified.)"""
        n, size = h.shape[0], h.shape[-2:]
        first = cast(nn.Conv2d, self.hidden[0])
        z = dense_conv(h.reshape(n, -1), first.weight, size, (False, True), first.bias)
        if self.context_bias is None:
            z = self.activation(z).view(n, size.numel(), -1)  # (N, HW, hidden)
        else:
            assert vector is not None  # a context_bias comes with vector features
            z = self.activation(z.view(n, size.numel(), -1) + self.context_bias(vector)[:, None, :])
        for layer in cast(list[nn.Conv2d], list(self.hidden)[1:]):
            z = self.activation(F.linear(z, layer.weight.flatten(1), layer.bias))
        out = dense_conv(z.reshape(n, -1), self.output.weight, size, (True, False), self.output.bias)
        return out.view((n, -1) + size)


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


def pack_context(
    condition: Tensor, labels: Optional[Tensor] = None, vector: Optional[Tensor] = None, event_dim: int = 3
) -> Tensor:
    """A condition image ``(..., C_c, H_c, W_c)`` (signal: ``event_dim=2``) and its class ``labels`` ``(...)`` or
    ``vector`` ``(..., V)`` as one tensor ``(..., C_c H_c W_c + 1)`` or ``(..., C_c H_c W_c + V)``, batch dims
    broadcast: the condition flattened, then the labels (as the condition's dtype) or the vector.

    It is the context that a flow conditioned on both (:class:`AlignedContext`, e.g.
    ``pf.Glow(shape, context_shape=..., classes=10)``) takes as one tensor of rows, e.g. in :func:`~pyro_flows.fit`.

    Example:
        >>> pack_context(torch.zeros(5, 1, 14, 14), labels=torch.arange(5)).shape
        torch.Size([5, 197])
    """
    if (labels is None) == (vector is None):
        raise ValueError("pack_context: give the condition's labels= or its vector=, exactly one of them")
    extra = labels[..., None] if labels is not None else vector
    assert extra is not None
    if condition.dim() < event_dim or extra.dim() < 1:
        raise ValueError(
            f"pack_context: the condition needs {event_dim} event dims and the vector one, got shapes "
            f"{tuple(condition.shape)} and {tuple(extra.shape)}"
        )
    flat = condition.flatten(-event_dim)
    try:
        batch = torch.broadcast_shapes(flat.shape[:-1], extra.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"pack_context: the condition's batch shape {tuple(flat.shape[:-1])} does not broadcast with the "
            f"{'labels' if labels is not None else 'vectors'}' {tuple(extra.shape[:-1])}"
        ) from None
    extra = extra.to(flat.dtype).expand(batch + extra.shape[-1:])
    return torch.cat((flat.expand(batch + flat.shape[-1:]), extra), -1)


class AlignedContext(nn.Module):
    r"""The context of a flow conditioned on an aligned image ``(C_c, H_c, W_c)`` or signal ``(C_c, L_c)``.

    A small conditioning network encodes the condition :math:`c` at its own resolution, and the layers see
    its output with the condition itself, flattened,

    .. math:: u = \operatorname{flatten}\big([\,c;\ g(c)\,]\big) \in \mathbb{R}^{(C_c + K) H_c W_c},
              \qquad g = \mathrm{conv}_{3} \circ \sigma \circ \mathrm{conv}_{3},

    which every coupling (and split prior) of every level resizes to its own resolution and concatenates on the
    channels of its network's input: the design of SRFlow (Lugmayr et al. 2020: a conditioning encoder whose
    features are interpolated to each level) and of the conditional INN (Ardizzone et al. 2019: a shared
    conditioning network, its features concatenated to every coupling's subnetwork). With ``channels=0``
    (:math:`K = 0`) the layers see the condition as it is.

    A vector context (``vector_features=V``) or class labels (``classes=K``, embedded by a
    :class:`ClassEmbedding` of ``embedding_features``) may come with the condition: then ``forward`` takes the
    tuple ``(condition, vector_or_labels)`` or the one tensor :func:`pack_context` makes of them (what
    :func:`~pyro_flows.fit` batches as context rows), and their features follow :math:`u`.

    Shapes: ``forward(condition)`` with ``condition`` ``(..., *context_shape)`` returns ``(..., features)``, the
    batch shape that of the condition; a condition of another shape is a ValueError naming both shapes.
    ``out_shape`` is ``(C_c + K, *spatial)``, the ``context_shape`` of the layers.

    Args:
        context_shape: ``(C_c, H_c, W_c)`` or ``(C_c, L_c)``.
        channels: :math:`K`, the learned features' channels (0: no conditioning network).
        hidden: channels of the conditioning network's hidden layer.
        vector_features: size of a vector context that comes with the condition.
        classes: number of classes of labels that come with the condition.
        embedding_features: size of the labels' embedding.

    References
    ----------
    - A. Lugmayr, M. Danelljan, L. Van Gool and R. Timofte.
      *SRFlow: Learning the Super-Resolution Space with Normalizing Flow*. ECCV 2020.
      `arXiv:2006.14200 <https://arxiv.org/abs/2006.14200>`__
    - L. Ardizzone, C. Lüth, J. Kruse, C. Rother and U. Köthe.
      *Guided Image Generation with Conditional Invertible Neural Networks*. 2019.
      `arXiv:1907.02392 <https://arxiv.org/abs/1907.02392>`__

    Example:
        >>> embed = AlignedContext((1, 14, 14), channels=4, classes=10)
        >>> embed.out_shape, embed.features
        (torch.Size([5, 14, 14]), 996)
        >>> embed((torch.rand(8, 1, 14, 14), torch.randint(0, 10, (8,)))).shape
        torch.Size([8, 996])
    """

    def __init__(
        self,
        context_shape: Sequence[int],
        channels: int = 16,
        hidden: int = 32,
        vector_features: int = 0,
        classes: Optional[int] = None,
        embedding_features: int = 16,
    ) -> None:
        super().__init__()
        spatial = 1 if isinstance(context_shape, Sequence) and len(context_shape) == 2 else 2
        self.context_shape = check_context_shape(context_shape, spatial, "AlignedContext")
        for value, what in ((channels, "channels"), (vector_features, "vector_features")):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(f"AlignedContext: {what} must be an integer >= 0, got {value!r}")
        check_hidden((hidden,), "AlignedContext")
        if classes is not None and vector_features:
            raise ValueError(
                "AlignedContext: the condition comes with class labels (classes=) or a vector (vector_features=), "
                f"not both; got classes={classes!r}, vector_features={vector_features!r}"
            )
        conv = _CONV[spatial]
        self.encoder = (
            nn.Sequential(
                conv(self.context_shape[0], hidden, 3, padding=1), nn.ReLU(), conv(hidden, channels, 3, padding=1)
            )
            if channels
            else None
        )
        self.embedding = None if classes is None else ClassEmbedding(classes, embedding_features)
        self.vector_features = int(vector_features)
        self.extra = self.vector_features or (0 if classes is None else 1)  # entries after the flat condition
        self.out_shape = torch.Size((self.context_shape[0] + channels, *self.context_shape[1:]))
        tail = self.vector_features or (0 if self.embedding is None else self.embedding.features)
        self.features = self.out_shape.numel() + tail
        kind, shape = _KIND[spatial], ", ".join(map(str, self.context_shape))
        with_extra = " and " + ("labels (...)" if classes is not None else f"a vector (..., {vector_features})")
        self.expected_context = f"{kind} of shape (..., {shape})" + (with_extra if self.extra else "")

    def pack(self, condition: Tensor, extra: Tensor) -> Tensor:
        """The one tensor holding a condition and its labels or vector (see :func:`pack_context`), checked."""
        if not self.extra:
            raise ValueError("AlignedContext: this condition comes alone (no vector_features or classes) to pack with")
        self._check_condition(condition)
        if not isinstance(extra, Tensor):
            raise TypeError(f"AlignedContext: expected a tensor of labels or vectors, got {type(extra).__name__}")
        if self.embedding is not None:
            return pack_context(condition, labels=extra, event_dim=len(self.context_shape))
        if extra.dim() < 1 or extra.shape[-1] != self.vector_features:
            raise ValueError(
                f"AlignedContext: the vector must have shape (..., {self.vector_features}), got {tuple(extra.shape)}"
            )
        return pack_context(condition, vector=extra, event_dim=len(self.context_shape))

    def forward(self, condition: Union[Tensor, tuple[Tensor, Tensor]]) -> Tensor:
        images, extra = self._unpack(condition)
        event = len(self.context_shape)
        batch = images.shape[: images.dim() - event]
        images = images.reshape((-1,) + self.context_shape)
        if self.encoder is not None:
            images = torch.cat((images, self.encoder(images)), 1)
        flat = images.flatten(1).reshape(batch + (-1,))
        if extra is None:
            return flat
        tail = extra if self.embedding is None else self.embedding(extra[..., 0]).to(flat.dtype)
        return torch.cat((flat, tail), -1)

    def _unpack(self, condition: Union[Tensor, tuple[Tensor, Tensor]]) -> tuple[Tensor, Optional[Tensor]]:
        """The condition images ``(..., *context_shape)`` and the labels ``(..., 1)`` or vectors after them."""
        if isinstance(condition, tuple):
            if len(condition) != 2:
                raise ValueError(
                    f"AlignedContext: a tuple context is (condition, labels or vector), got {len(condition)} items"
                )
            condition = self.pack(*condition)
        if not self.extra:
            self._check_condition(condition)
            return condition, None
        n = self.context_shape.numel()
        if not (isinstance(condition, Tensor) and condition.dim() >= 1 and condition.shape[-1] == n + self.extra):
            raise ValueError(
                f"AlignedContext: expected the tuple ({self.expected_context.replace(' and ', ', ')}) or its packed "
                f"tensor (..., {n + self.extra}), got "
                f"{tuple(condition.shape) if isinstance(condition, Tensor) else type(condition).__name__}"
            )
        return condition[..., :n].unflatten(-1, self.context_shape), condition[..., n:]

    def _check_condition(self, condition: Tensor) -> None:
        if not isinstance(condition, Tensor):
            raise TypeError(f"AlignedContext: expected a tensor condition, got {type(condition).__name__}")
        event = len(self.context_shape)
        got = tuple(condition.shape)
        if condition.dim() < event or got[len(got) - event :] != tuple(self.context_shape):
            channels = (
                f" ({got[-event]} channels where {self.context_shape[0]} are expected)"
                if condition.dim() >= event and got[len(got) - event + 1 :] == tuple(self.context_shape[1:])
                else ""
            )
            raise ValueError(
                f"AlignedContext: expected {self.expected_context}, got a condition of shape {got}{channels}"
            )

    def extra_repr(self) -> str:
        return f"context_shape={tuple(self.context_shape)}, out_shape={tuple(self.out_shape)}, features={self.features}"
