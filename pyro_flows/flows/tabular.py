"""Vector flows as configurations of the coupling and autoregressive structures:
:func:`NICE`, :func:`RealNVP`, :func:`MAF`, :func:`IAF` and :func:`NSF`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Transform

from .. import transforms as T
from .base import Flow, StandardNormal
from .images import multiscale_realnvp

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


def _alternating_order(features: int, i: int) -> Tensor:
    order = torch.arange(features)
    return order if i % 2 == 0 else order.flip(0)


def _coupling_flow(features, context, transforms, hidden, cls, ccls, **kwargs) -> Flow:
    def build(cls):
        return lambda i, **kw: cls(features, mask=T.channel_mask(features, i), **kw)

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

    References
    ----------
    - L. Dinh, D. Krueger and Y. Bengio.
      *NICE: Non-linear Independent Components Estimation*. ICLR 2015 workshop.
      `arXiv:1410.8516 <https://arxiv.org/abs/1410.8516>`__

    Example:
        >>> flow = NICE(features=2)
        >>> flow().log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
    """
    flow = _coupling_flow(
        features, context, transforms, hidden, T.AdditiveCoupling, T.ConditionalAdditiveCoupling, **kwargs
    )
    return Flow(flow.base, [T.ActNorm(features), *flow.transforms], context)


def RealNVP(
    features: Optional[int] = None,
    context: int = 0,
    transforms: int = 4,
    hidden: Sequence[int] = (64, 64),
    *,
    shape: Optional[Sequence[int]] = None,
    **kwargs,
) -> nn.Module:
    r"""RealNVP (Dinh et al. 2017): affine couplings with alternating masks.

    Vectors: ``RealNVP(features, context, transforms, hidden)``, couplings with alternating halves.

    Images: ``RealNVP(shape=(C, H, W), levels=2, steps=3, hidden=(64, 64), classes=None,
    context=0, pixel_levels=256, dequantization="uniform", alpha=0.05)``, the paper's
    multi-scale model: data→base each level but the last applies ``steps`` checkerboard
    couplings, squeezes, ``steps`` channel-wise couplings and factors out half the channels
    (standard normal, no learned prior); the last level applies ``steps + 1`` checkerboard
    couplings. ActNorm precedes every coupling (in place of the paper's batch norm).
    ``classes``, ``context``, ``pixel_levels``, ``dequantization``, ``alpha`` and
    ``embedding_features`` are as in :func:`Glow` (integer pixels are dequantised, etc.).

    References
    ----------
    - L. Dinh, J. Sohl-Dickstein and S. Bengio.
      *Density estimation using Real NVP*. ICLR 2017.
      `arXiv:1605.08803 <https://arxiv.org/abs/1605.08803>`__

    Example:
        >>> RealNVP(features=2, context=3)(torch.randn(3)).sample((10,)).shape
        torch.Size([10, 2])
        >>> RealNVP(shape=(1, 8, 8), pixel_levels=17)().sample((4,)).shape
        torch.Size([4, 1, 8, 8])
    """
    if shape is not None:
        if features is not None:
            raise ValueError("RealNVP: give features (vectors) or shape= (images), not both")
        return multiscale_realnvp(shape, context=context, hidden=hidden, **kwargs)
    if features is None:
        raise ValueError("RealNVP: give features (vectors) or shape= (images)")
    return _coupling_flow(
        features, context, transforms, hidden, T.AffineCoupling, T.ConditionalAffineCoupling, **kwargs
    )


def MAF(features: int, context: int = 0, transforms: int = 5, hidden: Sequence[int] = (64, 64), **kwargs) -> Flow:
    r"""Masked autoregressive flow (Papamakarios et al. 2017): density evaluation in one pass per layer.

    Each layer is ``AffineAutoregressive(...).inv``, orders alternate between layers;
    sampling inverts each layer sequentially (exactly).

    References
    ----------
    - G. Papamakarios, T. Pavlakou and I. Murray.
      *Masked Autoregressive Flow for Density Estimation*. NeurIPS 2017.
      `arXiv:1705.07057 <https://arxiv.org/abs/1705.07057>`__
    - M. Germain, K. Gregor, I. Murray and H. Larochelle.
      *MADE: Masked Autoencoder for Distribution Estimation*. ICML 2015.
      `arXiv:1502.03509 <https://arxiv.org/abs/1502.03509>`__

    Example:
        >>> flow = MAF(features=3, transforms=2)
        >>> x = flow().sample((5,))
        >>> x.shape, flow().log_prob(x).shape
        (torch.Size([5, 3]), torch.Size([5]))
    """
    return _autoregressive_flow(
        features, context, transforms, hidden, T.AffineAutoregressive, T.ConditionalAffineAutoregressive, True, **kwargs
    )


def IAF(features: int, context: int = 0, transforms: int = 5, hidden: Sequence[int] = (64, 64), **kwargs) -> Flow:
    r"""Inverse autoregressive flow (Kingma et al. 2016): sampling in one pass per layer.

    Each layer is ``AffineAutoregressive(...)``; density evaluation of new points
    inverts it sequentially, while ``rsample_and_log_prob`` (VI) never does.

    References
    ----------
    - D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever and M. Welling.
      *Improved Variational Inference with Inverse Autoregressive Flow*. NeurIPS 2016.
      `arXiv:1606.04934 <https://arxiv.org/abs/1606.04934>`__
    - M. Germain, K. Gregor, I. Murray and H. Larochelle.
      *MADE: Masked Autoencoder for Distribution Estimation*. ICML 2015.
      `arXiv:1502.03509 <https://arxiv.org/abs/1502.03509>`__

    Example:
        >>> z, log_q = IAF(features=3, transforms=2)().rsample_and_log_prob((5,))
        >>> z.shape, log_q.shape
        (torch.Size([5, 3]), torch.Size([5]))
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

    References
    ----------
    - C. Durkan, A. Bekasov, I. Murray and G. Papamakarios.
      *Neural Spline Flows*. NeurIPS 2019.
      `arXiv:1906.04032 <https://arxiv.org/abs/1906.04032>`__

    Example:
        >>> NSF(features=5, context=3)(torch.randn(3)).rsample((100,)).shape
        torch.Size([100, 5])
        >>> NSF(features=5, autoregressive=False)().log_prob(torch.randn(7, 5)).shape
        torch.Size([7])
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
