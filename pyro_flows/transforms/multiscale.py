"""Multi-scale image architecture (Dinh et al. 2017; Kingma & Dhariwal 2018): squeeze, chains of layers, factor-out."""

from __future__ import annotations

from typing import Optional, Sequence, Union, cast

import torch
from torch import Tensor

from ..nn.cnn import aligned_context_features
from .base import Conditional, FlowTransform
from .coupling import AffineCoupling, ConditionalAffineCoupling, channel_mask
from .linear import InvertibleConv1x1
from .normalization import ActNorm


def _context_for(layer: FlowTransform, context: Optional[Tensor]) -> Optional[Tensor]:
    return context if layer.context_features else None


class Squeeze(FlowTransform):
    r"""Space-to-depth (Dinh et al. 2017): every 2×2 block of pixels becomes 4 channels of one pixel.

    Maps ``(C, H, W)`` to ``(4C, H/2, W/2)``,

    .. math:: y_{4c + 2i + j,\, h, w} = x_{c,\, 2h + i,\, 2w + j}, \qquad \log|\det J| = 0,

    a permutation of the entries. In a flow's base→data layers use ``Squeeze(shape).inv``
    (depth-to-space) where the data side has the finer resolution.

    Args:
        shape: the input image shape ``(C, H, W)``, ``H`` and ``W`` even.

    Example:
        >>> Squeeze((1, 4, 4))(torch.arange(16.0).reshape(1, 4, 4))[:, 0, 0]
        tensor([0., 1., 4., 5.])

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*, arXiv:1605.08803.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
            raise ValueError(f"Squeeze: shape must be (C, H, W) with even H and W, got {tuple(shape)}")
        channels, height, width = shape
        super().__init__(tuple(shape), codomain_shape=(4 * channels, height // 2, width // 2))

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        _, height, width = self.event_shape
        blocks = x.unflatten(-1, (width // 2, 2)).unflatten(-3, (height // 2, 2))  # (..., C, H/2, 2, W/2, 2)
        y = blocks.movedim((-3, -1), (-4, -3)).flatten(-5, -3)  # (..., C, 2, 2, H/2, W/2) -> (..., 4C, H/2, W/2)
        return y, x.new_zeros(x.shape[:-3])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        channels = self.event_shape[0]
        blocks = y.unflatten(-3, (channels, 2, 2))  # (..., C, 2, 2, H/2, W/2)
        x = blocks.movedim((-4, -3), (-3, -1))  # (..., C, H/2, 2, W/2, 2)
        return x.flatten(-2, -1).flatten(-3, -2), y.new_zeros(y.shape[:-3])


def _fusable(conv: FlowTransform, norm: FlowTransform) -> bool:
    """Whether ``norm`` after ``conv`` (base→data) is Glow's 1×1 convolution and ActNorm on the same images."""
    return (
        type(conv) is InvertibleConv1x1
        and type(norm) is ActNorm
        and len(conv.event_shape) == 3
        and conv.event_shape == norm.event_shape
    )


def _mix_pixels(matrix: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x[..., :, h, w] + bias`` at every pixel of images ``x`` ``(..., C, H, W)``: one batched matmul-add."""
    flat = (x if x.dim() == 4 else x.reshape((-1,) + x.shape[-3:])).flatten(2)  # (N, C, HW)
    n, channels, _ = flat.shape
    return torch.baddbmm(bias[:, None], matrix.expand(n, channels, channels), flat).view(x.shape)


def _conv_actnorm(conv: InvertibleConv1x1, norm: ActNorm, value: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    r"""Glow's :class:`~.linear.InvertibleConv1x1` then :class:`~.normalization.ActNorm` (base→data) as one affine
    map of the channels at every pixel, :math:`y = e^{s} \odot (W x) + b` and
    :math:`x = W^{-1} \mathrm{diag}(e^{-s})\, (y - b)`, with
    :math:`\log|\det J| = HW (\sum_c \log|u_{cc}| + \sum_c s_c)`: the math of the two layers one after the other,
    in one matmul (ActNorm's elementwise passes over the images are folded into the :math:`C \times C` matrix)."""
    pixels, batch = conv.event_shape[1:].numel(), value.shape[:-3]
    log_det = (conv.lu.log_diagonal + norm.log_scale).sum()
    if inverse:
        matrix = conv.lu.inverse_weight(torch.exp(-norm.log_scale))
        return _mix_pixels(matrix, -(matrix @ norm.shift), value), (-pixels * log_det).expand(batch)
    matrix = conv.lu.weight() * norm.log_scale.exp()[:, None]
    return _mix_pixels(matrix, norm.shift, value), (pixels * log_det).expand(batch)


class Chain(FlowTransform):
    r"""Layers applied one after the other as one layer: :math:`f = f_K \circ \dots \circ f_1`.

    .. math:: \log|\det J_f(x)| = \sum_k \log|\det J_{f_k}(x_{k-1})|.

    Each layer's output event shape must be the next one's input shape (a
    :class:`Squeeze` may change it inside the chain). Conditional layers get
    the context (use :class:`ConditionalChain` when any layer is conditional;
    all of them must take the same ``context_features``). It is what a
    :class:`FactorOut` applies to the channels it keeps.

    An :class:`~.linear.InvertibleConv1x1` followed by an :class:`~.normalization.ActNorm` of the same images
    (Glow's step) runs as one affine map of the channels, :math:`y = e^{s} \odot (W x) + b` (inverse:
    :math:`x = W^{-1} \mathrm{diag}(e^{-s}) (y - b)`): one matmul instead of three passes over the images. The
    layers, their parameters and their ``state_dict`` are unchanged; while the ActNorm may still initialise
    from the data (its first training call) the two run one after the other.

    Example:
        >>> shape = (1, 4, 4)
        >>> chain = Chain([Squeeze(shape), AffineCoupling((4, 2, 2)), Squeeze(shape).inv])
        >>> chain(torch.randn(3, *shape)).shape
        torch.Size([3, 1, 4, 4])

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*, arXiv:1605.08803.
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions*, arXiv:1807.03039.
    """

    def __init__(self, layers: Sequence[FlowTransform]) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError(f"{type(self).__name__}: needs at least one layer")
        for a, b in zip(layers[:-1], layers[1:], strict=True):
            if a.codomain_shape != b.event_shape:
                raise ValueError(
                    f"{type(self).__name__}: {type(a).__name__} outputs events of shape {tuple(a.codomain_shape)} "
                    f"but the next layer, {type(b).__name__}, takes {tuple(b.event_shape)}"
                )
        contexts = {layer.context_features for layer in layers} - {0}
        if len(contexts) > 1:
            raise ValueError(f"{type(self).__name__}: conditional layers take different context sizes {contexts}")
        super().__init__(layers[0].event_shape, max(contexts, default=0), layers[-1].codomain_shape)
        self.layers = torch.nn.ModuleList(layers)
        # where Glow's (1x1 convolution, ActNorm) pairs start: each runs as one affine map of the channels
        self._pairs = frozenset(i for i in range(len(layers) - 1) if _fusable(layers[i], layers[i + 1]))

    def _units(self) -> list[tuple[FlowTransform, ...]]:
        """The layers in order, a fusable (1×1 convolution, ActNorm) pair as one unit."""
        layers, units, i = self._layers(), [], 0
        while i < len(layers):
            step = 2 if i in self._pairs else 1
            units.append(tuple(layers[i : i + step]))
            i += step
        return units

    def _run(
        self, unit: tuple[FlowTransform, ...], value: Tensor, context: Optional[Tensor], inverse: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """One unit's output and log-dets: a (1×1 convolution, ActNorm) pair as one fused map (an ActNorm still to
        be initialised is first initialised from this batch layer by layer, so that every call, the first too, takes
        the same arithmetic), any other layer alone."""
        if len(unit) == 2:
            if cast(ActNorm, unit[1]).initializing():
                with torch.no_grad():
                    self._layer_by_layer(unit, value, context, inverse)
            out, ladj = _conv_actnorm(cast(InvertibleConv1x1, unit[0]), cast(ActNorm, unit[1]), value, inverse)
            return out, [ladj]
        return self._layer_by_layer(unit, value, context, inverse)

    @staticmethod
    def _layer_by_layer(
        unit: tuple[FlowTransform, ...], value: Tensor, context: Optional[Tensor], inverse: bool
    ) -> tuple[Tensor, list[Tensor]]:
        ladjs = []
        for layer in reversed(unit) if inverse else unit:
            c = _context_for(layer, context)
            value, ladj = layer.inverse_and_ladj(value, c) if inverse else layer.call_and_ladj(value, c)
            ladjs.append(ladj)
        return value, ladjs

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        ladjs: list[Tensor] = []
        for unit in self._units():
            x, unit_ladjs = self._run(unit, x, context, inverse=False)
            ladjs += unit_ladjs
        return x, sum(ladjs[1:], ladjs[0])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        ladjs: list[Tensor] = []
        for unit in reversed(self._units()):
            y, unit_ladjs = self._run(unit, y, context, inverse=True)
            ladjs += unit_ladjs
        return y, sum(ladjs[1:], ladjs[0])

    def _layers(self) -> list[FlowTransform]:
        return list(self.layers)  # type: ignore[arg-type]  # a ModuleList of FlowTransforms

    def extra_repr(self) -> str:
        return ""


class ConditionalChain(Conditional, Chain):
    """:class:`Chain` of layers some of which are conditional."""


class FactorOut(FlowTransform):
    r"""Multi-scale factor-out (Dinh et al. 2017) with Glow's learned split prior (Kingma & Dhariwal 2018).

    The first :math:`k = \lfloor C/2 \rfloor` channels :math:`z_a` go through
    ``inner`` (the rest of the flow, at a coarser scale); the other channels
    :math:`z_b` leave the flow here. With ``split_prior=True`` they are
    modelled by a Gaussian whose mean and scale are computed from the kept
    half on the data side,

    .. math::
        x_a = g(z_a), \qquad x_b = \mu(x_a, c) + e^{s(x_a, c)} \odot z_b, \qquad
        \log|\det J| = \log|\det J_g(z_a)| + \sum s(x_a, c),

    i.e. :math:`p(x_b \mid x_a) = \mathcal{N}(\mu, e^{2s})` for a standard normal
    base. That second step *is* an affine coupling conditioned on the kept
    channels, so it is an :class:`~.coupling.AffineCoupling` with a channel
    mask (its CNN starts at zero: the prior starts as :math:`\mathcal{N}(0, I)`).
    With ``split_prior=False`` the factored channels are standard normal (RealNVP).

    Args:
        shape: image shape ``(C, H, W)``, ``C >= 2``.
        inner: a layer on the kept channels, events ``(C // 2, H, W)`` in and out.
        split_prior: learn the conditional Gaussian of the factored channels.
        hidden: channels of the split prior's CNN; ``()``: one zero-initialised 3×3 convolution of the kept
            channels, as in Glow (:class:`~pyro_flows.nn.cnn.Conv2dZeros`, a fraction of a CNN's cost).
        context_features: context size (conditional twin only); the split prior and
            conditional inner layers see the context.
        context_shape: an aligned context image ``(C_c, H_c, W_c)`` leading the context, which the split
            prior's CNN resizes to ``H × W`` (see :class:`~.coupling.Coupling`); ``context_features`` 0 means
            the flattened image alone.

    Example:
        >>> from pyro_flows.transforms import checkerboard_mask
        >>> inner = AffineCoupling((1, 4, 4), mask=checkerboard_mask((1, 4, 4)))
        >>> layer = FactorOut((2, 4, 4), inner)
        >>> layer(torch.randn(3, 2, 4, 4)).shape
        torch.Size([3, 2, 4, 4])

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*, arXiv:1605.08803.
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions* (the learned split prior),
          arXiv:1807.03039.
    """

    def __init__(
        self,
        shape: Sequence[int],
        inner: FlowTransform,
        split_prior: bool = True,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        context_shape: Optional[Sequence[int]] = None,
    ) -> None:
        name = type(self).__name__
        context_features, context_shape = aligned_context_features(context_features, context_shape, 2, name)
        super().__init__(tuple(shape), context_features)
        if len(self.event_shape) != 3 or self.event_shape[0] < 2:
            raise ValueError(f"{type(self).__name__}: shape must be (C >= 2, H, W), got {tuple(shape)}")
        channels, height, width = self.event_shape
        self.kept = channels // 2
        kept_shape = torch.Size((self.kept, height, width))
        if inner.event_shape != kept_shape or inner.codomain_shape != kept_shape:
            raise ValueError(
                f"{type(self).__name__}: inner must map events of shape {tuple(kept_shape)} to the same shape, "
                f"got {tuple(inner.event_shape)} -> {tuple(inner.codomain_shape)}"
            )
        if inner.context_features not in (0, context_features):
            raise ValueError(f"{type(self).__name__}: inner takes context_features={inner.context_features}")
        self.inner = inner
        if split_prior:
            mask = channel_mask(channels)
            self.prior: Optional[FlowTransform] = (
                ConditionalAffineCoupling(
                    self.event_shape,
                    mask=mask,
                    hidden=hidden,
                    context_features=context_features,
                    context_shape=context_shape,
                )
                if context_features
                else AffineCoupling(self.event_shape, mask=mask, hidden=hidden)
            )
        else:
            self.prior = None

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.split((self.kept, x.shape[-3] - self.kept), dim=-3)

    @staticmethod
    def _join(kept: Tensor, factored: Tensor) -> Tensor:
        batch = torch.broadcast_shapes(kept.shape[:-3], factored.shape[:-3])
        return torch.cat((kept.expand(batch + kept.shape[-3:]), factored.expand(batch + factored.shape[-3:])), -3)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        kept, factored = self._split(x)
        kept, ladj = self.inner.call_and_ladj(kept, _context_for(self.inner, context))
        y = self._join(kept, factored)
        if self.prior is None:
            return y, ladj
        y, prior_ladj = self.prior.call_and_ladj(y, context)
        return y, ladj + prior_ladj

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        prior_ladj: Union[Tensor, float] = 0.0
        if self.prior is not None:
            y, prior_ladj = self.prior.inverse_and_ladj(y, context)
        kept, factored = self._split(y)
        kept, ladj = self.inner.inverse_and_ladj(kept, _context_for(self.inner, context))
        return self._join(kept, factored), ladj + prior_ladj


class ConditionalFactorOut(Conditional, FactorOut):
    """:class:`FactorOut` whose split prior (and inner layers) see a context: a vector, or an aligned image.

    Example:
        >>> from pyro_flows.transforms import checkerboard_mask
        >>> inner = ConditionalAffineCoupling((1, 4, 4), mask=checkerboard_mask((1, 4, 4)), context_shape=(1, 2, 2))
        >>> layer = ConditionalFactorOut((2, 4, 4), inner, context_shape=(1, 2, 2))
        >>> layer.call_and_ladj(torch.randn(3, 2, 4, 4), torch.randn(3, 1, 2, 2).flatten(-3))[0].shape
        torch.Size([3, 2, 4, 4])
    """
