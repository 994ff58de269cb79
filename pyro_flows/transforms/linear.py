"""Linear mixing between layers: fixed permutations and LU-parameterised invertible linear maps."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .base import FlowTransform


def _batch_zeros(x: Tensor, event_dims: int = 1) -> Tensor:
    return x.new_zeros(x.shape[: x.dim() - event_dims])


def _parity(permutation: Tensor) -> int:
    """+1 for an even permutation of ``range(n)``, -1 for an odd one (by its cycles: a k-cycle has parity k - 1)."""
    indices, seen, sign = permutation.tolist(), [False] * permutation.numel(), 1
    for start in range(len(indices)):
        length, i = 0, start
        while not seen[i]:
            seen[i], i, length = True, indices[i], length + 1
        if length and length % 2 == 0:
            sign = -sign
    return sign


class Permute(FlowTransform):
    r"""Fixed permutation of the features, :math:`y_i = x_{\pi(i)}`; :math:`\log|\det J| = 0`.

    Args:
        features: :math:`D`.
        permutation: a permutation of ``range(D)``, ``"reverse"`` (default) or
            ``"random"`` (drawn from torch's global generator).

    Example:
        >>> Permute(3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP* (alternating halves between
          couplings), arXiv:1605.08803.
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions* (reversal, random shuffle
          and learned mixing compared), arXiv:1807.03039.
    """

    permutation: Tensor  # buffers
    inverse_permutation: Tensor

    def __init__(self, features: int, permutation: Union[str, Sequence[int], Tensor] = "reverse") -> None:
        super().__init__((features,))
        if isinstance(permutation, str):
            if permutation not in ("reverse", "random"):
                raise ValueError(f"Permute: permutation must be 'reverse', 'random' or indices, got {permutation!r}")
            permutation = torch.arange(features - 1, -1, -1) if permutation == "reverse" else torch.randperm(features)
        permutation = torch.as_tensor(permutation).long()
        if sorted(permutation.tolist()) != list(range(features)):
            raise ValueError(f"Permute: not a permutation of 0..{features - 1}: {permutation.tolist()}")
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    @property
    def sign(self) -> int:
        r"""The permutation's parity: :math:`\det J = \pm 1`."""
        return _parity(self.permutation)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return x.index_select(-1, self.permutation), _batch_zeros(x)

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return y.index_select(-1, self.inverse_permutation), _batch_zeros(y)


class LUWeight(nn.Module):
    r"""An invertible :math:`D \times D` matrix in LU form, :math:`W = P L (U + \mathrm{diag}(\sigma e^{s}))`.

    :math:`P` a fixed permutation, :math:`L` unit lower-triangular,
    :math:`U` strictly upper-triangular, :math:`\sigma` fixed signs and
    :math:`s` learned log-magnitudes, so :math:`\log|\det W| = \sum_i s_i`
    costs :math:`O(D)` and :math:`W^{-1}v` two triangular solves. Initialised
    at a random rotation (Kingma & Dhariwal 2018). Shared by
    :class:`LULinear` (vectors) and Glow's invertible 1×1 convolution (channels).

    Example:
        >>> w = LUWeight(4)
        >>> torch.allclose(w.log_abs_det(), torch.linalg.slogdet(w.weight())[1], atol=1e-5)
        True

    References:
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions*, arXiv:1807.03039.
    """

    permutation: Tensor  # buffers
    sign: Tensor
    lower_mask: Tensor
    eye: Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64))
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("permutation", permutation.to(dtype))
        self.register_buffer("sign", diagonal.sign().to(dtype))
        self.register_buffer("lower_mask", torch.tril(torch.ones(features, features), -1).to(dtype))
        self.register_buffer("eye", torch.eye(features, dtype=dtype))
        self.lower = nn.Parameter(lower.to(dtype))
        self.upper = nn.Parameter(upper.to(dtype))
        self.log_diagonal = nn.Parameter(diagonal.abs().log().to(dtype))

    def factors(self) -> tuple[Tensor, Tensor]:
        """The triangular factors ``(L, U)`` with their fixed structure imposed."""
        return self.lower * self.lower_mask + self.eye, self._upper()

    def _upper(self) -> Tensor:
        return self.upper * self.lower_mask.T + torch.diag(self.sign * self.log_diagonal.exp())

    def weight(self) -> Tensor:
        lower, upper = self.factors()
        return self.permutation @ lower @ upper

    def log_abs_det(self) -> Tensor:
        return self.log_diagonal.sum()

    def det_sign(self) -> int:
        r"""The sign of :math:`\det W = \det P \prod_i \sigma_i e^{s_i}`: the parity of :math:`P` times
        :math:`\prod_i \sigma_i`."""
        return _parity(self.permutation.argmax(dim=1)) * (1 if bool((self.sign < 0).sum() % 2 == 0) else -1)

    def inverse_weight(self, column_scale: Optional[Tensor] = None) -> Tensor:
        r""":math:`W^{-1} = U^{-1} L^{-1} P^\top` by two triangular solves of the LU factors (for many right-hand
        sides, e.g. every pixel), or :math:`W^{-1} \mathrm{diag}(d)` for ``column_scale`` :math:`d` ``(D,)``.

        The first solve reads only the strict lower triangle of the ``lower`` parameter (``unitriangular``), and
        its gradient is zero elsewhere, exactly as for :meth:`factors`' masked :math:`L`.
        """
        rhs = self.permutation.T if column_scale is None else self.permutation.T * column_scale
        z = torch.linalg.solve_triangular(self.lower, rhs, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(self._upper(), z, upper=True)

    def solve_rows(self, rows: Tensor) -> Tensor:
        r"""``X`` with :math:`X W^\top = ` ``rows`` for ``rows`` of shape ``(N, D)``, by triangular solves."""
        lower, upper = self.factors()
        z = torch.linalg.solve_triangular(lower.T, rows @ self.permutation, upper=True, left=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper.T, z, upper=False, left=False)


class LULinear(FlowTransform):
    r"""Invertible linear layer :math:`y = W x + b` with :math:`W` in LU form (:class:`LUWeight`).

    Glow's invertible 1×1 convolution for vectors (Kingma & Dhariwal 2018);
    :math:`\log|\det J| = \sum_i s_i`. The inverse uses two triangular solves.

    Example:
        >>> layer = LULinear(4)
        >>> x = torch.randn(10, 4)
        >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
        True

    References:
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions*, arXiv:1807.03039.
    """

    def __init__(self, features: int) -> None:
        super().__init__((features,))
        self.lu = LUWeight(features)
        self.bias = nn.Parameter(torch.zeros(features))

    @property
    def sign(self) -> int:
        r"""The sign of :math:`\det W` (:meth:`LUWeight.det_sign`): -1 for about half of the random initialisations."""
        return self.lu.det_sign()

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y = torch.nn.functional.linear(x, self.lu.weight(), self.bias)
        return y, self.lu.log_abs_det().expand(x.shape[:-1])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        rows = (y - self.bias).reshape(-1, y.shape[-1])
        x = self.lu.solve_rows(rows).reshape(y.shape)
        return x, (-self.lu.log_abs_det()).expand(y.shape[:-1])


class InvertibleConv1x1(FlowTransform):
    r"""Glow's invertible 1×1 convolution (Kingma & Dhariwal 2018): one LU-parameterised matrix mixes the channels.

    For an image :math:`x` of shape ``(C, H, W)`` and :math:`W \in \mathbb{R}^{C \times C}`
    in LU form (:class:`LUWeight`, the same math as :class:`LULinear`),

    .. math:: y_{:, h, w} = W x_{:, h, w}, \qquad \log|\det J| = H W \sum_c s_c .

    A signal ``(C, L)`` is mixed the same way at each time step (WaveGlow's invertible 1×1 convolution,
    Prenger et al. 2019): :math:`y_{:, t} = W x_{:, t}`, :math:`\log|\det J| = L \sum_c s_c`.

    The inverse applies :math:`W^{-1}`, computed once per call by two triangular
    solves of the :math:`C \times C` LU factors.

    Args:
        shape: the image shape ``(C, H, W)``, or a signal's ``(C, L)``.

    Example:
        >>> layer = InvertibleConv1x1((3, 8, 8))
        >>> x = torch.randn(5, 3, 8, 8)
        >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
        True
        >>> InvertibleConv1x1((8, 100))(torch.randn(5, 8, 100)).shape
        torch.Size([5, 8, 100])

    References:
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions*, arXiv:1807.03039.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__(tuple(shape))
        if len(self.event_shape) not in (2, 3):
            raise ValueError(f"InvertibleConv1x1: shape must be (C, H, W) or (C, L), got {tuple(shape)}")
        self.lu = LUWeight(self.event_shape[0])

    @property
    def sign(self) -> int:
        r"""The sign of :math:`(\det W)^{HW}` (:math:`L` for signals): :math:`\det W`'s when odd, +1 otherwise."""
        return self.lu.det_sign() if self.event_shape[1:].numel() % 2 else 1

    def _log_det(self, batch_shape: torch.Size) -> Tensor:
        return (self.event_shape[1:].numel() * self.lu.log_abs_det()).expand(batch_shape)

    def _mix(self, weight: Tensor, x: Tensor) -> Tensor:
        if len(self.event_shape) == 2:
            return torch.matmul(weight, x)
        return torch.matmul(weight, x.flatten(-2)).unflatten(-1, x.shape[-2:])

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._mix(self.lu.weight(), x), self._log_det(x.shape[: x.dim() - len(self.event_shape)])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._mix(self.lu.inverse_weight(), y), -self._log_det(y.shape[: y.dim() - len(self.event_shape)])
