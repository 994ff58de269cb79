"""A continuous normalizing flow over images: :func:`ImageCNF`, an ODE layer driven by a U-Net, and its data rows."""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import transforms as T
from ..dequantization import check_pixels, uniform_dequantize
from ..nn.unet import UNet
from .base import EMBEDDING_FEATURES, Flow, StandardNormal
from .images import image_context


def ImageCNF(
    shape: Sequence[int],
    channels: Sequence[int] = (32, 64),
    classes: Optional[int] = None,
    context: int = 0,
    trace: str = "hutchinson",
    *,
    alpha: Optional[float] = 0.05,
    embedding_features: int = EMBEDDING_FEATURES,
    context_shape: Optional[Sequence[int]] = None,
    context_channels: int = 16,
    time_features: int = 32,
    **kwargs,
) -> Flow:
    r"""A continuous normalizing flow over images of ``shape`` ``(C, H, W)`` whose vector field is a :class:`~.nn.UNet`.

    :math:`\frac{dz}{dt} = f_\theta(z, t[, c])` from :math:`\mathcal{N}(0, I_D)` at :math:`t_0` to the data at
    :math:`t_1`, :math:`D = C H W`: one :class:`~.transforms.ContinuousFlow` over the images **flattened to rows**
    ``(..., D)`` (the ODE and its trace do not depend on the layout), whose U-Net sees them as images. Being one
    ODE layer on a standard normal, it trains by flow matching (``objective=pf.FlowMatching()``, any scheduler and
    coupling) or by maximum likelihood, with the objectives of every CNF unchanged; its likelihood comes from the
    ODE, with Hutchinson's trace estimator by default (``trace="exact"`` costs :math:`D` vector-Jacobian products
    per evaluation). ``kwargs`` go to the layer (``solver``, ``atol``, ``rtol``, ``steps``, ``probe``, ...).

    ``alpha`` :math:`\alpha` (default 0.05; None: off) ends the flow with a fixed :class:`~.transforms.Logit` (as
    :func:`Glow`'s preprocessing), for data :math:`y \in [0, 1]`: the ODE runs in logit space,
    :math:`\operatorname{logit}(\alpha + (1 - 2\alpha) y)`, flow matching regresses there (through the fixed
    layer's inverse) and the likelihood of :math:`y` includes the logit's log-det. On the dequantised 8×8 digits it
    is worth 0.23 bits/dim at an equal budget (2.04 vs 2.27, ``benchmarks/README.md``); data outside
    :math:`[0, 1]` need ``alpha=None``.

    Data: rows ``images.reshape(N, -1)`` of continuous values. Integer pixels in ``0 .. L-1`` are dequantised into
    :math:`[0, 1)` first by :func:`image_rows` (:math:`(x + u) / L`, :math:`u \sim \mathcal{U}[0, 1)`); then
    ``pf.bits_per_dim(flow, rows, levels=L)`` is the discrete data's bits/dim (a bound, see
    :func:`~pyro_flows.bits_per_dim`), comparable with :func:`Glow`'s with ``pixel_levels=L``.

    Conditioning, as in :func:`Glow`: ``classes=K`` embeds integer labels (a :class:`~.nn.ClassEmbedding` of
    ``embedding_features``) and ``context=F`` takes context vectors ``(..., F)``; either shifts the U-Net's time
    embedding. ``context_shape=(C_c, H_c, W_c)`` conditions on an aligned image of any size (e.g. a 14×14 image
    for 28×28 data): an :class:`~.nn.AlignedContext` with ``context_channels`` learned channels encodes it, and
    the U-Net resizes it to ``H × W`` and concatenates it on its input channels; with ``classes`` or ``context``
    too, the flow takes ``(condition, labels)`` or its packed tensor (:func:`~.nn.pack_context`).
    Sizes: any ``H`` and ``W`` (the U-Net's down-sampling rounds up: 28 → 14 → 7 → 4, and its up-sampling returns
    to the skip's size).

    Args:
        shape: ``(C, H, W)``.
        channels: the U-Net's widths per level.
        classes, context, embedding_features, context_shape, context_channels: the conditioning (above).
        trace: ``"hutchinson"`` (default) or ``"exact"`` (then the U-Net normalises by
            :class:`~.nn.unet.LayerNormGroups`, so that maximum-likelihood training can batch the exact trace).
        alpha: the logit preprocessing of data in :math:`[0, 1]` (above); None: none, for data of any range.
        time_features: size of the U-Net's sinusoidal time embedding.

    References
    ----------
    - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and D. Duvenaud.
      *FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models*. ICLR 2019.
      `arXiv:1810.01367 <https://arxiv.org/abs/1810.01367>`__
    - Y. Lipman, R. T. Q. Chen, H. Ben-Hamu, M. Nickel and M. Le. *Flow Matching for Generative Modeling*.
      ICLR 2023. `arXiv:2210.02747 <https://arxiv.org/abs/2210.02747>`__

    Example:
        >>> images, labels = torch.randint(0, 17, (32, 1, 8, 8)), torch.randint(0, 10, (32,))
        >>> rows = image_rows(images, levels=17, generator=torch.Generator().manual_seed(0))
        >>> flow = ImageCNF((1, 8, 8), channels=(8, 16), classes=10)
        >>> history = pf.fit(flow, rows, labels, objective=pf.FlowMatching(), max_steps=2, progress=False)
        >>> with pf.fixed_steps(flow, 4, "rk4"):  # quick here; outside the block the solve is adaptive
        ...     samples = flow(labels[:4]).sample().reshape(4, 1, 8, 8)
        ...     log_p = flow(labels[:4]).log_prob(rows[:4])  # the ODE likelihood, Hutchinson's trace
        >>> samples.shape, log_p.shape
        (torch.Size([4, 1, 8, 8]), torch.Size([4]))
    """
    layer_context, embedding, features = image_context(
        "ImageCNF", classes, context, embedding_features, context_shape, context_channels
    )
    try:
        net = UNet(shape, channels, time_features=time_features, batched_jacobian=trace == "exact", **layer_context)
    except ValueError as error:
        raise ValueError(f"ImageCNF: {str(error).removeprefix('UNet: ')}") from None
    cls = T.ConditionalContinuousFlow if features else T.ContinuousFlow
    layer = cls(net.shape.numel(), vector_field=net, context_features=features, trace=trace, **kwargs)
    d = net.shape.numel()
    tail = [] if alpha is None else [T.Logit(d, alpha)]
    return Flow(StandardNormal(d), [layer, *tail], features, embedding)


def image_rows(
    images: Tensor,
    levels: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    r"""Images ``(N, C, H, W)`` as the rows ``(N, C·H·W)`` that :func:`ImageCNF` models.

    With ``levels`` :math:`L`, the pixels must be integers in ``0 .. L-1`` (a ValueError names what was found, see
    :func:`~pyro_flows.dequantization.check_pixels`) and are uniformly dequantised into :math:`[0, 1)`,
    :math:`(x + u) / L` with :math:`u \sim \mathcal{U}[0, 1)` (Theis et al. 2016), so that
    ``pf.bits_per_dim(flow, rows, levels=L)`` bounds the discrete data's bits/dim; without, the values are kept.
    The result has ``dtype`` (default: the default float dtype).

    Example:
        >>> rows = image_rows(torch.tensor([[[[0, 16]]]]), levels=17, generator=torch.Generator().manual_seed(0))
        >>> rows.shape, bool(((rows >= 0) & (rows < 1)).all())
        (torch.Size([1, 2]), True)
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(images, Tensor) or images.dim() < 2:
        raise ValueError(f"image_rows: images must be a tensor (N, ...), got {getattr(images, 'shape', images)!r}")
    rows = images.reshape(images.shape[0], -1)
    if levels is None:
        return rows.to(dtype)
    if isinstance(levels, bool) or not isinstance(levels, Integral) or levels < 2:
        raise ValueError(f"image_rows: levels must be an integer >= 2, got {levels!r}")
    check_pixels(rows, int(levels), "image_rows")
    return uniform_dequantize(rows, int(levels), generator, dtype)
