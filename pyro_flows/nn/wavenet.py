"""WaveNet-like conditioner of 1-D signals: gated dilated convolutions, as in WaveGlow's coupling network."""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .cnn import aligned_context_features, flatten_batch, split_aligned
from .mlp import check_hidden


class WaveNet(nn.Module):
    r"""WaveGlow's coupling network (Prenger et al. 2019), a non-causal WaveNet (van den Oord et al. 2016).

    ``forward(x, context)`` maps signals ``(..., in_channels, L)`` (and an optional context
    ``(..., context_features)`` broadcast against their batch dims) to ``(..., out_channels, L)``. A 1×1
    convolution lifts the input to :math:`C` residual channels; layer :math:`i = 0, \dots, K-1` applies a
    convolution of odd ``kernel_size`` dilated by :math:`2^i` (so the receptive field is
    :math:`1 + (k - 1)(2^K - 1)` samples) and the gated activation

    .. math:: z_i = \tanh(W_{f,i} * h_i + V_{f,i}\, c) \odot \sigma(W_{g,i} * h_i + V_{g,i}\, c),
              \qquad h_{i+1} = h_i + R_i z_i, \qquad s = \textstyle\sum_i S_i z_i,

    and the output is a 1×1 convolution of the skip sum :math:`s` that starts at zero (a coupling conditioned
    by a fresh network is the identity). The context :math:`c` enters every gate: an aligned feature sequence
    ``context_shape=(C_c, L_c)`` (the first :math:`C_c L_c` context features; e.g. WaveGlow's mel-spectrogram)
    resized to ``L`` by linear interpolation (:func:`~.cnn.resize`) through 1×1 convolutions, and the features
    after it (a vector context) as per-channel biases.

    Args:
        in_channels, out_channels: channels of the input and output signals.
        hidden: the residual channels of each dilated layer, one entry per layer, all equal (e.g. ``(64,) * 4``).
        kernel_size: odd width of the dilated convolutions.
        context_features: size of the flat context (the flattened ``context_shape`` and the vector after it).
        context_shape: the aligned context ``(C_c, L_c)`` leading the context.

    References
    ----------
    - R. Prenger, R. Valle and B. Catanzaro.
      *WaveGlow: A Flow-based Generative Network for Speech Synthesis*. ICASSP 2019.
      `arXiv:1811.00002 <https://arxiv.org/abs/1811.00002>`__
    - A. van den Oord et al. *WaveNet: A Generative Model for Raw Audio*. 2016.
      `arXiv:1609.03499 <https://arxiv.org/abs/1609.03499>`__

    Example:
        >>> net = WaveNet(2, 4, hidden=(16, 16, 16), context_shape=(3, 8))  # 8 feature frames for 64 samples
        >>> net(torch.randn(5, 2, 64), torch.randn(5, 24)).shape
        torch.Size([5, 4, 64])
    """

    context_shape: Optional[torch.Size]
    aligned: Optional[nn.Conv1d]
    vector: Optional[nn.Linear]
    start: nn.Conv1d
    end: nn.Conv1d
    dilated: nn.ModuleList
    res_skip: nn.ModuleList

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int] = (64, 64, 64, 64),
        kernel_size: int = 3,
        context_features: int = 0,
        context_shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        widths = check_hidden(hidden, "WaveNet")
        if not widths or len(set(widths)) != 1:
            raise ValueError(f"WaveNet: hidden must be one residual width per layer, all equal; got {hidden!r}")
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, Integral)
            or kernel_size < 1
            or not kernel_size % 2
        ):
            raise ValueError(f"WaveNet: kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        context_features, self.context_shape = aligned_context_features(context_features, context_shape, 1, "WaveNet")
        self.in_channels, self.out_channels, self.context_features = in_channels, out_channels, context_features
        channels, layers = widths[0], len(widths)
        self.start = nn.Conv1d(in_channels, channels, 1)
        self.dilated = nn.ModuleList(
            nn.Conv1d(channels, 2 * channels, kernel_size, dilation=2**i, padding=2**i * (kernel_size - 1) // 2)
            for i in range(layers)
        )
        # the last layer has no residual output (nothing reads it): only its skip channels
        self.res_skip = nn.ModuleList(
            nn.Conv1d(channels, 2 * channels if i < layers - 1 else channels, 1) for i in range(layers)
        )
        aligned = 0 if self.context_shape is None else self.context_shape.numel()
        vector = context_features - aligned
        gates = 2 * channels * layers
        self.aligned = None if self.context_shape is None else nn.Conv1d(self.context_shape[0], gates, 1)
        self.vector = nn.Linear(vector, gates) if vector else None
        self.end = nn.Conv1d(channels, out_channels, 1)
        nn.init.zeros_(self.end.weight)
        if self.end.bias is not None:  # always: the layer is built with a bias
            nn.init.zeros_(self.end.bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h, context, batch = flatten_batch(x, context, 2)
        aligned, vector = split_aligned(context, self.context_shape, x.shape[-1:])
        gate_bias: Optional[Tensor] = None
        if self.aligned is not None:
            gate_bias = self.aligned(aligned)
        if self.vector is not None:
            bias = self.vector(vector)[:, :, None]
            gate_bias = bias if gate_bias is None else gate_bias + bias
        h = self.start(h)
        channels = h.shape[1]
        skip: Optional[Tensor] = None
        for i, (dilated, res_skip) in enumerate(zip(self.dilated, self.res_skip, strict=True)):
            a = dilated(h)
            if gate_bias is not None:
                a = a + gate_bias[:, 2 * channels * i : 2 * channels * (i + 1)]
            out = res_skip(torch.tanh(a[:, :channels]) * torch.sigmoid(a[:, channels:]))
            if i < len(self.dilated) - 1:
                h = h + out[:, :channels]
                out = out[:, channels:]
            skip = out if skip is None else skip + out
        assert skip is not None  # at least one layer
        out = self.end(skip)
        return out.reshape(batch + out.shape[1:])
