"""The transform contract shared by every layer of the library: see :class:`FlowTransform`."""

from __future__ import annotations

from typing import Optional, cast

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints

from ..utils import check_device_dtype, reference_tensor
from . import cache


def check_shape(name: str, tensor: Tensor, event_shape: tuple, what: str) -> None:
    """Raise a ValueError naming the problem if ``tensor`` does not end in ``event_shape``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor for the {what}, got {type(tensor).__name__}")
    n = len(event_shape)
    if tensor.dim() < n or tuple(tensor.shape[tensor.dim() - n :]) != tuple(event_shape):
        raise ValueError(
            f"{name}: the {what} must have shape (..., {', '.join(map(str, event_shape))}), got {tuple(tensor.shape)}"
        )


def broadcast_context(x: Tensor, context: Optional[Tensor], event_dim: int) -> tuple[Tensor, Optional[Tensor]]:
    """``x`` and ``context`` expanded to their common batch shape (all dims but the last ``event_dim`` of ``x``)."""
    if context is None:
        return x, None
    batch = torch.broadcast_shapes(x.shape[: x.dim() - event_dim], context.shape[:-1])
    return x.expand(batch + x.shape[x.dim() - event_dim :]), context.expand(batch + context.shape[-1:])


_REAL_EVENTS: dict[int, constraints.Constraint] = {}


def _real_events(event_dim: int) -> constraints.Constraint:
    """One object per ``event_dim``: every distribution asks every layer (a dict, which torch.compile traces)."""
    if event_dim not in _REAL_EVENTS:
        _REAL_EVENTS[event_dim] = constraints.independent(constraints.real, event_dim)
    return _REAL_EVENTS[event_dim]


class FlowTransform(TransformModule):
    r"""Base class of every layer: a bijection :math:`f` from base space to data space with a fused log-det.

    A subclass implements both directions, each returning its output and the log-absolute-determinant
    of its own Jacobian in one pass,

    .. math:: \texttt{\_forward}(x, c) = \big(f(x),\ \log|\det J_f(x)|\big), \qquad
              \texttt{\_backward}(y, c) = \big(f^{-1}(y),\ -\log|\det J_f(f^{-1}(y))|\big),

    with ``x`` of shape ``batch + event_shape``, ``y`` of ``batch + codomain_shape``, the context
    :math:`c` ``(..., context_features)`` (``None`` for an unconditional layer) broadcasting with the
    batch, and log-dets of the broadcast batch shape. Callers use the checked directions
    :meth:`call_and_ladj` and :meth:`inverse_and_ladj`: they validate shapes, the input's device and dtype
    (those of the layer's parameters), the context and its dtype/device, then call the subclass once and store
    nothing. :class:`~pyro_flows.FlowDistribution`
    uses only these.

    Pyro's generic entry points ``t(x)``, ``t.inv(y)`` and ``t.log_abs_det_jacobian(x, y)`` (also through
    ``t.condition(c)``), which ``pyro.distributions.TransformedDistribution`` calls, keep one
    ``(input, output, log-det)`` entry so that the log-det of a pair, or the inverse of a sample, costs
    nothing. It is served only for the same tensor objects and context, and only while
    :func:`~.cache.state_key` is unchanged, never a value from before an optimizer step (pyro #2564). After
    writes through ``.data`` call :meth:`clear_cache`.

    Args:
        event_shape: one input event (``(D,)`` for vectors, ``(C, H, W)`` for images).
        context_features: size of the context (0 for unconditional layers).
        codomain_shape: one output event, where it differs (:class:`~.multiscale.Squeeze`).

    Example:
        >>> layer = T.AffineAutoregressive(3)
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 3))
        >>> y.shape, ladj.shape
        (torch.Size([10, 3]), torch.Size([10]))
        >>> x, ladj_inv = layer.inverse_and_ladj(y)  # exact (here sequential) inverse
        >>> torch.allclose(ladj_inv, -ladj)
        True
    """

    bijective = True

    def __init__(self, event_shape: tuple, context_features: int = 0, codomain_shape: Optional[tuple] = None) -> None:
        super().__init__(cache_size=0)  # Pyro's entry points use the entry below, torch's cache never
        if isinstance(self, Conditional) != (context_features > 0):
            raise ValueError(
                f"{type(self).__name__}: context_features={context_features}; a conditional layer "
                "(Conditional...) needs context_features > 0 and an unconditional one takes none"
            )
        self.event_shape = torch.Size(event_shape)
        self.codomain_shape = self.event_shape if codomain_shape is None else torch.Size(codomain_shape)
        if len(self.codomain_shape) != len(self.event_shape) or self.codomain_shape.numel() != self.event_shape.numel():
            raise ValueError(
                f"{type(self).__name__}: input event shape {tuple(self.event_shape)} and output event shape "
                f"{tuple(self.codomain_shape)} must have as many dims and elements"
            )
        self.context_features = int(context_features)
        self._entry: Optional[cache.Entry] = None

    @property
    def domain(self):
        return _real_events(len(self.event_shape))

    @property
    def sign(self) -> int:
        r"""The sign of :math:`\det J_f` over the whole event (torch defines ``sign`` for univariate transforms;
        a layer's is that of its event Jacobian, so that signs multiply along a chain). By default the product of
        the signs of the layers inside it (:class:`~.multiscale.Chain`, :class:`Inverse`, ...), +1 for a layer
        with none: right for every layer whose Jacobian is triangular with a positive diagonal (couplings and
        autoregressive layers with monotone maps, ActNorm, BatchNorm, Logit, ...) or is the flow map of an ODE. A
        layer whose determinant can be negative (permutations, learned linear maps) computes its own."""
        sign = 1
        for layer in _inner_layers(self):
            sign *= layer.sign
        return sign

    codomain = domain

    # -- the two directions: implemented by a subclass, called checked -----------------------------------------
    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def call_and_ladj(self, x: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(f(x), log|det J_f(x)|)`` in one pass."""
        self._check(x, "input", context, self.event_shape)
        return self._forward(x, context)

    def inverse_and_ladj(self, y: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(f^{-1}(y), log|det J_{f^{-1}}(y)|)`` in one pass."""
        self._check(y, "input of the inverse", context, self.codomain_shape)
        return self._backward(y, context)

    def _check(self, value: Tensor, what: str, context: Optional[Tensor], event_shape: torch.Size) -> None:
        name = type(self).__name__
        check_shape(name, value, event_shape, what)
        reference = None if torch.compiler.is_compiling() else reference_tensor(self)
        if reference is not None:
            check_device_dtype(name, value, reference, what)
        if not self.context_features:
            if context is not None:
                raise ValueError(f"{name} is unconditional: it takes no context")
            return
        if context is None:
            raise ValueError(f"{name} is conditional: it needs a context of shape (..., {self.context_features})")
        check_shape(name, context, (self.context_features,), "context")
        if context.dtype != value.dtype or context.device != value.device:
            raise ValueError(
                f"{name}: context has dtype {context.dtype} on {context.device} but the "
                f"{what} has dtype {value.dtype} on {value.device}; pass them with one dtype on one device "
                f"(context.to({str(value.device)!r}, {value.dtype}))"
            )

    # -- Pyro's generic entry points, through the one entry ---------------------------------------------------
    def _call(self, x: Tensor) -> Tensor:
        return self.cached(x, self._context_or_raise(), forward=True)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.cached(y, self._context_or_raise(), forward=False)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.ladj(x, y, self._context_or_raise())

    def _context_or_raise(self) -> Optional[Tensor]:
        return None

    def cached(self, value: Tensor, context: Optional[Tensor], forward: bool) -> tuple[Tensor, Tensor]:
        """One direction's ``(output, log-det)``, read from the entry when ``value`` is the other direction's output."""
        hit = cache.serve(self._entry, self, value, context, forward, len(self.event_shape))
        if hit is not None:
            return hit
        out, ladj = self.call_and_ladj(value, context) if forward else self.inverse_and_ladj(value, context)
        self._entry = cache.store(self, value, out, ladj, context, forward)
        return out, ladj

    def ladj(self, x: Tensor, y: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``log|det J_f(x)|`` for ``y = f(x)``: free when Pyro's entry points just computed the pair."""
        hit = self._stored_ladj(x, y, context)
        return self.call_and_ladj(x, context)[1] if hit is None else hit

    def _stored_ladj(self, x: Tensor, y: Tensor, context: Optional[Tensor]) -> Optional[Tensor]:
        return cache.serve_ladj(self._entry, self, x, y, context)

    def clear_cache(self) -> None:
        """Forget the entries of this layer and of the layers inside it (needed only after writes through ``.data``)."""
        for module in self.modules():
            if isinstance(module, FlowTransform):
                module._entry = None

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        return self  # Pyro's entry points are always cached, never stale

    @property
    def inv(self) -> FlowTransform:
        """The inverse layer, a module sharing this layer's parameters (and its entry)."""
        return (ConditionalInverse if self.context_features else Inverse)(self)

    def forward_shape(self, shape):
        return _replace_event(shape, self.event_shape, self.codomain_shape)

    def inverse_shape(self, shape):
        return _replace_event(shape, self.codomain_shape, self.event_shape)

    def __getstate__(self):
        return {**super().__getstate__(), "_entry": None}

    def extra_repr(self) -> str:
        context = f", context_features={self.context_features}" if self.context_features else ""
        codomain = f", codomain_shape={tuple(self.codomain_shape)}" if self.codomain_shape != self.event_shape else ""
        return f"event_shape={tuple(self.event_shape)}{codomain}{context}"


def _inner_layers(module: torch.nn.Module):
    """The outermost layers inside ``module`` (not those inside them)."""
    for child in module.children():
        if isinstance(child, FlowTransform):
            yield child
        else:
            yield from _inner_layers(child)


def _replace_event(shape, event_shape: torch.Size, new_event_shape: torch.Size) -> torch.Size:
    n = len(event_shape)
    if tuple(shape[len(shape) - n :]) != tuple(event_shape):
        raise ValueError(f"shape {tuple(shape)} does not end in the event shape {tuple(event_shape)}")
    return torch.Size(shape[: len(shape) - n]) + new_event_shape


class Conditional(ConditionalTransformModule):
    """Mixin of the conditional twins: ``layer.condition(context)`` is what Pyro's
    ``ConditionalTransformedDistribution`` applies; without a context the layer raises a ValueError."""

    inv = FlowTransform.inv  # type: ignore[assignment]  # a FlowTransform, not Pyro's generic inverse

    def condition(self, context: Tensor) -> ConditionedTransform:
        return ConditionedTransform(cast(FlowTransform, self), context)

    def _context_or_raise(self):
        raise ValueError(
            f"{type(self).__name__} is conditional: call .condition(context) (or use "
            "ConditionalTransformedDistribution) before applying it"
        )


class ConditionedTransform(Transform):
    """A conditional layer with its context fixed (not a module: the layer owns the parameters and the entry)."""

    bijective = True

    def __init__(self, layer: FlowTransform, context: Tensor) -> None:
        super().__init__(cache_size=0)
        check_shape(type(layer).__name__, context, (layer.context_features,), "context")
        self.layer, self.context = layer, context

    domain = property(lambda self: self.layer.domain)
    codomain = property(lambda self: self.layer.codomain)
    inv = property(lambda self: ConditionedTransform(self.layer.inv, self.context))
    sign = property(lambda self: self.layer.sign)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.call_and_ladj(x, self.context)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.inverse_and_ladj(y, self.context)

    def _call(self, x: Tensor) -> Tensor:
        return self.layer.cached(x, self.context, forward=True)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.layer.cached(y, self.context, forward=False)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.layer.ladj(x, y, self.context)

    def with_cache(self, cache_size: int = 1) -> ConditionedTransform:
        return self

    def forward_shape(self, shape):
        return self._broadcast(self.layer.forward_shape(shape))

    def inverse_shape(self, shape):
        return self._broadcast(self.layer.inverse_shape(shape))

    def _broadcast(self, shape):
        n = len(self.layer.event_shape)
        batch = torch.broadcast_shapes(torch.Size(shape[: len(shape) - n]), self.context.shape[:-1])
        return batch + torch.Size(shape[len(shape) - n :])


class Inverse(FlowTransform):
    r"""The inverse :math:`f^{-1}` of a layer :math:`f` (``layer.inv``), sharing its parameters and its entry.

    Use it to put a layer's cheap direction where it is needed: a MAF layer is
    ``AffineAutoregressive(D).inv``, whose density evaluation is the autoregressive layer's one-pass direction.
    """

    def __init__(self, layer: FlowTransform) -> None:
        super().__init__(layer.codomain_shape, layer.context_features, layer.event_shape)
        self.layer = layer

    domain = property(lambda self: self.layer.codomain)
    codomain = property(lambda self: self.layer.domain)
    inv = property(lambda self: self.layer)

    def _forward(self, x, context):  # checked already: the same shapes and context as the layer's inverse
        return self.layer._backward(x, context)

    def _backward(self, y, context):
        return self.layer._forward(y, context)

    def cached(self, value: Tensor, context: Optional[Tensor], forward: bool) -> tuple[Tensor, Tensor]:
        return self.layer.cached(value, context, not forward)

    def _stored_ladj(self, x: Tensor, y: Tensor, context: Optional[Tensor]) -> Optional[Tensor]:
        hit = self.layer._stored_ladj(y, x, context)
        return None if hit is None else -hit

    def extra_repr(self) -> str:
        return ""


class ConditionalInverse(Conditional, Inverse):
    """The inverse of a conditional layer (conditional itself)."""

    inv = Inverse.inv
