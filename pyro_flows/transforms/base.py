"""The transform contract shared by every layer of the library.

Every layer maps base space to data space (Pyro's convention: a
:class:`~pyro.distributions.TransformedDistribution` pushes base samples
through ``_call``) and implements one fused method per direction that
returns the output *and* the log-absolute-determinant of the Jacobian of
that direction, so the log-det never costs a second pass:

* :meth:`FlowTransform.call_and_ladj` ``(x) -> (y, log|det dy/dx|)``
* :meth:`FlowTransform.inverse_and_ladj` ``(y) -> (x, log|det dx/dy|)``

Pyro's own entry points (``t(x)``, ``t.inv(y)``, ``t.log_abs_det_jacobian``)
read a one-slot cache filled by those methods. Unlike the cache of
:class:`torch.distributions.Transform`, it is keyed on the version counters
of the layer's parameters and buffers, so an optimizer step (or
``load_state_dict``) can never serve a stale value (pyro #2564).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Optional

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints
from torch.nn.modules import module as _module

# Bumped whenever any module (re)registers a parameter, buffer or submodule: a layer's list of watched
# tensors is rebuilt only then, not on every call (walking the module tree cost ~0.2 ms per layer call
# in nested flows such as Glow). Lookups still walk the tree (see FlowTransform._state_key).
_structure_version = 0


def _structure_changed(*args) -> None:
    global _structure_version
    _structure_version += 1


for _register in (
    _module.register_module_parameter_registration_hook,
    _module.register_module_buffer_registration_hook,
    _module.register_module_module_registration_hook,
):
    _register(_structure_changed)


@functools.cache
def _real_events(event_dim: int) -> constraints.Constraint:
    """``independent(real, event_dim)``, one shared object per ``event_dim`` (built for every layer of every
    distribution a flow returns otherwise)."""
    return constraints.independent(constraints.real, event_dim)


class _CacheEntry(NamedTuple):
    x: Tensor
    y: Tensor
    ladj: Tensor  # log|det dy/dx|
    context: Optional[Tensor]
    key: tuple
    forward: bool  # computed by call_and_ladj (True) or inverse_and_ladj (False)


def check_shape(name: str, tensor: Tensor, event_shape: tuple, what: str) -> None:
    """Raise a ValueError naming the problem if ``tensor`` does not end in ``event_shape``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor for the {what}, got {type(tensor).__name__}")
    n = len(event_shape)
    if tensor.dim() < n or tuple(tensor.shape[tensor.dim() - n :]) != tuple(event_shape):
        raise ValueError(
            f"{name}: the {what} must have shape (..., {', '.join(map(str, event_shape))}), got {tuple(tensor.shape)}"
        )


class FlowTransform(TransformModule):
    r"""Base class of every bijective layer of :mod:`pyro_flows`.

    Subclasses implement the two fused directions

    .. math:: (y, \log|\det J_f(x)|) = f(x), \qquad (x, \log|\det J_{f^{-1}}(y)|) = f^{-1}(y)

    as ``_forward(x, context) -> (y, ladj)`` and ``_backward(y, context) -> (x, ladj)``
    (``context`` is ``None`` for an unconditional layer). Shapes: ``x`` and ``y`` are ``batch + event_shape``;
    the log-det has the batch shape, which broadcasts with the context's.

    Args:
        event_shape: shape of one input event (``(D,)`` for vectors, ``(C, H, W)`` for images).
        context_features: size of the context vector (0 for unconditional layers).
        codomain_shape: shape of one output event, when it differs from the input's
            (:class:`~.multiscale.Squeeze`); it must have as many dims.
    """

    bijective = True
    sign = +1

    def __init__(self, event_shape: tuple, context_features: int = 0, codomain_shape: Optional[tuple] = None) -> None:
        super().__init__(cache_size=0)  # caching is done by our own versioned cache
        conditional = isinstance(self, Conditional)
        if conditional != (context_features > 0):
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
        self._flow_cache: Optional[_CacheEntry] = None

    # -- the contract ---------------------------------------------------------
    @property
    def domain(self):
        return _real_events(len(self.event_shape))

    codomain = domain

    def call_and_ladj(self, x: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(f(x), log|det df/dx|)`` in one pass (served from the cache when possible)."""
        hit = self._lookup(context, x=x)
        if hit is not None:
            return _broadcast_hit(hit.y, hit.x, hit.ladj, len(self.event_shape))
        self._check(x, "input", context)
        y, ladj = self._forward(x, context)
        self._store(x, y, ladj, context, forward=True)
        return y, ladj

    def inverse_and_ladj(self, y: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(f^{-1}(y), log|det df^{-1}/dy|)`` in one pass (served from the cache when possible)."""
        hit = self._lookup(context, y=y)
        if hit is not None:
            return _broadcast_hit(hit.x, hit.y, -hit.ladj, len(self.event_shape))
        self._check(y, "input of the inverse", context, self.codomain_shape)
        x, ladj = self._backward(y, context)
        self._store(x, y, -ladj, context, forward=False)
        return x, ladj

    def ladj(self, x: Tensor, y: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``log|det df/dx|`` at ``x`` (free when ``(x, y)`` was just computed)."""
        hit = self._lookup(context, x=x, y=y)
        if hit is not None:
            return hit.ladj
        return self.call_and_ladj(x, context)[1]

    # -- Pyro / torch.distributions entry points -------------------------------
    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x, self._context_or_raise())[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y, self._context_or_raise())[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.ladj(x, y, self._context_or_raise())

    def _context_or_raise(self) -> Optional[Tensor]:
        return None

    @property
    def inv(self) -> FlowTransform:
        """The inverse layer, itself a module sharing this layer's parameters."""
        return self._make_inverse()

    def _make_inverse(self) -> FlowTransform:
        return (ConditionalInverse if self.context_features else Inverse)(self)

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        return self  # always cached, never stale

    def clear_cache(self) -> None:
        """Forget the cached input/output pairs of this layer and the layers inside it.

        Only needed after writes through ``.data``, which PyTorch does not track.
        """
        for module in self.modules():
            if isinstance(module, FlowTransform):
                module._flow_cache = None

    def forward_shape(self, shape):
        return _replace_event(shape, self.event_shape, self.codomain_shape)

    def inverse_shape(self, shape):
        return _replace_event(shape, self.codomain_shape, self.event_shape)

    def __getstate__(self):
        state = super().__getstate__()
        state["_flow_cache"] = None
        state.pop("_watched", None)
        return state

    def extra_repr(self) -> str:
        context = f", context_features={self.context_features}" if self.context_features else ""
        codomain = f", codomain_shape={tuple(self.codomain_shape)}" if self.codomain_shape != self.event_shape else ""
        return f"event_shape={tuple(self.event_shape)}{codomain}{context}"

    # -- internals ------------------------------------------------------------
    def _check(self, value: Tensor, what: str, context: Optional[Tensor], event_shape: Optional[tuple] = None) -> None:
        name = type(self).__name__
        check_shape(name, value, self.event_shape if event_shape is None else event_shape, what)
        if self.context_features:
            if context is None:
                raise ValueError(f"{name} is conditional: it needs a context of shape (..., {self.context_features})")
            check_shape(name, context, (self.context_features,), "context")
            if context.dtype != value.dtype or context.device != value.device:
                raise ValueError(
                    f"{name}: context has dtype {context.dtype} on {context.device} but the "
                    f"{what} has dtype {value.dtype} on {value.device}"
                )
        elif context is not None:
            raise ValueError(f"{name} is unconditional: it takes no context")

    def _state_key(self, *tensors: Optional[Tensor], fresh: bool = False) -> tuple:
        """What a cached value depends on: mode, the parameter and buffer objects and every version counter.

        The objects themselves (compared by identity) catch parameters replaced
        by new tensors (``load_state_dict(assign=True)``), the storage pointers
        catch a rebound ``.data`` (``vector_to_parameters``), and the version
        counters catch in-place updates (optimizer steps, ``load_state_dict``,
        in-place edits of the input, output or context), and the mode key
        keeps values computed without autograd from being served with it on.
        Only writes through ``.data`` (``p.data.sub_(...)``), which PyTorch
        itself does not track, are invisible: call :meth:`clear_cache` after them.

        Storing uses the list of watched tensors kept since the last structural change
        (cheap); a lookup (``fresh=True``) walks the modules again, so tensors swapped in
        behind the registration hooks (``torch.func.functional_call``) give a miss.
        """
        state = tuple(itertools.chain(self.parameters(), self.buffers())) if fresh else self._watched_state()
        watched = itertools.chain(state, (t for t in tensors if t is not None))
        versions = tuple((t._version, t.data_ptr()) for t in watched)
        return (self.training, torch.is_grad_enabled()), state, versions

    def _watched_state(self) -> tuple:
        """This layer's parameters and buffers (its submodules' included), rebuilt only after a structural change."""
        cached = self.__dict__.get("_watched")
        if cached is None or cached[0] != _structure_version:
            cached = (_structure_version, tuple(itertools.chain(self.parameters(), self.buffers())))
            self.__dict__["_watched"] = cached
        return cached[1]

    @staticmethod
    def _same_key(a: tuple, b: tuple) -> bool:
        (mode_a, state_a, versions_a), (mode_b, state_b, versions_b) = a, b
        if mode_a != mode_b or versions_a != versions_b or len(state_a) != len(state_b):
            return False
        return all(u is v for u, v in zip(state_a, state_b, strict=True))

    def _lookup(self, context, x=None, y=None) -> Optional[_CacheEntry]:
        """The cached pair for ``x`` (forward), ``y`` (inverse) or both (log-det).

        A direction is served only from the *other* direction's output (the
        inverse of a sample, as Pyro's cache does): calling the same direction
        again on the same tensor recomputes, so a second loss on one batch
        never reuses a graph that ``backward()`` has already freed.
        """
        entry = self._flow_cache
        if entry is None or entry.context is not context:
            return None
        if (x is not None and entry.x is not x) or (y is not None and entry.y is not y):
            return None
        if y is None and entry.forward or x is None and not entry.forward:
            return None
        return entry if self._same_key(entry.key, self._state_key(entry.x, entry.y, context, fresh=True)) else None

    def _store(self, x: Tensor, y: Tensor, ladj: Tensor, context: Optional[Tensor], forward: bool) -> None:
        self._flow_cache = _CacheEntry(x, y, ladj, context, self._state_key(x, y, context), forward)


def _broadcast_hit(value: Tensor, other: Tensor, ladj: Tensor, event_dims: int) -> tuple[Tensor, Tensor]:
    """A cached pair may have been broadcast against a context: return the broadcast batch shape."""
    batch = torch.broadcast_shapes(value.shape[: value.dim() - event_dims], other.shape[: other.dim() - event_dims])
    shape = batch + value.shape[value.dim() - event_dims :]
    # the cached tensor itself when no broadcast is needed: the next layer's cache recognises it by identity
    value = value if value.shape == shape else value.expand(shape)
    return value, ladj if ladj.shape == batch else ladj.expand(batch)


def _replace_event(shape, event_shape: torch.Size, new_event_shape: torch.Size) -> torch.Size:
    n = len(event_shape)
    if tuple(shape[len(shape) - n :]) != tuple(event_shape):
        raise ValueError(f"shape {tuple(shape)} does not end in the event shape {tuple(event_shape)}")
    return torch.Size(shape[: len(shape) - n]) + new_event_shape


class Conditional(ConditionalTransformModule):
    """Mixin that turns a :class:`FlowTransform` into its conditional twin.

    ``layer.condition(context)`` returns a :class:`ConditionedTransform`, a
    plain Pyro transform that applies the layer with that context; this is
    what :class:`pyro.distributions.ConditionalTransformedDistribution` calls.
    Applying a conditional layer without a context raises a ValueError.
    """

    inv = FlowTransform.inv

    def condition(self, context: Tensor) -> ConditionedTransform:
        return ConditionedTransform(self, context)

    def _context_or_raise(self):
        raise ValueError(
            f"{type(self).__name__} is conditional: call .condition(context) (or use "
            "ConditionalTransformedDistribution) before applying it"
        )


class ConditionedTransform(Transform):
    """A conditional layer with its context fixed: ``layer.condition(context)``.

    Not a module (it owns no parameters); it shares the layer's versioned cache.
    """

    bijective = True
    sign = +1

    def __init__(self, layer: FlowTransform, context: Tensor) -> None:
        super().__init__(cache_size=0)
        check_shape(type(layer).__name__, context, (layer.context_features,), "context")
        self.layer = layer
        self.context = context

    @property
    def domain(self):
        return self.layer.domain

    @property
    def codomain(self):
        return self.layer.codomain

    @property
    def inv(self) -> ConditionedTransform:
        return ConditionedTransform(self.layer.inv, self.context)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.call_and_ladj(x, self.context)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.inverse_and_ladj(y, self.context)

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.layer.ladj(x, y, self.context)

    def with_cache(self, cache_size: int = 1) -> ConditionedTransform:
        return self

    def _broadcast(self, shape):
        n = len(self.layer.event_shape)
        batch = torch.broadcast_shapes(torch.Size(shape[: len(shape) - n]), self.context.shape[:-1])
        return batch + torch.Size(shape[len(shape) - n :])

    def forward_shape(self, shape):
        return self._broadcast(self.layer.forward_shape(shape))

    def inverse_shape(self, shape):
        return self._broadcast(self.layer.inverse_shape(shape))


class Inverse(FlowTransform):
    r"""The inverse :math:`f^{-1}` of a layer :math:`f`, sharing its parameters.

    ``layer.inv`` returns one. Use it to put the cheap direction of a layer
    where it is needed, e.g. a MAF is ``AffineAutoregressive(D).inv``: its
    density evaluation is the autoregressive layer's one-pass direction.
    """

    def __init__(self, layer: FlowTransform) -> None:
        super().__init__(layer.codomain_shape, layer.context_features, layer.event_shape)
        self.layer = layer

    @property
    def domain(self):
        return self.layer.codomain

    @property
    def codomain(self):
        return self.layer.domain

    def _forward(self, x, context):
        return self.layer.inverse_and_ladj(x, context)

    def _backward(self, y, context):
        return self.layer.call_and_ladj(y, context)

    def _make_inverse(self) -> FlowTransform:
        return self.layer

    def extra_repr(self) -> str:
        return ""


class ConditionalInverse(Conditional, Inverse):
    """The inverse of a conditional layer (conditional itself)."""


def broadcast_context(x: Tensor, context: Optional[Tensor], event_dim: int) -> tuple[Tensor, Optional[Tensor]]:
    """Broadcast the batch dims of ``x`` (all but the last ``event_dim``) with the context's.

    Returns ``x`` and ``context`` expanded to the common batch shape, so a
    conditioner can concatenate them.
    """
    if context is None:
        return x, None
    batch = torch.broadcast_shapes(x.shape[: x.dim() - event_dim], context.shape[:-1])
    return x.expand(batch + x.shape[x.dim() - event_dim :]), context.expand(batch + context.shape[-1:])
