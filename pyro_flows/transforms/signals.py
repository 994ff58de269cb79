"""1-D signal layers: squeezing time into channels (WaveGlow).

The other layers of a signal flow are the image layers' 1-D cases: :class:`~.linear.InvertibleConv1x1` mixes the
channels of ``(C, L)`` events at every time step, and :class:`~.coupling.Coupling` (e.g.
:class:`~.coupling.AffineCoupling`) over ``(C, L)`` events is conditioned by a :class:`~pyro_flows.nn.WaveNet`,
optionally on an aligned feature sequence ``(C_c, L_c)`` (``context_shape``).
"""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

from torch import Tensor

from .base import FlowTransform


class Squeeze1d(FlowTransform):
    r"""Time-to-channels squeeze of signals (WaveGlow, Prenger et al. 2019): ``factor`` consecutive samples of a
    channel become ``factor`` channels of one time step.

    Maps ``(C, L)`` to ``(f C, L / f)`` for ``factor`` :math:`f`,

    .. math:: y_{f c + i,\, t} = x_{c,\, f t + i}, \qquad \log|\det J| = 0,

    a permutation of the entries (the 1-D :class:`~.multiscale.Squeeze`). In a flow's base→data layers use
    ``Squeeze1d(shape, f).inv`` where the data side is the signal.

    Args:
        shape: the input signal shape ``(C, L)``, ``L`` divisible by ``factor``.
        factor: samples grouped per time step (WaveGlow: 8).

    Example:
        >>> Squeeze1d((1, 8), factor=4)(torch.arange(8.0).reshape(1, 8))
        tensor([[0., 4.],
                [1., 5.],
                [2., 6.],
                [3., 7.]])

    References:
        - Prenger, Valle & Catanzaro (2019), *WaveGlow: A flow-based generative network for speech synthesis*,
          arXiv:1811.00002.
    """

    factor: int

    def __init__(self, shape: Sequence[int], factor: int = 2) -> None:
        if isinstance(factor, bool) or not isinstance(factor, Integral) or factor < 1:
            raise ValueError(f"Squeeze1d: factor must be an integer >= 1, got {factor!r}")
        if len(shape) != 2 or shape[1] % factor:
            raise ValueError(f"Squeeze1d: shape must be (C, L) with L divisible by {factor}, got {tuple(shape)}")
        channels, length = shape
        super().__init__(tuple(shape), codomain_shape=(factor * channels, length // factor))
        self.factor = int(factor)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        blocks = x.unflatten(-1, (-1, self.factor))  # (..., C, L/f, f)
        return blocks.transpose(-1, -2).flatten(-3, -2), x.new_zeros(x.shape[:-2])  # (..., C f, L/f)

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        blocks = y.unflatten(-2, (-1, self.factor))  # (..., C, f, L/f)
        return blocks.transpose(-1, -2).flatten(-2), y.new_zeros(y.shape[:-2])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factor={self.factor}"
