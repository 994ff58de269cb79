"""Time-conditioned vector fields :math:`f(z, t[, c])` for continuous normalizing flows."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import broadcast_cat, check_hidden
from .unet import sinusoidal_embedding


def time_column(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` (a number, a scalar tensor or a batch ``(...)``) as a column ``(..., 1)`` with ``like``'s dtype/device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(1) if t.dim() == 0 else t.unsqueeze(-1)


def activation_and_derivative(activation: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    r"""An elementwise activation :math:`\sigma` and its derivative at ``a``: ``(σ(a), σ'(a))``, same shapes.

    Closed forms for ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid`` and ``nn.Softplus`` (differentiable again, for
    training through a Jacobian; SiLU's slope :math:`s + y (1 - s)`, :math:`s = \operatorname{sigmoid}(a)`,
    :math:`y = a s`, is one ``torch.lerp`` after the sigmoid); any other elementwise activation module by
    forward-mode differentiation (``torch.func.jvp`` with a tangent of ones). Not for activations that mix
    elements (e.g. softmax).

    Example:
        >>> y, d = activation_and_derivative(nn.Tanh(), torch.tensor([0.0, 1.0]))
        >>> torch.allclose(d, 1 - y**2)
        True
    """
    if isinstance(activation, nn.SiLU):
        s = torch.sigmoid(a)  # one sigmoid, the costly kernel: three passes in all (measured: faster than F.silu
        y = a * s  # and torch's fused silu_backward, 349 vs 381 us for a field of two hidden layers of 64, N = 1024)
        return y, torch.lerp(s, a.new_ones(()), y)  # s (1 + a (1 - s)) = s + y (1 - s)
    if isinstance(activation, (nn.Tanh, nn.Sigmoid)):
        y = activation(a)
        return y, (1 - y.square()) if isinstance(activation, nn.Tanh) else y * (1 - y)
    if isinstance(activation, nn.Softplus):  # linear above the threshold, as torch's softplus
        scaled = a * activation.beta
        slope = torch.where(scaled > activation.threshold, torch.ones_like(a), torch.sigmoid(scaled))
        return activation(a), slope
    value_and_slope = torch.func.jvp(activation, (a,), (torch.ones_like(a),))
    return value_and_slope[0], value_and_slope[1]


def activation_tangents(activation: nn.Module, a: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(σ(a), σ'(a) ⊙ T)``: an elementwise activation and its tangents ``tangents`` ``(D, N or 1, H)``
    pushed through it (``a`` ``(N, H)``; see :func:`sequential_jacobian`). The slope is computed once per sample
    (:func:`activation_and_derivative`) and broadcast over the :math:`D` tangents."""
    y, slope = activation_and_derivative(activation, a)
    return y, tangents * slope


def input_tangents(width: int, features: int, like: Tensor, start: int = 0) -> Tensor:
    r"""The tangents :math:`\partial h / \partial z_i` of a ``width``-wide input :math:`h` whose entries
    ``start, ..., start + features - 1`` are :math:`z` and whose others do not depend on it: ``(features, 1, width)``,
    row :math:`i` the one-hot :math:`e_{\text{start} + i}` (the middle axis broadcasts over the batch)."""
    return torch.eye(width, dtype=like.dtype, device=like.device)[start : start + features].unsqueeze(1)


def tangents_to_jacobian(tangents: Tensor, batch: int) -> Tensor:
    r"""Tangents ``(D, N or 1, D_out)`` (:func:`sequential_jacobian`) as the Jacobians ``(N, D_out, D)``,
    :math:`J_{nji} = \partial f_{nj} / \partial z_{ni}` (a view)."""
    return tangents.expand(-1, batch, -1).permute(1, 2, 0)


def _is_linear(layer: nn.Module) -> bool:
    """``nn.Linear``, or a look-alike (``in_features``, ``out_features`` and a 2-D ``weight``: zuko's ``Linear``)."""
    if isinstance(layer, nn.Linear):
        return True
    if not (layer._parameters or layer._buffers or "weight" in vars(layer) or hasattr(type(layer), "weight")):
        return False  # an activation: no weight anywhere (getattr would raise and catch an AttributeError, 2 us)
    weight = getattr(layer, "weight", None)
    return hasattr(layer, "out_features") and isinstance(weight, Tensor) and weight.dim() == 2


def _is_elementwise(layer: nn.Module) -> bool:
    """A module without parameters or submodules: an elementwise activation, for the callers here. Reads the
    module's own registries (a module's ``parameters()`` generator costs microseconds on every evaluation)."""
    return all(p is None for p in layer._parameters.values()) and all(m is None for m in layer._modules.values())


def _weight(layer: nn.Module) -> Tensor:
    """A linear layer's weight ``(out, in)``."""
    return cast(Tensor, layer.weight)


def sequential_jacobian(layers: Iterable[nn.Module], h: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
    r"""Push an input ``h`` and its tangents through linear layers and elementwise activations (an MLP).

    Linear layers: ``nn.Linear`` or modules with its attributes (``in_features``, ``out_features``, a 2-D
    ``weight``: :math:`h \mapsto W h + b`); activations: modules without parameters or children.

    Forward-mode, exactly: with :math:`T_i = \partial h / \partial z_i`, a linear layer maps
    :math:`T_i \mapsto W T_i` and an activation :math:`T_i \mapsto \sigma'(a) \odot T_i`
    (:func:`activation_tangents`), so the output's :math:`D` tangents cost :math:`D` extra rows per matmul
    and no backward pass: the Jacobian of a vector field for an exact divergence (see
    :meth:`VectorField.forward_and_jacobian`).

    Shapes: ``h`` ``(N, H)``; ``tangents`` ``(D, N, H)`` or ``(D, 1, H)`` (the same for every sample, e.g.
    :func:`input_tangents`). Returns the output ``(N, H_out)`` and its tangents ``(D, N, H_out)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2))
        >>> z = torch.randn(5, 3)
        >>> y, tangents = sequential_jacobian(net, z, input_tangents(3, 3, z))
        >>> jacobian = torch.func.vmap(torch.func.jacrev(net))(z)  # (N, 2, 3)
        >>> torch.allclose(tangents_to_jacobian(tangents, 5), jacobian, atol=1e-6)
        True
    """
    for layer in layers:
        if _is_linear(layer):
            h, tangents = layer(h), F.linear(tangents, _weight(layer))
        elif isinstance(layer, nn.Identity):
            continue
        elif _is_elementwise(layer):
            h, tangents = activation_tangents(layer, h, tangents)
        else:
            raise ValueError(
                f"sequential_jacobian: only nn.Linear layers and elementwise activations, got {type(layer).__name__}"
            )
    return h, tangents


def chain_trace(weights: Sequence[Tensor], slopes: Sequence[Tensor], start: int = 0) -> Tensor:
    r"""The trace of an MLP's Jacobian with respect to :math:`D` of its inputs, without forming the Jacobian.

    For :math:`K` linear layers :math:`W_1, \dots, W_K` with diagonal slopes :math:`S_k = \operatorname{diag}(s_k)`
    between them (an activation's derivative, times any elementwise gate),

    .. math:: J = W_K S_{K-1} W_{K-1} \cdots S_1 W_1^{(z)}, \qquad D = \text{rows of } W_K,

    :math:`W_1^{(z)}` the columns ``start, ..., start + D - 1`` of :math:`W_1` (the inputs :math:`z`). The trace
    contracts the two ends first, by :math:`\operatorname{tr}(AB) = \operatorname{tr}(BA)`:

    - :math:`K = 2`: :math:`\operatorname{tr} J = s_1^\top v`, :math:`v_l = \sum_i (W_2)_{il} (W_1^{(z)})_{li}`;
    - :math:`K = 3`: :math:`\operatorname{tr} J = s_2^\top M s_1`,
      :math:`M = W_2 \odot (W_3^\top W_1^{(z)\top})`: one matmul of :math:`N` rows, whatever :math:`D`
      (the forward tangents of :func:`sequential_jacobian` push :math:`D N` rows through :math:`W_2`);
    - :math:`K \ge 4`: forward tangents through :math:`W_2, \dots, W_{K-1}`, contracted with :math:`W_K`'s rows;
    - :math:`K = 1`: the constant :math:`\operatorname{tr} W_1^{(z)}`.

    Shapes: ``weights`` ``(H_k, H_{k-1})``; ``slopes`` ``K - 1`` tensors ``(N, H_k)`` (or broadcastable); output
    ``(N,)`` (a scalar when ``K = 1``). Differentiable in all inputs.

    Example:
        >>> w1, w2, w3 = torch.randn(8, 5), torch.randn(8, 8), torch.randn(2, 8)
        >>> s1, s2 = torch.rand(4, 8), torch.rand(4, 8)
        >>> jacobian = w3 @ torch.diag_embed(s2) @ w2 @ torch.diag_embed(s1) @ w1[:, 3:]  # (4, 2, 2)
        >>> torch.allclose(chain_trace([w1, w2, w3], [s1, s2], start=3), jacobian.diagonal(0, -2, -1).sum(-1))
        True
    """
    if len(slopes) != len(weights) - 1 or not weights:
        raise ValueError(f"chain_trace: K linear layers need K - 1 slopes, got {len(weights)} and {len(slopes)}")
    d = weights[-1].shape[0]
    first = weights[0][:, start : start + d]  # W_1^(z): (H_1, D)
    if first.shape[-1] != d:
        raise ValueError(
            f"chain_trace: the first layer has no {d} input columns from {start}: {tuple(weights[0].shape)}"
        )
    if len(weights) == 1:
        return first.diagonal().sum()
    if len(weights) == 2:
        return slopes[0] @ (weights[1] * first.T).sum(0)
    if len(weights) == 3:
        m = weights[1] * (weights[2].T @ first.T)  # (H_2, H_1)
        return torch.linalg.vecdot(F.linear(slopes[0], m), slopes[1])
    tangents = slopes[0] * first.T.unsqueeze(1)  # (D, N, H_1): rows e_i^T of the input pushed through W_1, S_1
    for weight, slope in zip(weights[1:-1], slopes[1:], strict=True):
        tangents = F.linear(tangents, weight) * slope
    return (tangents * weights[-1].unsqueeze(1)).sum((0, -1))


def sequential_trace(
    layers: Iterable[nn.Module], h: Tensor, features: int, start: int = 0, constant: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    r"""An MLP's output and the trace of its Jacobian with respect to the inputs ``start, ..., start + features - 1``
    (:func:`chain_trace`), for an exact divergence without the :math:`D \times D` Jacobian.

    ``layers``: linear layers (as in :func:`sequential_jacobian`; applied as :math:`W h + b` from their ``weight``
    and ``bias``, without calling the module) and elementwise activations, the first and the last linear, with
    ``features`` outputs. Shapes: ``h`` ``(N, H)``; returns ``(N, features)`` and ``(N,)``.

    ``constant``: the first layer's other inputs when they are the same for every row (a time embedding), ``(H -
    features,)``; ``h`` is then only the ``features`` inputs ``(N, features)``, and the input is
    ``[constant[:start], h, constant[start:]]``. They enter the first layer's bias, :math:`b + W^{(c)} c` (one
    matrix-vector product instead of :math:`N` rows of them: :func:`fold_constant_inputs`).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 3))
        >>> z = torch.randn(5, 3)
        >>> y, trace = sequential_trace(net, z, 3)
        >>> jacobian = torch.func.vmap(torch.func.jacrev(net))(z)
        >>> torch.allclose(trace, jacobian.diagonal(0, -2, -1).sum(-1), atol=1e-6)
        True
        >>> net = nn.Sequential(nn.Linear(5, 8), nn.SiLU(), nn.Linear(8, 3))  # inputs [c, z], c = (1, 2)
        >>> c = torch.tensor([1.0, 2.0])
        >>> y2, trace2 = sequential_trace(net, z, 3, start=2, constant=c)
        >>> y3, trace3 = sequential_trace(net, torch.cat([c.expand(5, 2), z], -1), 3, start=2)
        >>> torch.allclose(y2, y3, atol=1e-6) and torch.allclose(trace2, trace3, atol=1e-6)
        True
    """
    weights: list[Tensor] = []
    slopes: list[Tensor] = []
    for layer in layers:
        if _is_linear(layer):
            weight, bias = _weight(layer), getattr(layer, "bias", None)
            if constant is not None and not weights:  # the first layer: z's columns, the constant inputs in its bias
                weight, bias = fold_constant_inputs(weight, bias, constant, start, features)
            h = F.linear(h, weight, bias)  # W h + b, as the trace assumes: no module call (its hooks do not run)
            if len(weights) > len(slopes):  # two linear layers in a row: one linear map
                weight = weight @ weights.pop()
            weights.append(weight)
        elif isinstance(layer, nn.Identity):
            continue
        elif weights and _is_elementwise(layer):
            h, slope = activation_and_derivative(layer, h)
            if len(slopes) == len(weights):  # two activations in a row: their slopes multiply
                slope = slope * slopes.pop()
            slopes.append(slope)
        else:
            raise ValueError(
                "sequential_trace: only nn.Linear layers and elementwise activations, starting with a linear layer, "
                f"got {type(layer).__name__}"
            )
    if len(weights) != len(slopes) + 1 or h.shape[-1] != features:
        raise ValueError(f"sequential_trace: the network must end with a linear layer of {features} outputs")
    return h, chain_trace(weights, slopes, 0 if constant is not None else start).expand(h.shape[:-1])


def fold_constant_inputs(
    weight: Tensor, bias: Optional[Tensor], constant: Tensor, start: int, features: int
) -> tuple[Tensor, Tensor]:
    r"""A linear layer :math:`W [c_{<s}, z, c_{\ge s}] + b` on inputs of which all but ``features`` (:math:`z`, the
    columns ``start, ..., start + features - 1``) are the same for every row: ``(W^{(z)}, b + W^{(c)} c)``, the
    weight on :math:`z` ``(H, features)`` (a view) and the bias ``(H,)`` with the constant inputs folded in.

    Shapes: ``weight`` ``(H, features + C)``, ``bias`` ``(H,)`` or None, ``constant`` ``(C,)``.

    Example:
        >>> layer, c, z = nn.Linear(4, 3), torch.randn(2), torch.randn(5, 2)
        >>> weight, bias = fold_constant_inputs(layer.weight, layer.bias, c, 1, 2)  # inputs [c_0, z, c_1]
        >>> torch.allclose(F.linear(z, weight, bias), layer(torch.cat([c[:1].expand(5, 1), z, c[1:].expand(5, 1)], -1)))
        True
    """
    end = start + features
    if constant.dim() != 1 or not 0 <= start <= constant.shape[0] or constant.shape[0] + features != weight.shape[-1]:
        raise ValueError(
            f"fold_constant_inputs: a layer of {weight.shape[-1]} inputs takes {features} from z (from column "
            f"{start}) and {weight.shape[-1] - features} constant ones, got constant {tuple(constant.shape)}"
        )
    rest = weight[:, :start] if end == weight.shape[-1] else torch.cat([weight[:, :start], weight[:, end:]], -1)
    return weight[:, start:end], (rest @ constant if bias is None else torch.addmv(bias, rest, constant))


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's concat-squash layer (Grathwohl et al. 2019): a linear map gated and shifted by the time.

    .. math:: \mathrm{CS}(h, t) = (W h + b) \odot \sigma(w_g t + b_g) + w_b t

    Shapes: ``h`` is ``(..., in_features)``, ``t`` a column ``(..., 1)`` broadcastable against it.

    References
    ----------
    - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and D. Duvenaud.
      *FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models*. ICLR 2019.
      `arXiv:1810.01367 <https://arxiv.org/abs/1810.01367>`__

    Example:
        >>> layer = ConcatSquashLinear(3, 8)
        >>> layer(torch.randn(10, 3), torch.rand(10, 1)).shape
        torch.Size([10, 8])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.time_bias = nn.Linear(1, out_features, bias=False)

    def forward(self, h: Tensor, t: Tensor) -> Tensor:
        return self.linear(h) * torch.sigmoid(self.gate(t)) + self.time_bias(t)

    def forward_and_tangents(self, h: Tensor, tangents: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""The layer and its tangents :math:`T \mapsto (W T) \odot \sigma(w_g t + b_g)` (``tangents``
        ``(D, N or 1, in_features)``; see :func:`sequential_jacobian`)."""
        gate = torch.sigmoid(self.gate(t))
        return self.linear(h) * gate + self.time_bias(t), F.linear(tangents, self.linear.weight) * gate

    def zero_(self) -> ConcatSquashLinear:
        """Make the layer output zero for every input (a fresh CNF built on it is the identity)."""
        for p in (self.linear.weight, self.linear.bias, self.time_bias.weight):
            nn.init.zeros_(p)
        return self


class VectorField(nn.Module):
    r"""A time-conditioned MLP vector field :math:`f_\theta(z, t[, c]) \in \mathbb{R}^D` of concat-squash layers.

    The dynamics of a continuous normalizing flow (Chen et al. 2018; Grathwohl et al. 2019),
    :math:`\frac{dz}{dt} = f_\theta(z, t, c)`. Every layer sees the time through
    :class:`ConcatSquashLinear`; a context :math:`c` (constant in time) is concatenated to
    :math:`z`. The activation should be smooth (the trace of the Jacobian is differentiated
    during training). The last layer starts at zero, so a fresh field is :math:`f \equiv 0`
    and the flow it drives is the identity.

    Shapes: ``z`` ``(..., features)``; ``t`` a number, a scalar tensor or a batch broadcastable
    with ``z``'s batch dims; ``context`` ``(..., context_features)``. Output: ``(..., features)``.

    Args:
        features: :math:`D`.
        hidden: widths of the hidden layers.
        context_features: size of :math:`c` (0: unconditional).
        activation: a smooth activation module class (default ``nn.SiLU``; ``nn.Softplus``, ``nn.Tanh`` work too).

    References
    ----------
    - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and D. Duvenaud.
      *FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models*. ICLR 2019.
      `arXiv:1810.01367 <https://arxiv.org/abs/1810.01367>`__

    Example:
        >>> f = VectorField(2, hidden=(32, 32))
        >>> f(torch.randn(10, 2), torch.tensor(0.5)).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.features, self.context_features = int(features), int(context_features)
        widths = [features + context_features, *check_hidden(hidden, "VectorField"), features]
        layers = [ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        layers[-1].zero_()
        self.layers = nn.ModuleList(layers)
        self.activation = activation()

    def forward(self, z: Tensor, t: Tensor | float, context: Optional[Tensor] = None) -> Tensor:
        h = broadcast_cat(z, context)
        t = time_column(t, h)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h, t))
        return self.layers[-1](h, t)

    def forward_and_jacobian(
        self, z: Tensor, t: Tensor | float, context: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        r"""``(f, J)``: the field and its Jacobian :math:`J = \partial f / \partial z` ``(N, D, D)``,
        :math:`J_{nji} = \partial f_{nj} / \partial z_{ni}`, by forward-mode propagation through the layers
        (:func:`sequential_jacobian`; exact, no autograd). ``z`` ``(N, D)``; ``t``, ``context`` as in
        :meth:`forward`."""
        h = broadcast_cat(z, context)
        t = time_column(t, h)
        tangents = input_tangents(h.shape[-1], self.features, h)
        layers = cast(Sequence[ConcatSquashLinear], self.layers)
        for layer in layers[:-1]:
            h, tangents = layer.forward_and_tangents(h, tangents, t)
            h, tangents = activation_tangents(self.activation, h, tangents)
        f, tangents = layers[-1].forward_and_tangents(h, tangents, t)
        return f, tangents_to_jacobian(tangents, f.shape[0])

    def forward_and_trace(
        self, z: Tensor, t: Tensor | float, context: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        r"""``(f, tr J)``: the field and the trace of its Jacobian ``(N,)``, exactly, without the Jacobian.

        A concat-squash layer's Jacobian is :math:`\operatorname{diag}(g_k) W_k` (gate :math:`g_k` of the time), so
        :math:`J = \operatorname{diag}(g_K) W_K S_{K-1} \cdots S_1 W_1^{(z)}` with slopes
        :math:`S_k = \operatorname{diag}(\sigma'(a_k) \odot g_k)`: :func:`chain_trace` (one extra matmul of
        :math:`N` rows for two hidden layers, whatever :math:`D`). ``t`` one time for the batch (a number or a
        scalar tensor; a batch of times takes the trace of :meth:`forward_and_jacobian`)."""
        h = broadcast_cat(z, context)
        column = time_column(t, h)
        if column.numel() != 1:
            f, jacobian = self.forward_and_jacobian(z, t, context)
            return f, jacobian.diagonal(dim1=-2, dim2=-1).sum(-1)
        t = column
        layers = cast(Sequence[ConcatSquashLinear], self.layers)
        slopes = []
        for layer in layers[:-1]:
            gate = torch.sigmoid(layer.gate(t))
            h, slope = activation_and_derivative(self.activation, layer.linear(h) * gate + layer.time_bias(t))
            slopes.append(slope * gate)
        last = layers[-1]
        gate = torch.sigmoid(last.gate(t))
        f = last.linear(h) * gate + last.time_bias(t)
        weights = [layer.linear.weight for layer in layers[:-1]] + [gate.unsqueeze(-1) * last.linear.weight]
        return f, chain_trace(weights, slopes).expand(f.shape[:-1])


class ResidualVectorField(nn.Module):
    r"""A residual MLP vector field :math:`f_\theta(z, t[, c])` with a sinusoidal time embedding, conditioned at
    every block (the shape of FMPE's networks, Dax et al. 2023).

    With :math:`e(t)` the sinusoidal embedding of :math:`t` (:func:`~pyro_flows.nn.unet.sinusoidal_embedding`,
    ``time_features`` features, angular frequencies from :math:`\pi` to :math:`32\pi` per unit of time, a
    geometric series) and :math:`s = (c, e(t))`,

    .. math:: h_0 = W_0 (z, s), \qquad h_{l} = h_{l-1} + B_l\,\sigma\big(A_l\,\sigma(h_{l-1}) + V_l s\big),
              \qquad f = W_\text{out}\,\sigma(h_L),

    :math:`L` = ``len(hidden)`` blocks of the common width. The time and the context enter every block (the
    concat-squash :class:`VectorField` sees the context only at its input), and the embedding resolves the time
    near :math:`t = 1`, where the field of a narrow target changes fast. :math:`W_\text{out}` starts at zero: a
    fresh field is :math:`f \equiv 0` (the identity flow). The activation should be smooth.

    Shapes: ``z`` ``(..., features)``; ``t`` a number, a scalar or a batch broadcastable with ``z``'s batch dims;
    ``context`` ``(..., context_features)``. Output ``(..., features)``.

    Args:
        features: :math:`D`.
        hidden: the width of each residual block (all equal), one entry per block.
        context_features: size of :math:`c` (0: unconditional).
        activation: a smooth activation module class (default ``nn.SiLU``).
        time_features: size of :math:`e(t)` (even).

    References
    ----------
    - M. Dax, J. Wildberger, S. Buchholz, S. R. Green, J. H. Macke and B. Schölkopf.
      *Flow Matching for Scalable Simulation-Based Inference*. NeurIPS 2023.
      `arXiv:2305.17161 <https://arxiv.org/abs/2305.17161>`__

    Example:
        >>> f = ResidualVectorField(2, hidden=(32, 32), context_features=3)
        >>> f(torch.randn(10, 2), torch.rand(10), torch.randn(10, 3)).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (128, 128),
        context_features: int = 0,
        activation: type[nn.Module] = nn.SiLU,
        time_features: int = 12,
    ) -> None:
        super().__init__()
        widths = check_hidden(hidden, "ResidualVectorField")
        if len(set(widths)) != 1:
            raise ValueError(f"ResidualVectorField: the residual blocks need one common width, got hidden={hidden!r}")
        if (
            isinstance(time_features, bool)
            or not isinstance(time_features, int)
            or time_features < 4
            or time_features % 2
        ):
            raise ValueError(f"ResidualVectorField: time_features must be an even integer >= 4, got {time_features!r}")
        self.features, self.context_features, self.time_features = int(features), int(context_features), time_features
        width, side = widths[0], context_features + time_features
        self.input = nn.Linear(features + side, width)
        self.inner = nn.ModuleList(nn.Linear(width, width) for _ in widths)
        self.side = nn.ModuleList(nn.Linear(side, width) for _ in widths)
        self.outer = nn.ModuleList(nn.Linear(width, width) for _ in widths)
        self.output = nn.Linear(width, features)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.activation = activation()

    def _side(self, z: Tensor, t: Tensor | float, context: Optional[Tensor]) -> Tensor:
        """:math:`s = (e(t), c)`: the time's sinusoidal embedding and the context."""
        half = self.time_features // 2  # angular frequencies 32 pi * P^(-k / half), k < half: from 32 pi down to pi
        time = time_column(t, z).squeeze(-1)
        embedding = sinusoidal_embedding(
            time, self.time_features, max_period=32.0 ** (half / (half - 1)), scale=32 * math.pi
        )
        return broadcast_cat(embedding, context)

    def forward(self, z: Tensor, t: Tensor | float, context: Optional[Tensor] = None) -> Tensor:
        side = self._side(z, t, context)
        h = self.input(broadcast_cat(z, side))
        side = side.expand(h.shape[:-1] + side.shape[-1:])
        for inner, lateral, outer in zip(self.inner, self.side, self.outer, strict=True):
            h = h + outer(self.activation(inner(self.activation(h)) + lateral(side)))
        return self.output(self.activation(h))

    def forward_and_jacobian(
        self, z: Tensor, t: Tensor | float, context: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        r"""``(f, J)``: the field and its Jacobian :math:`J = \partial f / \partial z` ``(N, D, D)``,
        :math:`J_{nji} = \partial f_{nj} / \partial z_{ni}`, by forward-mode propagation through the blocks
        (:func:`sequential_jacobian`; exact, no autograd). ``z`` ``(N, D)``; ``t``, ``context`` as in
        :meth:`forward`."""
        side = self._side(z, t, context)
        inputs = broadcast_cat(z, side)
        h = self.input(inputs)
        tangents = F.linear(input_tangents(inputs.shape[-1], self.features, inputs), self.input.weight)
        side = side.expand(h.shape[:-1] + side.shape[-1:])
        for inner, lateral, outer in zip(self.inner, self.side, self.outer, strict=True):
            a, block = activation_tangents(self.activation, h, tangents)
            u, block = activation_tangents(self.activation, inner(a) + lateral(side), F.linear(block, _weight(inner)))
            h, tangents = h + outer(u), tangents + F.linear(block, _weight(outer))
        f, tangents = sequential_jacobian([self.activation, self.output], h, tangents)
        return f, tangents_to_jacobian(tangents, f.shape[0])
