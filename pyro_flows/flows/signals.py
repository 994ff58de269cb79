"""Flows of 1-D signals: :func:`WaveGlow`."""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

import torch
from torch.distributions import Transform

from .. import transforms as T
from ..transforms.signals import Squeeze1d
from .base import EMBEDDING_FEATURES, Flow, StandardNormal
from .images import _check_image_sizes, _conditional, image_context


def _signal_shape(shape: Sequence[int], groups: int) -> torch.Size:
    """``shape`` as a ``torch.Size`` after ValueErrors for a shape that is not ``(C, L)`` or a length that the
    squeeze's ``groups`` do not divide."""
    if isinstance(groups, bool) or not isinstance(groups, Integral) or groups < 1:
        raise ValueError(f"WaveGlow: groups must be an integer >= 1, got {groups!r}")
    size = torch.Size(shape)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"WaveGlow: a signal flow needs shape (C, L), got {tuple(size)}")
    if size[1] % groups:
        raise ValueError(
            f"WaveGlow: the squeeze groups {groups} samples per step, so L must be divisible by {groups}; "
            f"got shape {tuple(size)}"
        )
    if size[0] * groups < 2:
        raise ValueError("WaveGlow: a coupling needs at least 2 channels after the squeeze: use groups >= 2")
    return size


def WaveGlow(
    shape: Sequence[int],
    steps: int = 8,
    groups: int = 8,
    hidden_channels: int = 64,
    layers: int = 4,
    context_shape: Optional[Sequence[int]] = None,
    context_channels: int = 16,
    classes: Optional[int] = None,
    context: int = 0,
    embedding_features: int = EMBEDDING_FEATURES,
) -> Flow:
    r"""WaveGlow (Prenger et al. 2019): a 1-D Glow of signals, conditioned on an aligned feature sequence.

    Data→base: a :class:`~.transforms.Squeeze1d` groups ``groups`` consecutive samples into channels,
    ``(C, L)`` → ``(groups C, L / groups)``, then ``steps`` steps each apply an
    :class:`~.transforms.InvertibleConv1x1` over the channels and an :class:`~.transforms.AffineCoupling`
    whose conditioner is a :class:`~.nn.WaveNet` (``layers`` gated convolutions dilated 1, 2, 4, ..., of
    ``hidden_channels`` residual channels); the base is :math:`\mathcal{N}(0, I)` over ``(C, L)``.
    (WaveGlow's early outputs, which leave channels out every few steps, are not used: every step sees every
    channel.)

    Conditioning: ``context_shape=(C_c, L_c)`` conditions the flow on an aligned feature sequence of any
    length (WaveGlow's mel-spectrogram: one frame per 256 samples). ``model(features)`` with ``features``
    ``(..., C_c, L_c)`` is the distribution of signals given each sequence (batch shape
    ``features.shape[:-2]``). A conditioning network (an :class:`~.nn.AlignedContext` of ``context_channels``
    learned channels; 0: none) encodes the sequence at its own rate; every coupling upsamples it and its
    features linearly to the squeezed length ``L / groups`` and adds them to every gate of its WaveNet.
    ``classes=K`` (labels) or ``context=F`` (a vector) condition the flow alone or together with the sequence,
    passed as the tuple ``(features, labels)`` or packed by :func:`~.nn.pack_context` (``event_dim=2``), as in
    :func:`~pyro_flows.Glow`.

    Args:
        shape: the signal shape ``(C, L)``, ``L`` divisible by ``groups``.
        steps: flow steps (1×1 convolution and coupling).
        groups: samples squeezed into channels (WaveGlow: 8).
        hidden_channels, layers: the WaveNets' residual channels and dilated layers.
        context_shape, context_channels: the aligned feature sequence and its conditioning network's channels.
        classes, context, embedding_features: labels (embedded) or a vector context.

    References
    ----------
    - R. Prenger, R. Valle and B. Catanzaro.
      *WaveGlow: A Flow-based Generative Network for Speech Synthesis*. ICASSP 2019.
      `arXiv:1811.00002 <https://arxiv.org/abs/1811.00002>`__

    Example:
        >>> model = WaveGlow((1, 64), steps=2, groups=4, hidden_channels=8, layers=2, context_shape=(3, 8))
        >>> features = torch.randn(5, 3, 8)  # 8 frames of 3 features per 64 samples
        >>> model(features).sample().shape
        torch.Size([5, 1, 64])
    """
    shape = _signal_shape(shape, groups)
    if isinstance(layers, bool) or not isinstance(layers, Integral) or layers < 1:
        raise ValueError(f"WaveGlow: layers (of each WaveNet) must be an integer >= 1, got {layers!r}")
    hidden = (hidden_channels,) * layers
    _check_image_sizes("WaveGlow", steps, hidden)
    layer_context, embedding, features = image_context(
        "WaveGlow", classes, context, embedding_features, context_shape, context_channels, spatial=1
    )
    squeezed = torch.Size((shape[0] * groups, shape[1] // groups))
    coupling, kw = _conditional(T.AffineCoupling, T.ConditionalAffineCoupling, layer_context)
    layers_: list[Transform] = [Squeeze1d(shape, groups)]
    for k in range(steps):  # base→data: coupling, then the 1×1 convolution
        layers_ += [coupling(squeezed, mask=T.channel_mask(squeezed[0], k), hidden=hidden, **kw)]
        layers_ += [T.InvertibleConv1x1(squeezed)]
    chain = (T.ConditionalChain if layer_context else T.Chain)([*layers_, Squeeze1d(shape, groups).inv])
    return Flow(StandardNormal(shape), [chain], features, embedding)
