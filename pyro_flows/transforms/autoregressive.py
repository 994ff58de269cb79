"""Autoregressive layers: MAF, IAF and autoregressive neural spline flows are one structure."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn import MADE
from .base import Conditional, FlowTransform, broadcast_context
from .maps import Affine, ElementwiseMap, RationalQuadraticSpline


class Autoregressive(FlowTransform):
    r"""Autoregressive layer (Kingma et al. 2016; Papamakarios et al. 2017): each output
    coordinate is a monotone map of its input, conditioned on the preceding inputs.

    .. math::
        y_i = \tau(x_i;\ \theta_i(x_{<i}, c)), \qquad
        \log|\det J| = \sum_i \log \tau'(x_i),

    with :math:`\theta` a :class:`~pyro_flows.nn.MADE` over the variable
    ``order`` (whose last layer starts at zero: a fresh layer is the identity).

    The forward direction takes one network pass; the inverse is sequential
    in the dimension and exact: :math:`x_i = \tau^{-1}(y_i;\ \theta_i(x_{<i}, c))`,
    computed by :meth:`MADE.sequential`, which evaluates each hidden unit once
    (one network pass worth of work in total, not :math:`D` passes).
    As a base→data layer this is an IAF (sampling in one pass); its
    :attr:`inv` is a MAF layer (density evaluation in one pass).

    Shapes: ``x`` is ``(..., features)``; the context ``(..., context_features)``
    broadcasts with it.

    Args:
        features: :math:`D`.
        transform_map: an :class:`~pyro_flows.transforms.maps.ElementwiseMap`.
        hidden: widths of the MADE's hidden layers.
        context_features: context size (conditional twin only).
        order: the variable order (a permutation of ``range(D)``; default increasing).
        activation: hidden activation of the MADE.
        input_bound: None, or the MADE squashes its inputs into this bound (:class:`~pyro_flows.nn.MADE`): the
            map's parameters become constant far from the data.

    Example:
        >>> layer = Autoregressive(4, Affine())
        >>> x, ladj = layer.inverse_and_ladj(torch.randn(10, 4))
        >>> x.shape, ladj.shape
        (torch.Size([10, 4]), torch.Size([10]))

    References:
        - Germain, Gregor, Murray & Larochelle (2015), *MADE: Masked autoencoder for distribution estimation*,
          arXiv:1502.03509.
        - Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), *Improved variational inference with inverse
          autoregressive flow*, arXiv:1606.04934.
        - Papamakarios, Pavlakou & Murray (2017), *Masked autoregressive flow for density estimation*, arXiv:1705.07057.
        - Durkan, Bekasov, Murray & Papamakarios (2019), *Neural spline flows*, arXiv:1906.04032.
    """

    def __init__(
        self,
        features: int,
        transform_map: ElementwiseMap,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        order: Optional[Sequence[int]] = None,
        activation: type[nn.Module] = nn.ReLU,
        input_bound: Optional[float] = None,
    ) -> None:
        super().__init__((features,), context_features)
        self.transform_map = transform_map
        self.network = MADE(
            features, transform_map.num_params, hidden, context_features, order, activation, input_bound
        )

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        params = self.network(x, context).movedim(-2, 0)
        if x.shape != params.shape[1:]:  # broadcast with the context's batch
            x = x.expand(params.shape[1:])
        y, log_derivative = self.transform_map.forward(x, params)
        return y, log_derivative.sum(-1)

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y, context = broadcast_context(y, context, 1)
        log_derivatives = []

        def solve(i: int, params: Tensor) -> Tensor:
            x_i, log_derivative = self.transform_map.inverse(y[..., i : i + 1], params.movedim(-1, 0).unsqueeze(-1))
            log_derivatives.append(log_derivative)
            return x_i.squeeze(-1)

        x = self.network.sequential(solve, y.shape[:-1], context)
        return x, torch.cat(log_derivatives, dim=-1).sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transform_map={self.transform_map!r}"


class AffineAutoregressive(Autoregressive):
    """Affine autoregressive layer: :class:`Autoregressive` with :class:`~.maps.Affine`.

    As a base→data layer it is an IAF layer; its ``.inv`` is a MAF layer.

    Example:
        >>> maf_layer = AffineAutoregressive(4, hidden=(64, 64)).inv
        >>> y, ladj = maf_layer.call_and_ladj(torch.randn(10, 4))  # data -> base in one pass
        >>> ladj.shape
        torch.Size([10])

    References:
        - Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), *Improved variational inference with inverse
          autoregressive flow*, arXiv:1606.04934.
        - Papamakarios, Pavlakou & Murray (2017), *Masked autoregressive flow for density estimation*, arXiv:1705.07057.
    """

    def __init__(self, features: int, log_scale_bound: float = 3.0, **kwargs) -> None:
        super().__init__(features, Affine(log_scale_bound), **kwargs)


class SplineAutoregressive(Autoregressive):
    """Autoregressive neural spline layer (Durkan et al. 2019).

    :class:`Autoregressive` with a :class:`~.maps.RationalQuadraticSpline`.

    Example:
        >>> layer = SplineAutoregressive(4, bins=8, bound=5.0)
        >>> layer(torch.randn(10, 4)).shape
        torch.Size([10, 4])

    References:
        - Durkan, Bekasov, Murray & Papamakarios (2019), *Neural spline flows*, arXiv:1906.04032.
    """

    def __init__(self, features: int, bins: int = 8, bound: float = 5.0, **kwargs) -> None:
        super().__init__(features, RationalQuadraticSpline(bins, bound), **kwargs)


class ConditionalAutoregressive(Conditional, Autoregressive):
    """:class:`Autoregressive` whose MADE also sees a context (needs ``context_features``)."""


class ConditionalAffineAutoregressive(Conditional, AffineAutoregressive):
    """Conditional twin of :class:`AffineAutoregressive` (needs ``context_features``)."""


class ConditionalSplineAutoregressive(Conditional, SplineAutoregressive):
    """Conditional twin of :class:`SplineAutoregressive` (needs ``context_features``)."""
