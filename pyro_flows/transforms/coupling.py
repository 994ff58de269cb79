"""Coupling layers: NICE, RealNVP and spline couplings are one structure with different maps."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..nn import CNN, MLP
from ..nn.cnn import Conv2dZeros, aligned_context_features
from ..nn.wavenet import WaveNet
from .base import Conditional, FlowTransform
from .maps import Affine, ElementwiseMap, RationalQuadraticSpline, Shift


class Coupling(FlowTransform):
    r"""Coupling layer (Dinh et al. 2015, 2017): half the features condition a map of the other half.

    With a boolean ``mask`` marking the transformed entries :math:`B` and the
    others :math:`A`,

    .. math::
        y_A = x_A, \qquad y_B = \tau(x_B;\ \theta(x_A, c)), \qquad
        \log|\det J| = \sum_{i \in B} \log \tau'(x_i),

    where :math:`\tau` is the elementwise ``transform_map`` and :math:`\theta`
    a conditioner network of :math:`x_A` (and of the context :math:`c` in the
    conditional twin) whose last layer starts at zero, so a fresh layer is the
    identity. Both directions take one network pass.

    Signals (``features`` a shape ``(C, L)``): the conditioner is a :class:`~pyro_flows.nn.WaveNet` (gated
    dilated convolutions, ``hidden`` one equal width per layer; WaveGlow's affine coupling) and ``mask`` a
    boolean ``(C,)`` over channels.

    Vectors (``features`` an int :math:`D`): the conditioner is an
    :class:`~pyro_flows.nn.MLP` and ``mask`` a boolean ``(D,)`` (default: the
    second half). Images (``features`` a shape ``(C, H, W)``): the conditioner
    is a :class:`~pyro_flows.nn.CNN` and ``mask`` is either a boolean ``(C,)``
    over channels (Glow's split, default: the second half of the channels; see
    :func:`channel_mask`) or a boolean ``(C, H, W)`` over pixels (RealNVP's
    checkerboard, :func:`checkerboard_mask`), for which the CNN sees the image
    with the transformed pixels zeroed.

    Shapes: ``x`` is ``(..., *event_shape)``; the context ``(..., context_features)``
    broadcasts with its batch dims.

    Aligned context (images, conditional twin): with ``context_shape=(C_c, H_c, W_c)`` the first
    :math:`C_c H_c W_c` context features are an image (e.g. ``cond.flatten(-3)``), of any size: the CNN resizes
    it to ``H × W`` and concatenates it on its input's channels (see :class:`~pyro_flows.nn.CNN`); features after
    it are a vector context. ``context_features`` counts them all (0: the flattened image alone). Signals take
    an aligned feature sequence ``(C_c, L_c)``, which the WaveNet resizes to ``L`` and feeds to every gate.

    Args:
        features: :math:`D`, a signal shape ``(C, L)`` or an image shape ``(C, H, W)``.
        transform_map: an :class:`~pyro_flows.transforms.maps.ElementwiseMap`.
        mask: which entries are transformed (see above).
        hidden: widths (channels for images) of the conditioner's hidden layers; for images ``()`` is one
            zero-initialised 3×3 convolution (:class:`~pyro_flows.nn.cnn.Conv2dZeros`, Glow's split-prior network).
        context_features: context size (conditional twin only).
        activation: the conditioner's activation.
        residual: residual hidden layers (vector :class:`~pyro_flows.nn.MLP` only).
        input_bound: None, or the conditioner squashes its inputs into this bound (vector
            :class:`~pyro_flows.nn.MLP` only): the map's parameters become constant far from the data.
        context_shape: the aligned context that leads the context: an image ``(C_c, H_c, W_c)`` (images) or a
            feature sequence ``(C_c, L_c)`` (signals).

    Example:
        >>> layer = Coupling(4, Affine())
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4))
        >>> image_layer = Coupling((2, 8, 8), Affine(), mask=checkerboard_mask((2, 8, 8)))
        >>> image_layer(torch.randn(10, 2, 8, 8)).shape
        torch.Size([10, 2, 8, 8])

    References:
        - Dinh, Krueger & Bengio (2015), *NICE: Non-linear independent components estimation*, arXiv:1410.8516.
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*, arXiv:1605.08803.
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions*, arXiv:1807.03039.
        - Durkan, Bekasov, Murray & Papamakarios (2019), *Neural spline flows*, arXiv:1906.04032.
    """

    mask: Tensor  # buffers
    identity_index: Tensor
    transformed_index: Tensor
    conditioner: nn.Module

    def __init__(
        self,
        features: Union[int, Sequence[int]],
        transform_map: ElementwiseMap,
        mask: Optional[Tensor] = None,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        residual: bool = False,
        input_bound: Optional[float] = None,
        context_shape: Optional[Sequence[int]] = None,
    ) -> None:
        shape = torch.Size((features,) if isinstance(features, int) else tuple(features))
        name = type(self).__name__
        if len(shape) not in (1, 2, 3):
            raise ValueError(
                f"{name}: features must be D, a signal shape (C, L) or an image shape (C, H, W), got {features!r}"
            )
        if context_shape is not None and len(shape) == 1:
            raise ValueError(
                f"{name}: context_shape (an aligned context) is for image and signal couplings, not vectors"
            )
        context_features, context_shape = aligned_context_features(
            context_features, context_shape, len(shape) - 1, name
        )
        super().__init__(shape, context_features)
        mask = channel_mask(shape[0]) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        self.transform_map = transform_map
        self.split_dim = -len(shape)  # the axis a (D,) or (C,) mask splits
        self.pixelwise = len(shape) == 3 and mask.shape == shape
        if not (self.pixelwise or mask.shape == shape[:1]) or not mask.any():
            expected = f"({shape[0]},)" + (f" or {tuple(shape)}" if len(shape) == 3 else "")
            raise ValueError(
                f"{type(self).__name__}: mask must be a boolean {expected} with a True entry, got {tuple(mask.shape)}"
            )
        self.blocks, self.transformed_first = False, False
        if self.pixelwise:
            self.register_buffer("mask", mask, persistent=False)
            conditioned, transformed = shape[0], shape[0]
        else:
            self.register_buffer("identity_index", torch.nonzero(~mask).flatten(), persistent=False)
            self.register_buffer("transformed_index", torch.nonzero(mask).flatten(), persistent=False)
            transformed = int(mask.sum())
            conditioned = shape[0] - transformed
            # a mask of two blocks (every channel_mask): narrow views and one cat instead of gathers and a scatter
            first = bool(mask[0])
            self.blocks = bool(
                (mask == (torch.arange(len(mask)) < (transformed if first else conditioned)).eq(first)).all()
            )
            self.transformed_first = first
        self.num_transformed = transformed
        out = transformed * transform_map.num_params
        if len(shape) == 1:
            self.conditioner = MLP(
                conditioned, out, hidden, context_features, activation, residual, input_bound=input_bound
            )
        elif input_bound is not None:
            raise ValueError(f"{name}: input_bound is for vectors; images and signals have convolutional conditioners")
        elif len(shape) == 2:
            self.conditioner = WaveNet(conditioned, out, hidden, 3, context_features, context_shape)
        elif len(tuple(hidden)) == 0:  # Glow's split-prior network: one linear, zero-initialised 3x3 convolution
            self.conditioner = Conv2dZeros(conditioned, out, context_features, context_shape)
        else:
            self.conditioner = CNN(conditioned, out, hidden, context_features, activation, context_shape)
        self.context_shape = context_shape

    def _couple(self, x: Tensor, context: Optional[Tensor], inverse: bool) -> tuple[Tensor, Tensor]:
        dim = self.split_dim
        if self.pixelwise:
            conditioned, transformed = x.masked_fill(self.mask, 0.0), x
        elif self.blocks:
            first, second = x.split(self._block_sizes(), dim)
            transformed, conditioned = (first, second) if self.transformed_first else (second, first)
        else:
            conditioned = x.index_select(dim, self.identity_index)
            transformed = x.index_select(dim, self.transformed_index)
        params = self.conditioner(conditioned, context)
        batch = params.shape[: params.dim() + dim]  # broadcast with the context's batch
        if batch != x.shape[: x.dim() + dim]:  # (an expand is an autograd node even when it changes nothing)
            x, transformed = x.expand(batch + x.shape[dim:]), transformed.expand(batch + transformed.shape[dim:])
        params = params.unflatten(dim, (self.transform_map.num_params, self.num_transformed)).movedim(dim - 1, 0)
        apply = self.transform_map.inverse if inverse else self.transform_map.forward
        y_transformed, log_derivative = apply(transformed, params)
        if self.pixelwise:
            y = torch.where(self.mask, y_transformed, x)
            log_derivative = log_derivative.masked_fill(~self.mask, 0.0)
        elif self.blocks:
            kept = (
                conditioned
                if batch == conditioned.shape[: conditioned.dim() + dim]
                else conditioned.expand(batch + conditioned.shape[dim:])
            )
            y = torch.cat((y_transformed, kept) if self.transformed_first else (kept, y_transformed), dim)
        else:
            y = x.index_copy(dim, self.transformed_index, y_transformed)
        return y, log_derivative.flatten(dim).sum(-1)

    def _block_sizes(self) -> tuple[int, int]:
        """The sizes of the mask's two blocks along the split axis, in order."""
        total = self.event_shape[0]
        return (
            (self.num_transformed, total - self.num_transformed)
            if self.transformed_first
            else (total - self.num_transformed, self.num_transformed)
        )

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def extra_repr(self) -> str:
        aligned = "" if self.context_shape is None else f", context_shape={tuple(self.context_shape)}"
        return f"{super().extra_repr()}{aligned}, transform_map={self.transform_map!r}"


def channel_mask(channels: int, parity: int = 0) -> Tensor:
    """Boolean ``(channels,)`` marking the second half of the channels or vector features (``parity=1``: the
    first half); alternating parities between layers is how every coupling preset alternates its halves."""
    mask = torch.arange(channels) >= channels // 2
    return mask if parity % 2 == 0 or channels == 1 else ~mask


def checkerboard_mask(shape: Sequence[int], parity: int = 0) -> Tensor:
    """Boolean ``(C, H, W)`` checkerboard over pixels, the same in every channel (RealNVP); ``parity`` flips it."""
    channels, height, width = shape
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    board = (rows + cols + parity) % 2 == 1
    return board.expand(channels, height, width).clone()


class AdditiveCoupling(Coupling):
    """NICE's additive coupling (Dinh et al. 2015): :class:`Coupling` with a :class:`~.maps.Shift`.

    Volume preserving: the log-det is zero.

    Example:
        >>> y, ladj = AdditiveCoupling(4).call_and_ladj(torch.randn(10, 4))
        >>> ladj
        tensor([0., 0., 0., 0., 0., 0., 0., 0., 0., 0.])

    References:
        - Dinh, Krueger & Bengio (2015), *NICE: Non-linear independent components estimation*, arXiv:1410.8516.
    """

    def __init__(self, features: Union[int, Sequence[int]], **kwargs) -> None:
        super().__init__(features, Shift(), **kwargs)


class AffineCoupling(Coupling):
    """RealNVP's affine coupling (Dinh et al. 2017): :class:`Coupling` with an :class:`~.maps.Affine` map.

    Example:
        >>> layer = AffineCoupling(4, hidden=(64, 64), log_scale_bound=3.0)
        >>> layer(torch.randn(10, 4)).shape
        torch.Size([10, 4])

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*, arXiv:1605.08803.
    """

    def __init__(self, features: Union[int, Sequence[int]], log_scale_bound: float = 3.0, **kwargs) -> None:
        super().__init__(features, Affine(log_scale_bound), **kwargs)


class SplineCoupling(Coupling):
    """Neural spline coupling (Durkan et al. 2019): :class:`Coupling` with a rational-quadratic spline.

    Example:
        >>> layer = SplineCoupling(4, bins=8, bound=5.0)
        >>> layer.inv(torch.randn(10, 4)).shape
        torch.Size([10, 4])

    References:
        - Durkan, Bekasov, Murray & Papamakarios (2019), *Neural spline flows*, arXiv:1906.04032.
    """

    def __init__(self, features: Union[int, Sequence[int]], bins: int = 8, bound: float = 5.0, **kwargs) -> None:
        super().__init__(features, RationalQuadraticSpline(bins, bound), **kwargs)


class ConditionalCoupling(Conditional, Coupling):
    """:class:`Coupling` whose conditioner also sees a context: a vector, or an aligned image (``context_shape``).

    Example:
        >>> layer = ConditionalCoupling(4, Affine(), context_features=3)
        >>> layer.condition(torch.randn(3))(torch.randn(10, 4)).shape
        torch.Size([10, 4])
        >>> image_layer = ConditionalCoupling((2, 8, 8), Affine(), context_shape=(1, 4, 4))
        >>> cond = torch.randn(10, 1, 4, 4)  # a 4×4 image per 8×8 input, resized by the CNN
        >>> image_layer.call_and_ladj(torch.randn(10, 2, 8, 8), cond.flatten(-3))[0].shape
        torch.Size([10, 2, 8, 8])
    """


class ConditionalAdditiveCoupling(Conditional, AdditiveCoupling):
    """Conditional twin of :class:`AdditiveCoupling` (needs ``context_features``)."""


class ConditionalAffineCoupling(Conditional, AffineCoupling):
    """Conditional twin of :class:`AffineCoupling` (needs ``context_features`` or an image's ``context_shape``)."""


class ConditionalSplineCoupling(Conditional, SplineCoupling):
    """Conditional twin of :class:`SplineCoupling` (needs ``context_features``)."""
