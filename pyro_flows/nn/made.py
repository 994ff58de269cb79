"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import broadcast_cat, check_hidden, check_input_bound, hidden_layers, soft_clamp


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (which also masks the gradient).

    The mask costs one elementwise product on the weight per call, negligible
    next to the batched matmul; :meth:`MADE.sequential` slices the unmasked
    weight where the mask is all ones and does not multiply at all.
    """

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)  # rebuilt by the constructor

    def effective_weight(self) -> Tensor:
        """The weight times the mask: the matrix the layer multiplies by."""
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def _sorted_degrees(units: int, low: int, high: int) -> Tensor:
    """``units`` degrees spread evenly over ``[low, high]``, in increasing order."""
    return low + torch.arange(units) * (high - low + 1) // units


class MADE(nn.Module):
    r"""Masked MLP whose output for variable :math:`i` depends only on the variables before it.

    Variable :math:`i` has degree :math:`o_i` (its position in ``order``); a
    hidden unit of degree :math:`k` sees inputs of degree :math:`\le k`, an
    output of variable :math:`i` sees hidden units of degree :math:`< o_i`.
    The context (optional) feeds every unit of the first hidden layer, so
    every output may depend on it. ``forward`` maps ``(..., D)`` (and a
    context ``(..., C)``, broadcast) to parameters ``(..., P, D)``,
    ``P = params_per_feature`` (parameter-major: each kind of parameter is a
    contiguous block of ``D``). The output layer starts at zero.

    Hidden units are laid out by increasing degree, so the units of one
    degree form a contiguous block. :meth:`sequential` uses this to invert an
    autoregressive map with *one* network pass worth of work in total: after
    variable :math:`i` is known, only the units whose degree is :math:`o_i`
    are computed, instead of the whole network once per variable.

    ``input_bound`` (None: off) squashes the variables before the first layer as :class:`~pyro_flows.nn.MLP`'s
    does (:func:`~pyro_flows.nn.mlp.soft_clamp`), so the parameters become constant far outside the training data.

    References
    ----------
    - M. Germain, K. Gregor, I. Murray and H. Larochelle.
      *MADE: Masked Autoencoder for Distribution Estimation*. ICML 2015.
      `arXiv:1502.03509 <https://arxiv.org/abs/1502.03509>`__

    Example:
        >>> made = MADE(4, params_per_feature=2, hidden=(32, 32))
        >>> made(torch.randn(10, 4)).shape
        torch.Size([10, 2, 4])
    """

    order: Tensor
    variable_of_rank: Tensor

    def __init__(
        self,
        features: int,
        params_per_feature: int = 1,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        order: Optional[Sequence[int]] = None,
        activation: type[nn.Module] = nn.ReLU,
        input_bound: Optional[float] = None,
    ) -> None:
        super().__init__()
        hidden = check_hidden(hidden, "MADE")
        self.input_bound = check_input_bound(input_bound, "MADE")
        if features < 1 or not hidden:
            raise ValueError(f"MADE needs features >= 1 and at least one hidden layer, got {features}, {hidden}")
        D, P, C = features, params_per_feature, context_features
        ranks = torch.arange(D) if order is None else torch.as_tensor(order).long()
        if sorted(ranks.tolist()) != list(range(D)):
            raise ValueError(f"MADE: order must be a permutation of 0..{D - 1}, got {ranks.tolist()}")
        self.features, self.params_per_feature, self.context_features = D, P, C
        degrees_in = ranks + 1  # degree of each input variable, 1..D
        low = 0 if (C > 0 or D == 1) else 1  # degree-0 units see only the context
        degrees_hidden = [_sorted_degrees(h, low, D - 1) for h in hidden]

        layers: list[nn.Module] = []
        previous = degrees_in
        for i, degrees in enumerate(degrees_hidden):
            mask = degrees[:, None] >= previous[None, :]
            if i == 0:
                mask = torch.cat((mask, torch.ones(len(degrees), C, dtype=torch.bool)), dim=1)
            layers.append(MaskedLinear(mask))
            previous = degrees
        degrees_out = degrees_in.repeat(P)  # output p * D + i is parameter p of variable i
        self.output = MaskedLinear(degrees_out[:, None] > previous[None, :])
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.hidden = nn.ModuleList(layers)
        self.activation = activation()

        self.register_buffer("order", ranks)
        self.register_buffer("variable_of_rank", torch.argsort(ranks))  # variable with degree r + 1
        # the same order as Python ints (the masks above are built from it): sequential reads no tensor on the host,
        # so a compiled sampler traces it without data-dependent sizes
        self._variable_of_rank = tuple(int(v) for v in torch.argsort(ranks))
        # number of hidden units of degree <= r, for r = -1..D-1, per layer
        self._ends = [[int((d <= r).sum()) for r in range(-1, D)] for d in degrees_hidden]

    def _squash(self, x: Tensor) -> Tensor:
        return x if self.input_bound is None else soft_clamp(x, self.input_bound)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h = hidden_layers(list(self.hidden), self.activation, broadcast_cat(self._squash(x), context))
        return self.output(h).unflatten(-1, (self.params_per_feature, self.features))

    def sequential(
        self, solve: Callable[[int, Tensor], Tensor], batch_shape: torch.Size, context: Optional[Tensor] = None
    ) -> Tensor:
        r"""Determine the variables one at a time, in order, from their own parameters.

        ``solve(i, params_i)`` receives variable ``i``'s parameters ``(*batch_shape, P)``,
        computed from the variables already determined, and returns its value
        ``(*batch_shape,)``. Returns all variables ``(*batch_shape, D)``.
        Each hidden unit is evaluated exactly once, as soon as its inputs are known.
        """
        D, P = self.features, self.params_per_feature
        layers = cast("list[MaskedLinear]", list(self.hidden))  # built from MaskedLinear layers only
        first = layers[0]
        weight_x = first.weight[:, :D].index_select(1, self.variable_of_rank)  # columns by rank
        const = first.bias.expand(*batch_shape, -1)
        if context is not None:
            const = const + F.linear(context, first.weight[:, D:])
        known = const.new_empty(*batch_shape, 0)  # determined variables, by rank
        hidden = [const.new_empty(*batch_shape, 0) for _ in layers]  # units computed so far
        for r, variable in enumerate(self._variable_of_rank):
            for i, layer in enumerate(layers):
                start, end = self._ends[i][r], self._ends[i][r + 1]
                if start == end:
                    continue
                if i == 0:
                    pre = const[..., start:end] + F.linear(self._squash(known), weight_x[start:end, :r])
                else:
                    source = hidden[i - 1]
                    pre = F.linear(source, layer.weight[start:end, : source.shape[-1]], layer.bias[start:end])
                hidden[i] = torch.cat((hidden[i], self.activation(pre)), dim=-1)
            rows = slice(variable, P * D, D)
            last = hidden[-1]
            params = F.linear(last, self.output.weight[rows, : last.shape[-1]], self.output.bias[rows])
            known = torch.cat((known, solve(variable, params).unsqueeze(-1)), dim=-1)
        return known.index_select(-1, self.order)
