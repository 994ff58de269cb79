"""The one cache entry behind Pyro's generic entry points of a layer, never stale (pyro #2564).

Pyro's ``TransformedDistribution`` calls a layer as ``t(x)``, ``t.inv(y)`` and ``t.log_abs_det_jacobian(x, y)``,
separately: without a memory, the log-det of a pair costs a second pass and the density of a sample its
inverse (sequential for an IAF layer). So each layer keeps the last ``(input, output, log-det)`` it computed
there, with the :func:`state_key` of the moment, and serves it only for the same tensor objects and
context while that key is unchanged: a value computed before an optimizer step is never served after it.
:class:`~pyro_flows.FlowDistribution` never comes here: it calls each layer's fused direction once.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn


def state_key(modules: Sequence[nn.Module], *tensors: Optional[Tensor]) -> Optional[tuple]:
    """What a value computed by ``modules`` from ``tensors`` depends on, or None where it cannot be told.

    The identity, version counter and storage of every parameter, buffer and tensor, every module's
    train/eval mode and the grad mode: an optimizer step, ``load_state_dict``, a parameter replaced
    (``assign=True``, by attribute, by ``torch.func.functional_call``), ``vector_to_parameters`` or an input
    edited in place all change it; writes through ``.data`` do not. The key holds the tensors themselves
    (its last element), so that their ids stay theirs while it is kept; compare keys with :func:`same_state`.
    Under ``torch.compile`` (:func:`pyro_flows.compile`) it is None: versions and storages are not traced, so
    nothing is stored and every value is computed.
    """
    if torch.compiler.is_compiling():
        return None
    state = itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules)
    watched = [t for t in itertools.chain(state, tensors) if t is not None]
    try:
        versions = tuple((id(t), t._version, t.data_ptr()) for t in watched)
    except RuntimeError:  # inference-mode and functorch tensors have no version counter or storage
        return None
    modes = tuple(sub.training for m in modules for sub in m.modules())
    return torch.is_grad_enabled(), modes, versions, watched


def same_state(stored: Optional[tuple], fresh: Optional[tuple]) -> bool:
    return stored is not None and fresh is not None and stored[:3] == fresh[:3]


class Entry(NamedTuple):
    value: Tensor  # the input of the direction computed
    out: Tensor
    ladj: Tensor  # the log-det of that direction
    context: Optional[Tensor]
    forward: bool
    key: tuple


def store(layer: nn.Module, value: Tensor, out: Tensor, ladj: Tensor, context, forward: bool) -> Optional[Entry]:
    key = state_key([layer], value, out, context)
    return None if key is None else Entry(value, out, ladj, context, forward, key)


def _fresh(entry: Entry, layer: nn.Module) -> bool:
    return same_state(entry.key, state_key([layer], entry.value, entry.out, entry.context))


def serve(entry: Optional[Entry], layer: nn.Module, value: Tensor, context, forward: bool, event_dims: int):
    """``(output, log-det)`` of one direction at ``value`` if ``value`` is the other direction's stored output
    (the inverse of a sample), else None. The same direction is never served: computing it again on the
    same tensor (a second loss on one batch) must not reuse a graph that ``backward()`` has freed."""
    e = entry
    if e is None or e.forward == forward or e.out is not value or e.context is not context or not _fresh(e, layer):
        return None
    batch = torch.broadcast_shapes(e.value.shape[: e.value.dim() - event_dims], value.shape[: value.dim() - event_dims])
    shape = batch + e.value.shape[e.value.dim() - event_dims :]  # a pair broadcast against a context
    # the stored tensor itself where possible: the previous layer's entry recognises it by identity
    out = e.value if e.value.shape == shape else e.value.expand(shape)
    return out, -(e.ladj if e.ladj.shape == batch else e.ladj.expand(batch))


def serve_ladj(entry: Optional[Entry], layer: nn.Module, x: Tensor, y: Tensor, context) -> Optional[Tensor]:
    """The stored forward log-det of the pair ``(x, y)`` (computed in either direction), else None."""
    e = entry
    if e is None or e.context is not context:
        return None
    inputs = (x, y) if e.forward else (y, x)
    if e.value is not inputs[0] or e.out is not inputs[1] or not _fresh(e, layer):
        return None
    return e.ladj if e.forward else -e.ladj
