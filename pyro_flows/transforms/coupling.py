"""Coupling layers: NICE, RealNVP and spline couplings are one structure with different maps."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn import MLP
from .base import Conditional, FlowTransform
from .maps import Affine, ElementwiseMap, RationalQuadraticSpline, Shift


class Coupling(FlowTransform):
    r"""Coupling layer (Dinh et al. 2015, 2017): half the features condition a map of the other half.

    With a boolean ``mask`` marking the transformed features :math:`B` and the
    others :math:`A`,

    .. math::
        y_A = x_A, \qquad y_B = \tau(x_B;\ \theta(x_A, c)), \qquad
        \log|\det J| = \sum_{i \in B} \log \tau'(x_i),

    where :math:`\tau` is the elementwise ``transform_map`` and :math:`\theta`
    an :class:`~pyro_flows.nn.MLP` of :math:`x_A` (and of the context
    :math:`c` in the conditional twin) whose last layer starts at zero, so a
    fresh layer is the identity. Both directions take one network pass.

    Shapes: ``x`` is ``(..., features)``; the context ``(..., context_features)``
    broadcasts with it.

    Args:
        features: :math:`D`.
        transform_map: an :class:`~pyro_flows.transforms.maps.ElementwiseMap`.
        mask: boolean ``(D,)``, ``True`` for transformed features
            (default: the second half).
        hidden: widths of the conditioner's hidden layers.
        context_features: context size (conditional twin only).
        activation, residual: passed to :class:`~pyro_flows.nn.MLP`.

    Example:
        >>> layer = Coupling(4, Affine())
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4))
    """

    def __init__(
        self,
        features: int,
        transform_map: ElementwiseMap,
        mask: Optional[Tensor] = None,
        hidden: Sequence[int] = (64, 64),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        residual: bool = False,
    ) -> None:
        super().__init__((features,), context_features)
        mask = torch.arange(features) >= features // 2 if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (features,) or not mask.any():
            raise ValueError(f"{type(self).__name__}: mask must be a boolean ({features},) with a True entry")
        self.transform_map = transform_map
        self.register_buffer("identity_index", torch.nonzero(~mask).flatten(), persistent=False)
        self.register_buffer("transformed_index", torch.nonzero(mask).flatten(), persistent=False)
        self.num_transformed = int(mask.sum())
        self.conditioner = MLP(
            features - self.num_transformed,
            self.num_transformed * transform_map.num_params,
            hidden,
            context_features,
            activation,
            residual,
        )

    def _couple(self, x: Tensor, context: Optional[Tensor], inverse: bool) -> tuple[Tensor, Tensor]:
        params = self.conditioner(x.index_select(-1, self.identity_index), context)
        x = x.expand(params.shape[:-1] + x.shape[-1:])  # broadcast with the context's batch
        params = params.unflatten(-1, (self.transform_map.num_params, self.num_transformed)).movedim(-2, 0)
        apply = self.transform_map.inverse if inverse else self.transform_map.forward
        y_transformed, log_derivative = apply(x.index_select(-1, self.transformed_index), params)
        return x.index_copy(-1, self.transformed_index, y_transformed), log_derivative.sum(-1)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transform_map={self.transform_map!r}"


class AdditiveCoupling(Coupling):
    """NICE's additive coupling (Dinh et al. 2015): :class:`Coupling` with a :class:`~.maps.Shift`.

    Volume preserving: the log-det is zero. Example: ``AdditiveCoupling(4)``.
    """

    def __init__(self, features: int, **kwargs) -> None:
        super().__init__(features, Shift(), **kwargs)


class AffineCoupling(Coupling):
    """RealNVP's affine coupling (Dinh et al. 2017): :class:`Coupling` with an :class:`~.maps.Affine` map.

    Example: ``AffineCoupling(4, hidden=(64, 64), log_scale_bound=3.0)``.
    """

    def __init__(self, features: int, log_scale_bound: float = 3.0, **kwargs) -> None:
        super().__init__(features, Affine(log_scale_bound), **kwargs)


class SplineCoupling(Coupling):
    """Neural spline coupling (Durkan et al. 2019): :class:`Coupling` with a rational-quadratic spline.

    Example: ``SplineCoupling(4, bins=8, bound=5.0)``.
    """

    def __init__(self, features: int, bins: int = 8, bound: float = 5.0, **kwargs) -> None:
        super().__init__(features, RationalQuadraticSpline(bins, bound), **kwargs)


class ConditionalCoupling(Conditional, Coupling):
    """:class:`Coupling` whose conditioner also sees a context.

    Example: ``ConditionalCoupling(4, Affine(), context_features=3)``.
    """


class ConditionalAdditiveCoupling(Conditional, AdditiveCoupling):
    """Conditional twin of :class:`AdditiveCoupling` (needs ``context_features``)."""


class ConditionalAffineCoupling(Conditional, AffineCoupling):
    """Conditional twin of :class:`AffineCoupling` (needs ``context_features``)."""


class ConditionalSplineCoupling(Conditional, SplineCoupling):
    """Conditional twin of :class:`SplineCoupling` (needs ``context_features``)."""
