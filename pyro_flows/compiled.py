"""An opt-in compiled path: a flow's ``log_prob``, sampling and training loss through ``torch.compile``.

The eager flow is never changed: :func:`compile_flow` returns a :class:`CompiledFlow` that shares the flow's
parameters and compiles, lazily on first use, the same fused code paths that ``flow(context).log_prob`` and
``flow(context).sample`` run. The vector presets (``MAF``, ``IAF``, ``NSF``, ``RealNVP``, ``NICE``) trace as
one graph each (``fullgraph=True`` works): no layer reads a tensor on the host on these paths.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from .flows import Flow
from .objectives import NegativeLogLikelihood
from .transforms.base import FlowTransform

Objective = Callable[[nn.Module, Tensor, Optional[Tensor]], Tensor]


class CompiledFlow:
    r"""A :class:`~pyro_flows.Flow` whose density, sampler and training loss run through ``torch.compile``.

    The same computations as the eager flow, compiled on their first call (which takes seconds; later calls
    with the same shapes, dtypes, grad mode and train/eval mode reuse the compiled code). Each compiled flow keeps
    its own graphs, with static shapes unless ``dynamic`` is passed (static graphs train ~4% faster on CPU): a new
    batch shape compiles once more, up to ``torch._dynamo.config.recompile_limit`` shapes per method (8 by default;
    past it calls run eager, or raise with ``fullgraph=True``); for many shapes pass ``dynamic=True`` or ``None``:

    .. math:: \log p(y \mid c) = \log p_0(f^{-1}(y)) + \log|\det J_{f^{-1}}(y)|, \qquad
              y = f(z),\ z \sim p_0, \qquad \mathcal{L} = \texttt{objective}(\text{flow}, x, c).

    Parameters are the flow's own: an optimizer over ``flow.parameters()`` trains both, and ``flow`` stays
    the eager model (save it, move it, call it as before). Random draws under the ``inductor`` backend
    follow ``torch.manual_seed`` but are not the eager path's draws. The compiled calls do not validate
    their arguments (a check of the values is a host read, which would split the graph): the eager flow
    does, and :func:`~pyro_flows.fit` checks its data itself. ``torch.compile`` turns ``torch.distributions``'
    argument validation off for the whole process when it is first called; this class turns it back to what
    it was, and off only for the duration of its own calls.

    Shapes: ``value`` ``(..., *event_shape)`` with the context ``(..., context_features)`` broadcasting; a
    sample has shape ``sample_shape + context batch + event_shape`` as :meth:`FlowDistribution.sample
    <pyro_flows.FlowDistribution.sample>`.

    Args:
        flow: the eager flow.
        objective: the training loss ``objective(model, x, context)`` that :meth:`loss` compiles (default
            :class:`~pyro_flows.NegativeLogLikelihood`).
        compile_options: keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``fullgraph``,
            ``dynamic``, ``options``).

    Example:
        >>> flow = pf.MAF(features=2, transforms=2, hidden=(8, 8))
        >>> compiled = pf.compile_flow(flow, backend="eager", fullgraph=True)  # default backend: inductor
        >>> x = torch.randn(16, 2)
        >>> torch.allclose(compiled.log_prob(x), flow().log_prob(x))
        True
        >>> compiled.sample((4,)).shape
        torch.Size([4, 2])
        >>> history = pf.fit(flow, torch.randn(64, 2), objective=compiled.loss, max_epochs=1, progress=False)

    References:
        - Ansel et al. (2024), *PyTorch 2: faster machine learning through dynamic Python bytecode transformation
          and graph compilation*, ASPLOS '24, doi:10.1145/3620665.3640366.
    """

    def __init__(self, flow: Flow, objective: Optional[Objective] = None, **compile_options: Any) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"compile_flow: expected a pyro_flows Flow, got {type(flow).__name__}")
        self.flow = flow
        self.objective = NegativeLogLikelihood() if objective is None else objective
        self.compile_options = dict(compile_options)
        options = {"dynamic": False, **compile_options}  # static shapes unless asked: see the class notes
        _constraints_of(flow)
        with _validation(Distribution._validate_args):  # torch.compile turns it off for good: restored
            self._log_prob = torch.compile(_own_code(self._eager_log_prob), **options)
            self._rsample = torch.compile(_own_code(self._eager_rsample), **options)
            self._loss = torch.compile(_own_code(self._eager_loss), **options)

    # the eager functions that are compiled (one graph each for the vector presets)
    def _eager_log_prob(self, value: Tensor, context: Optional[Tensor]) -> Tensor:
        return self.flow(context).log_prob(value)

    def _eager_rsample(self, sample_shape: torch.Size, context: Optional[Tensor]) -> Tensor:
        return self.flow(context).rsample(sample_shape)

    def _eager_loss(self, x: Tensor, context: Optional[Tensor]) -> Tensor:
        return self.objective(self.flow, x, context)

    def log_prob(self, value: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``flow(context).log_prob(value)``, compiled (differentiable)."""
        with _validation(False):
            return self._log_prob(value, context)

    def rsample(self, sample_shape: Union[int, tuple] = (), context: Optional[Tensor] = None) -> Tensor:
        """``flow(context).rsample(sample_shape)``, compiled (differentiable)."""
        with _validation(False):
            return self._rsample(_shape(sample_shape), context)

    def sample(self, sample_shape: Union[int, tuple] = (), context: Optional[Tensor] = None) -> Tensor:
        """``flow(context).sample(sample_shape)``, compiled (no gradients)."""
        with torch.no_grad():
            return self.rsample(sample_shape, context)

    def loss(self, model: nn.Module, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """The objective of the flow on ``(x, context)``, compiled: pass ``objective=compiled.loss`` to
        :func:`~pyro_flows.fit` to train with it. ``model`` must be this flow (not another model, nor one
        wrapped in ``DistributedDataParallel``, whose gradient synchronisation the compiled loss would skip)."""
        if model is not self.flow:
            raise ValueError(
                f"CompiledFlow.loss: got a {type(model).__name__} that is not the compiled flow; a compiled loss "
                "trains only its own flow (under torch.distributed use the eager objective)"
            )
        with _validation(False):
            return self._loss(x, context)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.compile_options.items())
        return f"CompiledFlow({type(self.flow).__name__}{', ' + options if options else ''})"


@contextlib.contextmanager
def _validation(enabled: bool) -> Iterator[None]:
    """``torch.distributions``' default argument validation set to ``enabled`` inside, restored after."""
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(previous)


def _own_code(method: Any) -> Callable[..., Tensor]:
    """A bound ``method``, bound to a copy of its function that has a code object of its own.

    ``torch.compile`` keeps its compiled graphs, their guards, the recompilation limit (8) and the shapes it has seen
    (from which it makes dimensions dynamic) per code object: with the class's one code object, every
    :class:`CompiledFlow` of a process would share them, so that one flow's batch size made another's graph
    dynamic-shaped and a few flows exhausted the limit (calls then run eager).
    """
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


def _constraints_of(flow: Flow) -> None:
    """Build the layers' constraint objects once, eagerly: they are cached on first use in a module-level dict, and a
    graph traced while that dict was still empty would be guarded on it being empty (compiled twice on first use)."""
    for layer in flow.modules():
        if isinstance(layer, FlowTransform):
            _ = (layer.domain, layer.codomain)


def _shape(sample_shape: Union[int, tuple]) -> torch.Size:
    return torch.Size((sample_shape,) if isinstance(sample_shape, int) else sample_shape)


def compile_flow(flow: Flow, objective: Optional[Objective] = None, **compile_options: Any) -> CompiledFlow:
    """``flow`` compiled with ``torch.compile`` for ``log_prob``, sampling and training; see :class:`CompiledFlow`.

    Example:
        >>> flow = pf.NSF(features=2, transforms=1, hidden=(8,))
        >>> pf.compile_flow(flow, backend="eager").log_prob(torch.randn(3, 2)).shape
        torch.Size([3])
    """
    return CompiledFlow(flow, objective, **compile_options)
