"""Flows: a base distribution and a stack of layers as one ``nn.Module``.

``flow(context)`` returns a :class:`FlowDistribution`, a Pyro
``TransformedDistribution`` whose ``log_prob`` and ``rsample_and_log_prob``
take the fused path (each layer's log-det in the same pass as its output).
The factories :func:`NICE`, :func:`RealNVP`, :func:`MAF`, :func:`IAF` and
:func:`NSF` are configurations of the coupling and autoregressive structures.
"""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence, Union

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost

from . import transforms as T
from .transforms.base import check_shape


class StandardNormal(nn.Module):
    r"""The base :math:`\mathcal{N}(0, I)` as a module, so it follows ``.to(device, dtype)``.

    ``features`` is :math:`D` for vectors or an event shape such as ``(C, H, W)``;
    ``forward(batch_shape)`` returns the distribution with that batch shape.
    """

    def __init__(self, features: Union[int, Sequence[int]]) -> None:
        super().__init__()
        shape = (features,) if isinstance(features, int) else tuple(features)
        self.register_buffer("loc", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    def forward(self, batch_shape: tuple = ()) -> Distribution:
        return dist.Normal(self.loc, self.scale).to_event(self.loc.dim()).expand(batch_shape)


def _fused(t: Transform) -> bool:
    return isinstance(t, (T.FlowTransform, T.ConditionedTransform))


class FlowDistribution(dist.TransformedDistribution):
    r"""A Pyro ``TransformedDistribution`` with a fused fast path.

    :math:`\log p(y) = \log p_0(f^{-1}(y)) + \log|\det J_{f^{-1}}(y)|`, with
    every layer returning its output and log-det together. Layers from
    ``pyro.distributions.transforms`` mix in freely (they take the generic path).
    """

    def _check_value(self, value: Tensor) -> None:
        check_shape("FlowDistribution.log_prob", value, self.event_shape, "value")
        batch = value.shape[: value.dim() - len(self.event_shape)]
        try:
            torch.broadcast_shapes(batch, self.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"log_prob: value of batch shape {tuple(batch)} does not broadcast with the "
                f"distribution's batch shape {tuple(self.batch_shape)}"
            ) from None
        if value.dtype != self.base_dist.mean.dtype:
            raise ValueError(f"log_prob: value has dtype {value.dtype}, the flow has {self.base_dist.mean.dtype}")
        if not bool(torch.isfinite(value).all()):
            rows = torch.nonzero(~torch.isfinite(value).reshape(-1, self.event_shape.numel()).all(-1)).flatten()
            raise ValueError(f"log_prob: value has NaN or inf entries (at flattened batch rows {rows[:10].tolist()})")

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._check_value(value)
        event_dim = len(self.event_shape)
        log_prob = 0.0
        y = value
        for t in reversed(self.transforms):
            if _fused(t):
                x, ladj = t.inverse_and_ladj(y)
            else:
                x = t.inv(y)
                ladj = -t.log_abs_det_jacobian(x, y)
            log_prob = log_prob + _sum_rightmost(ladj, event_dim - t.codomain.event_dim)
            y = x
        return log_prob + _sum_rightmost(self.base_dist.log_prob(y), event_dim - len(self.base_dist.event_shape))

    def _base_rsample(self, sample_shape: tuple, temperature: float) -> Tensor:
        z = self.base_dist.rsample(sample_shape)
        if temperature == 1.0:
            return z
        if not temperature > 0:
            raise ValueError(f"sample: temperature must be positive, got {temperature}")
        base = self.base_dist
        while isinstance(base, (dist.Independent, torch.distributions.Independent, dist.ExpandedDistribution)):
            base = base.base_dist
        if not isinstance(base, (torch.distributions.Normal, torch.distributions.MultivariateNormal)):
            raise ValueError(f"sample: temperature needs a Gaussian base distribution, got {type(base).__name__}")
        loc = self.base_dist.mean
        return loc + temperature * (z - loc)

    def rsample(self, sample_shape: tuple = (), temperature: float = 1.0) -> Tensor:
        r"""A reparameterised sample; ``temperature`` :math:`T` scales the Gaussian base around its mean.

        :math:`T < 1` draws from the base :math:`\mathcal{N}(\mu, T^2 \Sigma)`: samples
        of higher density and less diversity (Kingma & Dhariwal 2018, Glow).
        """
        return self.from_base(self._base_rsample(sample_shape, temperature))

    def sample(self, sample_shape: tuple = (), temperature: float = 1.0) -> Tensor:
        """A sample without gradients (see :meth:`rsample` for ``temperature``)."""
        with torch.no_grad():
            return self.rsample(sample_shape, temperature)

    def to_base(self, value: Tensor) -> Tensor:
        """The base-space point :math:`z = f^{-1}(y)` of ``value`` (e.g. to interpolate in the latent space)."""
        check_shape("FlowDistribution.to_base", value, self.event_shape, "value")
        for t in reversed(self.transforms):
            value = t.inv(value)
        return value

    def from_base(self, z: Tensor) -> Tensor:
        """The data-space point :math:`y = f(z)` of a base-space point ``z`` (the inverse of :meth:`to_base`)."""
        check_shape("FlowDistribution.from_base", z, self.base_dist.event_shape, "base point")
        for t in self.transforms:
            z = t(z)
        return z

    def rsample_and_log_prob(self, sample_shape: tuple = ()) -> tuple[Tensor, Tensor]:
        """A reparameterised sample and its log-density in one forward pass."""
        x = self.base_dist.rsample(sample_shape)
        event_dim = len(self.event_shape)
        log_prob = _sum_rightmost(self.base_dist.log_prob(x), event_dim - len(self.base_dist.event_shape))
        for t in self.transforms:
            if _fused(t):
                y, ladj = t.call_and_ladj(x)
            else:
                y = t(x)
                ladj = t.log_abs_det_jacobian(x, y)
            log_prob = log_prob - _sum_rightmost(ladj, event_dim - t.domain.event_dim)
            x = y
        return x, log_prob

    def sample_and_log_prob(self, sample_shape: tuple = ()) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.rsample_and_log_prob(sample_shape)


class Flow(nn.Module):
    r"""A normalizing flow: base distribution :math:`p_0` and layers :math:`f_1, \dots, f_K`.

    .. math:: y = f_K \circ \dots \circ f_1(z),\ z \sim p_0, \qquad
              \log p(y \mid c) = \log p_0(z) - \sum_k \log|\det J_{f_k}|.

    Calling the module returns the distribution: ``flow()`` for an
    unconditional flow, ``flow(context)`` for a conditional one, with one
    distribution per context row (batch shape ``context.shape[:-1]``).
    Every parameter and buffer is registered, so ``.to(device, dtype)``,
    ``state_dict`` and ``pyro.module`` work as for any module.

    Args:
        base: the base distribution, an ``nn.Module`` called with the batch
            shape (e.g. :class:`StandardNormal`), or a fixed ``Distribution``.
        transforms: base→data layers: this library's, Pyro's or torch's.
        context_features: size of the context the layers see (0 for unconditional flows).
        embedding: optional module applied to the context first (e.g. a
            :class:`~.nn.ClassEmbedding` of class labels, or a network summarising
            observations); its output has ``context_features`` features.

    Example:
        >>> flow = Flow(StandardNormal(2), [T.AffineCoupling(2), T.Permute(2)])
        >>> flow().log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        base: Union[nn.Module, Distribution],
        transforms: Sequence[Transform],
        context_features: int = 0,
        embedding: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if embedding is not None and not context_features:
            raise ValueError("Flow: an embedding needs context_features > 0 (the size of its output)")
        self.embedding = embedding
        self.base = base
        self.transforms = list(transforms)
        self.layers = nn.ModuleList(t for t in self.transforms if isinstance(t, nn.Module))
        self.context_features = int(context_features)
        if not self.context_features and any(isinstance(t, T.Conditional) for t in self.transforms):
            raise ValueError("Flow: a layer is conditional but context_features is 0")

    def forward(self, context: Optional[Tensor] = None) -> FlowDistribution:
        return FlowDistribution(*self.base_and_transforms(context))

    def base_and_transforms(self, context: Optional[Tensor] = None) -> tuple[Distribution, list[Transform]]:
        """The base distribution (batch shape that of the context) and the layers conditioned on ``context``:
        what ``forward`` passes to :class:`FlowDistribution`, for a caller that adds layers of its own."""
        name = type(self).__name__
        if self.context_features == 0:
            if context is not None:
                raise ValueError(f"{name} is unconditional: call it with no context")
            batch_shape = torch.Size()
            transforms = self.transforms
        else:
            if context is None:
                raise ValueError(
                    f"{name} is conditional: call it with a context of shape (..., {self.context_features})"
                )
            if self.embedding is None:
                check_shape(name, context, (self.context_features,), "context")
            elif not isinstance(context, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor context, got {type(context).__name__}")
            if not bool(torch.isfinite(context).all()):
                raise ValueError(f"{name}: the context has NaN or inf entries")
            if self.embedding is not None:
                context = self.embedding(context)
                check_shape(name, context, (self.context_features,), "embedded context")
            batch_shape = context.shape[:-1]
            transforms = [t.condition(context) if isinstance(t, T.Conditional) else t for t in self.transforms]
        base = self.base(batch_shape) if isinstance(self.base, nn.Module) else self.base.expand(batch_shape)
        return base, transforms


MIXING = ("alternate", "random", "lu")


def _mixing_layer(features: int, mixing: str) -> list[Transform]:
    if mixing == "random":
        return [T.Permute(features, "random")]
    if mixing == "lu":
        return [T.LULinear(features)]
    return []


def _stack(
    features: int,
    context: int,
    layer,
    conditional_layer,
    transforms: int,
    hidden: Sequence[int],
    mixing: str = "alternate",
    **kwargs,
) -> Flow:
    """Build ``transforms`` layers (conditional twins if ``context``); ``layer`` gets the layer index.

    Masks or orders alternate between layers; ``mixing="random"`` adds a random
    permutation between layers and ``mixing="lu"`` an :class:`~.transforms.LULinear`.
    """
    if features < 1 or transforms < 1:
        raise ValueError(f"a flow needs features >= 1 and transforms >= 1, got {features}, {transforms}")
    if mixing not in MIXING:
        raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
    make = conditional_layer if context else layer
    extra = {"context_features": context} if context else {}
    layers: list[Transform] = []
    for i in range(transforms):
        if i:
            layers += _mixing_layer(features, mixing)
        layers.append(make(i, hidden=tuple(hidden), **extra, **kwargs))
    return Flow(StandardNormal(features), layers, context)


def _alternating_mask(features: int, i: int) -> Tensor:
    mask = torch.arange(features) >= features // 2
    return mask if i % 2 == 0 or features == 1 else ~mask


def _alternating_order(features: int, i: int) -> Tensor:
    order = torch.arange(features)
    return order if i % 2 == 0 else order.flip(0)


def _coupling_flow(features, context, transforms, hidden, cls, ccls, **kwargs) -> Flow:
    def build(cls):
        return lambda i, **kw: cls(features, mask=_alternating_mask(features, i), **kw)

    return _stack(features, context, build(cls), build(ccls), transforms, hidden, **kwargs)


def _autoregressive_flow(features, context, transforms, hidden, cls, ccls, invert, **kwargs) -> Flow:
    def build(cls):
        def make(i, **kw):
            layer = cls(features, order=_alternating_order(features, i), **kw)
            return layer.inv if invert else layer

        return make

    return _stack(features, context, build(cls), build(ccls), transforms, hidden, **kwargs)


def NICE(features: int, context: int = 0, transforms: int = 4, hidden: Sequence[int] = (64, 64), **kwargs) -> Flow:
    r"""NICE (Dinh et al. 2015): additive couplings with alternating masks, then a diagonal scaling.

    The couplings are volume preserving; the scaling next to the base (an
    :class:`~.transforms.ActNorm`, initialised from the first batch) is what
    lets the flow match the data's scale, as NICE's final scaling layer does.

    Example: ``NICE(features=2)().log_prob(torch.randn(7, 2))``.
    """
    flow = _coupling_flow(
        features, context, transforms, hidden, T.AdditiveCoupling, T.ConditionalAdditiveCoupling, **kwargs
    )
    return Flow(flow.base, [T.ActNorm(features), *flow.transforms], context)


def RealNVP(
    features: Optional[int] = None,
    context: int = 0,
    transforms: int = 4,
    hidden: Sequence[int] = (64, 64),
    *,
    shape: Optional[Sequence[int]] = None,
    **kwargs,
) -> nn.Module:
    r"""RealNVP (Dinh et al. 2017): affine couplings with alternating masks.

    Vectors: ``RealNVP(features, context, transforms, hidden)``, couplings with alternating halves.

    Images: ``RealNVP(shape=(C, H, W), levels=2, steps=3, hidden=(64, 64), classes=None,
    context=0, pixel_levels=256, dequantization="uniform", alpha=0.05)``, the paper's
    multi-scale model: data→base each level but the last applies ``steps`` checkerboard
    couplings, squeezes, ``steps`` channel-wise couplings and factors out half the channels
    (standard normal, no learned prior); the last level applies ``steps + 1`` checkerboard
    couplings. ActNorm precedes every coupling (in place of the paper's batch norm).
    ``classes``, ``context``, ``pixel_levels``, ``dequantization``, ``alpha`` and
    ``embedding_features`` are as in :func:`Glow` (integer pixels are dequantised, etc.).

    Example: ``RealNVP(features=2, context=3)(torch.randn(3)).sample((10,))``;
    ``RealNVP(shape=(1, 8, 8), pixel_levels=17)().sample((4,))``.
    """
    if shape is not None:
        if features is not None:
            raise ValueError("RealNVP: give features (vectors) or shape= (images), not both")
        return _image_realnvp(shape, context=context, hidden=hidden, **kwargs)
    if features is None:
        raise ValueError("RealNVP: give features (vectors) or shape= (images)")
    return _coupling_flow(
        features, context, transforms, hidden, T.AffineCoupling, T.ConditionalAffineCoupling, **kwargs
    )


def MAF(features: int, context: int = 0, transforms: int = 5, hidden: Sequence[int] = (64, 64), **kwargs) -> Flow:
    r"""Masked autoregressive flow (Papamakarios et al. 2017): density evaluation in one pass per layer.

    Each layer is ``AffineAutoregressive(...).inv``, orders alternate between layers;
    sampling inverts each layer sequentially (exactly).
    """
    return _autoregressive_flow(
        features, context, transforms, hidden, T.AffineAutoregressive, T.ConditionalAffineAutoregressive, True, **kwargs
    )


def IAF(features: int, context: int = 0, transforms: int = 5, hidden: Sequence[int] = (64, 64), **kwargs) -> Flow:
    r"""Inverse autoregressive flow (Kingma et al. 2016): sampling in one pass per layer.

    Each layer is ``AffineAutoregressive(...)``; density evaluation of new points
    inverts it sequentially, while ``rsample_and_log_prob`` (VI) never does.
    """
    return _autoregressive_flow(
        features,
        context,
        transforms,
        hidden,
        T.AffineAutoregressive,
        T.ConditionalAffineAutoregressive,
        False,
        **kwargs,
    )


def NSF(
    features: int,
    context: int = 0,
    transforms: int = 5,
    hidden: Sequence[int] = (64, 64),
    bins: int = 8,
    bound: float = 5.0,
    autoregressive: bool = True,
    **kwargs,
) -> Flow:
    r"""Neural spline flow (Durkan et al. 2019): rational-quadratic splines with ``bins`` bins on ``[-bound, bound]``.

    ``autoregressive=True`` (default) stacks ``SplineAutoregressive(...).inv``
    (one-pass densities, like MAF); ``False`` stacks spline couplings with
    alternating masks (one-pass in both directions).

    Example: ``NSF(features=5, context=3)(torch.randn(3)).rsample((100,))``.
    """
    if autoregressive:
        return _autoregressive_flow(
            features,
            context,
            transforms,
            hidden,
            T.SplineAutoregressive,
            T.ConditionalSplineAutoregressive,
            True,
            bins=bins,
            bound=bound,
            **kwargs,
        )
    return _coupling_flow(
        features,
        context,
        transforms,
        hidden,
        T.SplineCoupling,
        T.ConditionalSplineCoupling,
        bins=bins,
        bound=bound,
        **kwargs,
    )


def CNF(features: int, context: int = 0, hidden: Sequence[int] = (64, 64), trace: str = "exact", **kwargs) -> Flow:
    r"""A continuous normalizing flow (Chen et al. 2018; FFJORD, Grathwohl et al. 2019): one ODE layer.

    :math:`\frac{dz}{dt} = f(z, t[, c])` from the base :math:`\mathcal{N}(0, I_D)` at :math:`t_0`
    to the data at :math:`t_1`, with a :class:`~.transforms.ContinuousFlow` (conditional twin if
    ``context``) whose :class:`~.nn.VectorField` has ``hidden`` widths. Train it by maximum
    likelihood (``pf.fit(flow, X)``, optionally ``objective=pf.CNFRegularizedNLL(...)``) or by
    flow matching (``objective=pf.FlowMatching()``); likelihoods come from the ODE either way.
    ``kwargs`` go to the layer (``solver``, ``atol``, ``rtol``, ``t0``, ``t1``, ``options``,
    ``adjoint``, ``probe``, ``activation``, ``vector_field``).

    Example: ``CNF(features=2, trace="hutchinson")().log_prob(torch.randn(7, 2))``.
    """
    if features < 1:
        raise ValueError(f"CNF: features must be >= 1, got {features}")
    cls = T.ConditionalContinuousFlow if context else T.ContinuousFlow
    extra = {"context_features": context} if context else {}
    layer = cls(features, hidden=tuple(hidden), trace=trace, **extra, **kwargs)
    return Flow(StandardNormal(features), [layer], context)


def FFJORD(
    features: int, context: int = 0, hidden: Sequence[int] = (64, 64), trace: str = "hutchinson", **kwargs
) -> Flow:
    """:func:`CNF` with Hutchinson's trace estimator by default, as in FFJORD (Grathwohl et al. 2019)."""
    return CNF(features, context, hidden, trace, **kwargs)


# -- image flows ---------------------------------------------------------------------------------------------------
def _image_shape(shape: Sequence[int], levels: int, squeezes: int) -> torch.Size:
    shape = torch.Size(shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"an image flow needs shape (C, H, W), got {tuple(shape)}")
    if levels < 1:
        raise ValueError(f"an image flow needs levels >= 1, got {levels}")
    if shape[1] % 2**squeezes or shape[2] % 2**squeezes:
        raise ValueError(
            f"{levels} levels squeeze the image {squeezes} times: H and W must be divisible by {2**squeezes}, "
            f"got shape {tuple(shape)}"
        )
    return shape


def _check_image_sizes(name: str, steps: int, hidden: Sequence[int]) -> None:
    """ValueErrors naming the problem for a flow without steps or a conditioner without channels."""
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ValueError(f"{name}: steps must be an integer >= 1, got {steps!r}")
    if not hidden or any(isinstance(h, bool) or not isinstance(h, Integral) or h < 1 for h in hidden):
        raise ValueError(f"{name}: the conditioners' hidden channels must be integers >= 1, got {tuple(hidden)!r}")


def _conditional(cls, conditional_cls, context: int):
    """The class and the keyword arguments of a layer that sees the context when there is one."""
    return (conditional_cls, {"context_features": context}) if context else (cls, {})


def _multiscale(shape: torch.Size, levels: int, context: int, before, at_scale, final, split_prior: bool, hidden):
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


def _steps(steps: int, hidden: Sequence[int], context: int, mask, conv: bool):
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


def _image_model(
    shape: torch.Size,
    level_chain,
    context: int,
    classes: Optional[int],
    embedding_features: int,
    pixel_levels: Optional[int],
    dequantization: str,
    alpha: float,
) -> nn.Module:
    """The flow around a multi-scale chain: base, logit, context embedding and dequantisation."""
    from .dequantization import Dequantized, VariationalDequantizer
    from .nn import ClassEmbedding

    if classes is not None and context:
        raise ValueError("an image flow is conditioned on class labels (classes=) or a context vector (context=)")
    if dequantization not in ("uniform", "variational"):
        raise ValueError(f"dequantization must be 'uniform' or 'variational', got {dequantization!r}")
    features = embedding_features if classes is not None else context
    embedding = ClassEmbedding(classes, embedding_features) if classes is not None else None
    transforms = [level_chain(features)]
    if pixel_levels is None:
        return Flow(StandardNormal(shape), transforms, features, embedding)
    flow = Flow(StandardNormal(shape), [*transforms, T.Logit(shape, alpha)], features, embedding)
    dequantizer = None
    if dequantization == "variational":
        d = shape.numel()
        layers = [
            T.ConditionalAffineCoupling(d, mask=_alternating_mask(d, i), hidden=(64, 64), context_features=d)
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
    embedding_features: int = 16,
) -> nn.Module:
    r"""Glow (Kingma & Dhariwal 2018): a multi-scale flow of ActNorm, invertible 1×1 convolutions and affine couplings.

    Data→base, each of the ``levels`` levels squeezes the image to
    ``(4C, H/2, W/2)``, applies ``steps`` steps of
    :class:`~.transforms.ActNorm` → :class:`~.transforms.InvertibleConv1x1` →
    :class:`~.transforms.AffineCoupling` (channel mask, CNN with
    ``hidden_channels``), and, except at the last level, factors out half the
    channels with a learned Gaussian conditioned on the other half
    (:class:`~.transforms.FactorOut`); the other half goes on to the next level.

    Integer pixels ``0 .. pixel_levels - 1`` (e.g. 256; 17 for scikit-learn's digits) are modelled by
    :class:`~.dequantization.Dequantized` (``"uniform"`` or ``"variational"`` dequantisation) around a
    flow on :math:`[0, 1]` that ends with a :class:`~.transforms.Logit`; its ``log_prob`` is then the
    discrete data's (a bound, in nats) and ``pf.bits_per_dim(model, images)`` their bits per dimension.
    ``pixel_levels=None`` models continuous images with the flow alone.

    Conditioning: ``classes=K`` embeds integer labels (a :class:`~.nn.ClassEmbedding` of
    ``embedding_features``) as the context of every coupling and split prior; ``context=F`` takes
    any context vector of ``F`` features instead.

    Shapes: images ``(..., C, H, W)``; H and W divisible by ``2**levels``; labels ``(...)``.

    Example:
        >>> model = Glow(shape=(1, 8, 8), levels=2, steps=4, hidden_channels=64, classes=10, pixel_levels=17)
        >>> model(torch.tensor([3, 7])).sample(temperature=0.7).shape
        torch.Size([2, 1, 8, 8])
    """
    shape = _image_shape(shape, levels, levels)
    hidden = (hidden_channels, hidden_channels)
    _check_image_sizes("Glow", steps, hidden)

    def level_chain(features: int) -> T.Chain:
        at_scale = _steps(steps, hidden, features, _channels, conv=True)
        return _multiscale(shape, levels, features, _no_layers, at_scale, _squeezed(at_scale), split_prior, hidden)

    return _image_model(shape, level_chain, context, classes, embedding_features, pixel_levels, dequantization, alpha)


def _image_realnvp(
    shape: Sequence[int],
    levels: int = 2,
    steps: int = 3,
    hidden: Sequence[int] = (64, 64),
    classes: Optional[int] = None,
    context: int = 0,
    pixel_levels: Optional[int] = 256,
    dequantization: str = "uniform",
    alpha: float = 0.05,
    embedding_features: int = 16,
) -> nn.Module:
    shape = _image_shape(shape, levels, levels - 1)
    _check_image_sizes("RealNVP", steps, hidden)

    def level_chain(features: int) -> T.Chain:
        checkerboard = _steps(steps, hidden, features, _checkerboard, conv=False)
        channelwise = _steps(steps, hidden, features, _channels, conv=False)
        final = _steps(steps + 1, hidden, features, _checkerboard, conv=False)
        return _multiscale(shape, levels, features, checkerboard, channelwise, final, False, hidden)

    return _image_model(shape, level_chain, context, classes, embedding_features, pixel_levels, dequantization, alpha)
