"""Flows: a base distribution and a stack of layers as one ``nn.Module``.

``flow(context)`` returns a :class:`FlowDistribution`, a Pyro
``TransformedDistribution`` whose ``log_prob`` and ``rsample_and_log_prob``
take the fused path (each layer's log-det in the same pass as its output).
The factories :func:`NICE`, :func:`RealNVP`, :func:`MAF`, :func:`IAF` and
:func:`NSF` are configurations of the coupling and autoregressive structures.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost

from . import transforms as T
from .transforms.base import check_shape


class StandardNormal(nn.Module):
    r"""The base :math:`\mathcal{N}(0, I_D)` as a module, so it follows ``.to(device, dtype)``.

    ``forward(batch_shape)`` returns the distribution with that batch shape.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))

    def forward(self, batch_shape: tuple = ()) -> Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1).expand(batch_shape)


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
        context_features: size of the context (0 for unconditional flows).

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
    ) -> None:
        super().__init__()
        self.base = base
        self.transforms = list(transforms)
        self.layers = nn.ModuleList(t for t in self.transforms if isinstance(t, nn.Module))
        self.context_features = int(context_features)
        if not self.context_features and any(isinstance(t, T.Conditional) for t in self.transforms):
            raise ValueError("Flow: a layer is conditional but context_features is 0")

    def forward(self, context: Optional[Tensor] = None) -> FlowDistribution:
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
            check_shape(name, context, (self.context_features,), "context")
            if not bool(torch.isfinite(context).all()):
                raise ValueError(f"{name}: the context has NaN or inf entries")
            batch_shape = context.shape[:-1]
            transforms = [t.condition(context) if isinstance(t, T.Conditional) else t for t in self.transforms]
        base = self.base(batch_shape) if isinstance(self.base, nn.Module) else self.base.expand(batch_shape)
        return FlowDistribution(base, transforms)


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


def RealNVP(features: int, context: int = 0, transforms: int = 4, hidden: Sequence[int] = (64, 64), **kwargs) -> Flow:
    r"""RealNVP (Dinh et al. 2017): affine couplings with alternating masks.

    Example: ``RealNVP(features=2, context=3)(torch.randn(3)).sample((10,))``.
    """
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
