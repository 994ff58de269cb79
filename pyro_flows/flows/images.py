"""Multi-scale image flows: :func:`Glow` and the multi-scale RealNVP (``RealNVP(shape=...)``)."""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

import torch
from torch import nn
from torch.distributions import Transform

from .. import transforms as T
from ..nn.cnn import AlignedContext, check_context_shape
from ..nn.mlp import check_hidden
from .base import EMBEDDING_FEATURES, Flow, StandardNormal, class_context


def _image_shape(name: str, shape: Sequence[int], levels: int, squeezes: int) -> torch.Size:
    """``shape`` as a ``torch.Size`` after ValueErrors for a shape that is not ``(C, H, W)`` or that the levels'
    ``squeezes`` cannot halve (each halves H and W); the message names the levels that do work at that size.

    E.g. 28×28 halves twice (28 → 14 → 7): Glow (a squeeze per level) takes ``levels <= 2``, the multi-scale
    RealNVP (no squeeze at its last level) ``levels <= 3``.
    """
    shape = torch.Size(shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name}: an image flow needs shape (C, H, W), got {tuple(shape)}")
    if levels < 1:
        raise ValueError(f"{name}: an image flow needs levels >= 1, got {levels}")
    if shape[1] % 2**squeezes or shape[2] % 2**squeezes:
        halvings = 0
        while shape[1] % 2 ** (halvings + 1) == 0 and shape[2] % 2 ** (halvings + 1) == 0:
            halvings += 1
        most = halvings + levels - squeezes
        works = f"levels 1..{most} work" if most >= 1 else "no levels work: H and W must be even"
        raise ValueError(
            f"{name}: {levels} levels squeeze the image {squeezes} times, so H and W must be divisible by "
            f"{2**squeezes}; got shape {tuple(shape)}, whose H and W halve {halvings} times: at this size {works}"
        )
    return shape


def _check_image_sizes(name: str, steps: int, hidden: Sequence[int]) -> None:
    """ValueErrors naming the problem for a flow without steps or a conditioner without channels."""
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ValueError(f"{name}: steps must be an integer >= 1, got {steps!r}")
    try:
        widths = check_hidden(hidden, name)
    except ValueError:
        widths = ()
    if not widths:
        raise ValueError(f"{name}: the conditioners' hidden channels must be integers >= 1, got {hidden!r}")


def _conditional(cls, conditional_cls, context: dict):
    """The class and the keyword arguments of a layer that sees the context when there is one.

    ``context`` is the layers' context keywords (``context_features``, and ``context_shape`` for an aligned
    condition image), empty for an unconditional flow."""
    return (conditional_cls, context) if context else (cls, {})


def _multiscale(shape: torch.Size, levels: int, context: dict, before, at_scale, final, split_prior: bool, hidden):
    r"""Base→data layers of a multi-scale image flow (Dinh et al. 2017), as one :class:`~.transforms.Chain`.

    Data→base at a level of shape ``(C, H, W)``: the last level is ``final(shape)``; any other
    applies ``before(shape)``, squeezes to ``(4C, H/2, W/2)``, applies ``at_scale`` there, factors
    out half the channels (the rest of the flow goes on with the other half, one level down) and
    unsqueezes, so every level keeps its input's shape. The builders return base→data lists.
    """
    chain = T.ConditionalChain if context else T.Chain
    if levels == 1:
        return chain(final(shape))
    channels, height, width = shape
    squeezed = torch.Size((4 * channels, height // 2, width // 2))
    kept = torch.Size((2 * channels, height // 2, width // 2))
    inner = _multiscale(kept, levels - 1, context, before, at_scale, final, split_prior, hidden)
    factor_out, factor_kw = _conditional(T.FactorOut, T.ConditionalFactorOut, context)
    return chain(
        [
            T.Squeeze(shape),
            factor_out(squeezed, inner, split_prior=split_prior, hidden=hidden, **factor_kw),
            *at_scale(squeezed),
            T.Squeeze(shape).inv,
            *before(shape),
        ]
    )


def _steps(steps: int, hidden: Sequence[int], context: dict, mask, conv: bool):
    """A builder of ``steps`` base→data flow steps at a shape; data→base each is ActNorm, (1×1 conv,) coupling."""
    coupling, kw = _conditional(T.AffineCoupling, T.ConditionalAffineCoupling, context)

    def build(shape: torch.Size) -> list[Transform]:
        layers: list[Transform] = []
        for k in range(steps):
            layers.append(coupling(shape, mask=mask(shape, k), hidden=tuple(hidden), **kw))
            layers += [T.InvertibleConv1x1(shape)] if conv else []
            layers.append(T.ActNorm(shape))
        return layers

    return build


def _squeezed(layers):
    """``layers`` applied between a squeeze and an unsqueeze (base→data)."""

    def build(shape: torch.Size) -> list[Transform]:
        channels, height, width = shape
        return [T.Squeeze(shape), *layers(torch.Size((4 * channels, height // 2, width // 2))), T.Squeeze(shape).inv]

    return build


def _no_layers(shape: torch.Size) -> list[Transform]:
    return []


def image_context(
    name: str,
    classes: Optional[int],
    context: int,
    embedding_features: int,
    context_shape: Optional[Sequence[int]] = None,
    context_channels: int = 16,
    spatial: int = 2,
) -> tuple[dict, Optional[nn.Module], int]:
    """The layers' context keywords, the flow's embedding and its ``context_features``: class labels or a vector
    (:func:`~.base.class_context`), or an aligned condition ``context_shape`` (an :class:`~.nn.AlignedContext`,
    with the labels or vector that may come with it), for the image and signal presets.

    Example:
        >>> kw, embedding, features = image_context("Glow", None, 0, 16, context_shape=(1, 4, 4), context_channels=2)
        >>> kw["context_shape"], features
        (torch.Size([3, 4, 4]), 48)
    """
    if context_shape is None:
        features, embedding = class_context(name, classes, context, embedding_features)
        return ({"context_features": features} if features else {}), embedding, features
    check_context_shape(context_shape, spatial, name)
    if isinstance(context, bool) or not isinstance(context, Integral) or context < 0:
        raise ValueError(f"{name}: context must be an integer >= 0 (vector features), got {context!r}")
    embedding = AlignedContext(context_shape, context_channels, 32, context, classes, embedding_features)
    return {"context_features": embedding.features, "context_shape": embedding.out_shape}, embedding, embedding.features


def _image_model(
    name: str,
    shape: torch.Size,
    level_chain,
    conditioning: tuple[dict, Optional[nn.Module], int],
    pixel_levels: Optional[int],
    dequantization: str,
    alpha: float,
) -> nn.Module:
    """The flow around a multi-scale chain: base, logit, context embedding and dequantisation."""
    from ..dequantization import Dequantized, VariationalDequantizer

    layer_context, embedding, features = conditioning
    if dequantization not in ("uniform", "variational"):
        raise ValueError(f"dequantization must be 'uniform' or 'variational', got {dequantization!r}")
    transforms = [level_chain(layer_context)]
    if pixel_levels is None:
        return Flow(StandardNormal(shape), transforms, features, embedding)
    flow = Flow(StandardNormal(shape), [*transforms, T.Logit(shape, alpha)], features, embedding)
    dequantizer = None
    if dequantization == "variational":
        d = shape.numel()
        layers = [
            T.ConditionalAffineCoupling(d, mask=T.channel_mask(d, i), hidden=(64, 64), context_features=d)
            for i in range(4)
        ]
        dequantizer = VariationalDequantizer(
            Flow(StandardNormal(d), [*layers, T.Logit(d, 0.0)], d), shape, pixel_levels
        )
    return Dequantized(flow, pixel_levels, dequantizer)


def _checkerboard(shape, k):
    return T.checkerboard_mask(shape, k)


def _channels(shape, k):
    return T.channel_mask(shape[0], k)


def Glow(
    shape: Sequence[int],
    levels: int = 3,
    steps: int = 4,
    hidden_channels: int = 64,
    classes: Optional[int] = None,
    context: int = 0,
    pixel_levels: Optional[int] = 256,
    dequantization: str = "uniform",
    split_prior: bool = True,
    alpha: float = 0.05,
    embedding_features: int = EMBEDDING_FEATURES,
    context_shape: Optional[Sequence[int]] = None,
    context_channels: int = 16,
) -> nn.Module:
    r"""Glow (Kingma & Dhariwal 2018): a multi-scale flow of ActNorm, invertible 1×1 convolutions and affine couplings.

    Data→base, each of the ``levels`` levels squeezes the image to
    ``(4C, H/2, W/2)``, applies ``steps`` steps of
    :class:`~.transforms.ActNorm` → :class:`~.transforms.InvertibleConv1x1` →
    :class:`~.transforms.AffineCoupling` (channel mask, CNN with
    ``hidden_channels``), and, except at the last level, factors out half the
    channels with a learned Gaussian conditioned on the other half
    (:class:`~.transforms.FactorOut`; its mean and log-scale are one zero-initialised 3×3 convolution of the
    kept half, :class:`~.nn.cnn.Conv2dZeros`, as in Glow); the other half goes on to the next level.

    Integer pixels ``0 .. pixel_levels - 1`` (e.g. 256; 17 for scikit-learn's digits) are modelled by
    :class:`~.dequantization.Dequantized` (``"uniform"`` or ``"variational"`` dequantisation) around a
    flow on :math:`[0, 1]` that ends with a :class:`~.transforms.Logit`; its ``log_prob`` is then the
    discrete data's (a bound, in nats) and ``pf.bits_per_dim(model, images)`` their bits per dimension.
    ``pixel_levels=None`` models continuous images with the flow alone. The pixels may be ``uint8`` (torchvision's
    ``PILToTensor``), ``long`` or whole floats; anything else is a ValueError that names what it found: floats
    in :math:`[0, 1]` (torchvision's ``ToTensor``) with the conversion ``(x * 255).round().to(torch.uint8)``,
    NaNs, or values outside ``0 .. pixel_levels - 1`` with their range. :func:`~pyro_flows.fit` also warns when
    the data use at most half the levels (e.g. 0..16 digits under the default 256: use ``pixel_levels=17``).

    Conditioning: ``classes=K`` embeds integer labels (a :class:`~.nn.ClassEmbedding` of
    ``embedding_features``) as the context of every coupling and split prior; ``context=F`` takes
    any context vector of ``F`` features instead.

    Aligned conditioning (super-resolution, inpainting, colourisation: conditional Glow, SRFlow):
    ``context_shape=(C_c, H_c, W_c)`` conditions the flow on an image of any size, e.g. a 14×14 image for
    28×28 data. ``model(cond)`` with ``cond`` ``(..., C_c, H_c, W_c)`` is the distribution of images given
    each condition (batch shape ``cond.shape[:-3]``). A conditioning network (an :class:`~.nn.AlignedContext`
    with ``context_channels`` learned channels; 0: none) encodes the condition once, at its own resolution;
    every coupling and split prior of every level resizes the condition and its features bilinearly to its
    own resolution and concatenates them on its CNN's input channels (Lugmayr et al. 2020; Ardizzone et al.
    2019). With ``classes=K`` (or ``context=F``) too, the model takes the tuple ``(cond, labels)`` (or
    ``(cond, vectors)``), or the one tensor ``pf.nn.pack_context(cond, labels=labels)`` (``vector=``) that
    :func:`~pyro_flows.fit` batches as context rows; the labels' embedding (or the vector) then joins the
    vector context of every layer.

    Shapes: images ``(..., C, H, W)``; H and W divisible by ``2**levels`` (28×28 takes ``levels <= 2``:
    28 → 14 → 7; a ValueError names the levels that work); labels ``(...)``.

    References
    ----------
    - D. P. Kingma and P. Dhariwal.
      *Glow: Generative Flow with Invertible 1x1 Convolutions*. NeurIPS 2018.
      `arXiv:1807.03039 <https://arxiv.org/abs/1807.03039>`__
    - A. Lugmayr, M. Danelljan, L. Van Gool and R. Timofte.
      *SRFlow: Learning the Super-Resolution Space with Normalizing Flow*. ECCV 2020.
      `arXiv:2006.14200 <https://arxiv.org/abs/2006.14200>`__
    - L. Ardizzone, C. Lüth, J. Kruse, C. Rother and U. Köthe.
      *Guided Image Generation with Conditional Invertible Neural Networks*. 2019.
      `arXiv:1907.02392 <https://arxiv.org/abs/1907.02392>`__

    Example:
        >>> model = Glow(shape=(1, 8, 8), levels=2, steps=4, hidden_channels=64, classes=10, pixel_levels=17)
        >>> model(torch.tensor([3, 7])).sample(temperature=0.7).shape
        torch.Size([2, 1, 8, 8])
        >>> sr = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=16, context_shape=(1, 4, 4), pixel_levels=17)
        >>> sr(torch.rand(3, 1, 4, 4)).sample().shape  # one 8×8 image per 4×4 condition
        torch.Size([3, 1, 8, 8])
    """
    shape = _image_shape("Glow", shape, levels, levels)
    hidden = (hidden_channels, hidden_channels)
    _check_image_sizes("Glow", steps, hidden)

    conditioning = image_context("Glow", classes, context, embedding_features, context_shape, context_channels)

    def level_chain(layer_context: dict) -> T.Chain:
        at_scale = _steps(steps, hidden, layer_context, _channels, conv=True)
        final = _squeezed(at_scale)  # the split prior: Glow's one zero-initialised 3x3 convolution (hidden=())
        return _multiscale(shape, levels, layer_context, _no_layers, at_scale, final, split_prior, ())

    return _image_model("Glow", shape, level_chain, conditioning, pixel_levels, dequantization, alpha)


def multiscale_realnvp(
    shape: Sequence[int],
    levels: int = 2,
    steps: int = 3,
    hidden: Sequence[int] = (64, 64),
    classes: Optional[int] = None,
    context: int = 0,
    pixel_levels: Optional[int] = 256,
    dequantization: str = "uniform",
    alpha: float = 0.05,
    embedding_features: int = EMBEDDING_FEATURES,
    context_shape: Optional[Sequence[int]] = None,
    context_channels: int = 16,
) -> nn.Module:
    """The multi-scale RealNVP of Dinh et al. (2017): what ``RealNVP(shape=...)`` builds (see :func:`RealNVP`).

    Every level but the last squeezes, so H and W must be divisible by ``2**(levels - 1)`` (28×28 takes
    ``levels <= 3``, its last level a checkerboard at 7×7); pixels and conditioning (``classes``, ``context``,
    and an aligned condition image ``context_shape`` with ``context_channels``) as in :func:`Glow`.

    References
    ----------
    - L. Dinh, J. Sohl-Dickstein and S. Bengio.
      *Density estimation using Real NVP*. ICLR 2017.
      `arXiv:1605.08803 <https://arxiv.org/abs/1605.08803>`__

    Example:
        >>> model = multiscale_realnvp((1, 8, 8), levels=2, steps=1, hidden=(16,), pixel_levels=17)
        >>> model().log_prob(torch.randint(0, 17, (3, 1, 8, 8)).float()).shape
        torch.Size([3])
        >>> sr = multiscale_realnvp((1, 8, 8), steps=1, hidden=(16,), context_shape=(1, 4, 4), pixel_levels=None)
        >>> sr(torch.randn(5, 1, 4, 4)).log_prob(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5])
    """
    shape = _image_shape("RealNVP", shape, levels, levels - 1)
    _check_image_sizes("RealNVP", steps, hidden)

    conditioning = image_context("RealNVP", classes, context, embedding_features, context_shape, context_channels)

    def level_chain(layer_context: dict) -> T.Chain:
        checkerboard = _steps(steps, hidden, layer_context, _checkerboard, conv=False)
        channelwise = _steps(steps, hidden, layer_context, _channels, conv=False)
        final = _steps(steps + 1, hidden, layer_context, _checkerboard, conv=False)
        return _multiscale(shape, levels, layer_context, checkerboard, channelwise, final, False, hidden)

    return _image_model("RealNVP", shape, level_chain, conditioning, pixel_levels, dequantization, alpha)
