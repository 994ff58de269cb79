"""Multilayer perceptrons that condition coupling layers."""

from __future__ import annotations

import operator
import threading
from typing import Optional, Sequence, cast

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import function_transformed


def broadcast_cat(x: Tensor, context: Optional[Tensor]) -> Tensor:
    """Concatenate ``x`` and ``context`` on the last dim after broadcasting their batch dims."""
    if context is None:
        return x
    batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return torch.cat((x.expand(batch + x.shape[-1:]), context.expand(batch + context.shape[-1:])), dim=-1)


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    r"""Squash ``x`` into :math:`(-b, b)` algebraically, :math:`x / (1 + |x| / b)`: the identity near 0 (slope 1),
    smooth, monotone, with gradients that never vanish abruptly as a hard clamp's do, and a few cheap elementwise
    ops (cheaper than ``tanh``).

    Its derivative is :math:`(1 + |x|/b)^{-2} = (1 - |y|/b)^2`: backward keeps only the output :math:`y`, not
    the input and the denominator (a flow layer's raw parameters are then freed after its forward pass).

    Example:
        >>> soft_clamp(torch.tensor([0.0, 1.0, 1e6]), 3.0)
        tensor([0.0000, 0.7500, 3.0000])
    """
    if not (x.requires_grad and torch.is_grad_enabled()) or function_transformed(x):
        return _soft_clamp(x, bound)  # no graph to record, or torch.func (no forward(ctx) Function): bare arithmetic
    return _SoftClamp.apply(x, bound)


def _soft_clamp(x: Tensor, bound: float) -> Tensor:
    return x / x.abs().div_(bound).add_(1)  # in place on the fresh |x|


class _SoftClamp(torch.autograd.Function):
    """:func:`soft_clamp` with a backward from its output alone (twice differentiable).

    Written in the ``forward(ctx, ...)`` style: a Function with a separate ``setup_context`` goes through
    functorch's dispatch on every call, which cost more than the arithmetic (158 against 98 us for a forward and
    backward of a (512, 8) input, 1 thread, torch 2.13).
    """

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:
        y = _soft_clamp(x, bound)
        ctx.bound = bound
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (y,) = ctx.saved_tensors
        return grad * (1 - y.abs() / ctx.bound).square(), None


def activate(activation: nn.Module, h: Tensor) -> Tensor:
    """``activation(h)`` for a fresh ``h`` (a layer's output, referenced nowhere else): ``nn.ReLU`` and ``nn.Tanh``
    in place.

    Their backward reads their output, and a linear layer's backward does not read its own output, so the
    activated values can overwrite it: no new (batch, width) tensor per hidden layer. Without gradients this
    made a (4096, 8) -> 128 -> 128 -> 16 network 1.8x faster (2.44 -> 1.38 ms, 1 thread: a fresh 2 MiB tensor is
    a fresh mapping whose pages fault in), with them a (512, 8) forward and backward 4% faster.
    """
    kind = type(activation)
    if kind is nn.ReLU:
        return torch.relu_(h)
    return torch.tanh_(h) if kind is nn.Tanh else activation(h)


WORKSPACE_BYTES = 32 * 2**20
"""Most bytes of hidden activations a thread keeps between calls of :func:`hidden_layers` without gradients (a
batch whose buffers would not fit allocates as usual)."""


class _Workspace(threading.local):
    """One thread's buffers for hidden activations without gradients, ``(rows, width, dtype, device, slot) ->
    tensor``: reused from call to call, so that their pages are not faulted in again every call."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}

    def buffer(self, rows: int, width: int, like: Tensor, slot: int) -> Optional[Tensor]:
        """The ``(rows, width)`` buffer of ``slot`` (None past :data:`WORKSPACE_BYTES`: the caller allocates)."""
        key = (rows, width, like.dtype, like.device, slot)
        buffer = self.buffers.get(key)
        if buffer is None:
            size = rows * width * like.element_size()
            if sum(b.nbytes for b in self.buffers.values()) + size > WORKSPACE_BYTES:  # another batch size
                self.buffers.clear()
                if size > WORKSPACE_BYTES:
                    return None
            with torch.inference_mode(False):  # an ordinary tensor, writable inside and outside inference mode
                buffer = self.buffers[key] = like.new_empty(rows, width)
        return buffer


_WORKSPACE = _Workspace()


def clear_workspace() -> None:
    """Free this thread's buffers of hidden activations (:func:`hidden_layers`); the next call without gradients
    allocates them again.

    Example:
        >>> clear_workspace()
    """
    _WORKSPACE.buffers.clear()


def _reuses_buffers(h: Tensor, layers: Sequence[nn.Module]) -> bool:
    """Whether :func:`hidden_layers` may write into the thread's workspace: no autograd graph, reverse or forward
    mode (``out=`` functions carry no tangents), a CPU tensor (CUDA's caching allocator already reuses memory),
    neither ``torch.compile`` nor ``torch.func`` tracing, no module hooks (the layers are not called as modules
    there)."""
    return (
        not torch.is_grad_enabled()
        and forward_ad._current_level < 0  # no dual level entered (torch has no public query for it)
        and h.device.type == "cpu"
        and h.dim() >= 2
        and not torch.compiler.is_compiling()
        and not function_transformed(h)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        and not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
    )


def _linear_in_workspace(layer: nn.Module, h: Tensor, slot: int) -> Tensor:
    """``layer(h)`` written into the thread's workspace buffer ``slot`` (a fresh tensor past its size)."""
    masked = getattr(layer, "effective_weight", None)
    weight = cast(Tensor, layer.weight if masked is None else masked())
    bias = cast(Optional[Tensor], layer.bias)
    flat = h.reshape(-1, h.shape[-1])
    out = _WORKSPACE.buffer(flat.shape[0], weight.shape[0], flat, slot)
    if out is None:
        return F.linear(h, weight, bias)
    torch.addmm(weight.new_zeros(()) if bias is None else bias, flat, weight.t(), out=out)
    return out.view(*h.shape[:-1], weight.shape[0])


def hidden_layers(layers: Sequence[nn.Module], activation: nn.Module, h: Tensor, residual: bool = False) -> Tensor:
    r"""An MLP's hidden layers, :math:`h_k = \sigma(W_k h_{k-1} + b_k)` (:func:`activate`), plus :math:`h_{k-1}`
    where ``residual`` and the widths agree (not for the first). ``layers`` are ``nn.Linear`` whose
    :meth:`effective_weight` (a :class:`~.made.MaskedLinear`'s masked weight) or ``weight`` is :math:`W_k`.

    Without gradients on the CPU each hidden activation is written into a buffer of the thread's workspace (two
    alternating slots, at most :data:`WORKSPACE_BYTES` in all), reused by the next call: a fresh
    (4096, 128) float tensor is 2 MiB whose pages fault in on first touch, which cost as much as the matmul
    writing it (one (4096, 32) -> 128 -> 128 -> 64 MADE without gradients, 1 thread: 2.84 -> 2.07 ms). The result
    then lives in the workspace until the next call of this thread: the caller feeds it to its output layer and
    does not keep it. :func:`clear_workspace` frees the buffers.

    Example:
        >>> layers, x = [nn.Linear(3, 8), nn.Linear(8, 8)], torch.randn(5, 3)
        >>> with torch.no_grad():
        ...     h = hidden_layers(layers, nn.ReLU(), x)
        ...     torch.allclose(h, layers[1](layers[0](x).relu()).relu())
        True
    """
    reuse = _reuses_buffers(h, layers)
    for i, layer in enumerate(layers):
        out = activate(activation, _linear_in_workspace(layer, h, i % 2) if reuse else layer(h))
        h = h + out if residual and i > 0 and out.shape[-1] == h.shape[-1] else out
    return h


def check_input_bound(input_bound: Optional[float], name: str) -> Optional[float]:
    """``input_bound`` as a float (None: no bound); a ValueError naming it unless it is a number > 0."""
    if input_bound is None:
        return None
    if isinstance(input_bound, bool) or not isinstance(input_bound, (int, float)) or not input_bound > 0:
        raise ValueError(f"{name}: input_bound must be None or a number > 0, got {input_bound!r}")
    return float(input_bound)


def check_hidden(hidden: Sequence[int], name: str) -> tuple[int, ...]:
    """``hidden`` as a tuple of widths; a ValueError naming ``hidden`` unless each is an integer >= 1."""
    try:
        widths = tuple(operator.index(h) for h in hidden)
        valid = all(w >= 1 and not isinstance(h, bool) for w, h in zip(widths, hidden, strict=True))
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{name}: hidden must be a sequence of layer widths, each an integer >= 1; got {hidden!r}")
    return widths


class MLP(nn.Module):
    r"""Fully connected network :math:`\mathbb{R}^{n + c} \to \mathbb{R}^m` with an optional context.

    ``forward(x, context)`` maps ``(..., in_features)`` (and ``(..., context_features)``,
    broadcast against it) to ``(..., out_features)``. With ``residual=True``
    every hidden layer after the first whose width equals its input's adds a
    skip connection, :math:`h \leftarrow h + \sigma(W h + b)`. The last layer
    starts at zero, so a conditioner built from it outputs zeros until trained.

    ``input_bound`` :math:`b` (None: off) squashes the inputs (not the context) first,
    :math:`x \mapsto x / (1 + |x| / b)` (:func:`soft_clamp`): inside a few :math:`b` the network sees nearly
    its inputs, far outside it sees :math:`\pm b`, so its outputs, a flow layer's shifts and scales, become
    constant in the tails instead of extrapolating linearly as a ReLU network's do. A held-out point far outside
    the training rows then gets a Gaussian tail, not a shift that grows with the distance (one breast-cancer row
    was scored 190 nats below a Gaussian's value by a MAF without it).

    Example:
        >>> net = MLP(3, 8, hidden=(32, 32), context_features=2)
        >>> net(torch.randn(10, 3), torch.randn(2)).shape
        torch.Size([10, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        residual: bool = False,
        zero_init: bool = True,
        input_bound: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.context_features = in_features, out_features, context_features
        self.residual = residual
        self.input_bound = check_input_bound(input_bound, "MLP")
        widths = [in_features + context_features, *check_hidden(hidden, "MLP")]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.activation = activation()
        self.output = nn.Linear(widths[-1], out_features)
        if zero_init:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h = broadcast_cat(x if self.input_bound is None else soft_clamp(x, self.input_bound), context)
        return self.output(hidden_layers(list(self.hidden), self.activation, h, self.residual))
