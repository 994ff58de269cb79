"""Vector flows as configurations of the coupling and autoregressive structures:
:func:`NICE`, :func:`RealNVP`, :func:`MAF`, :func:`IAF` and :func:`NSF`."""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Transform

from .. import transforms as T
from ..nn.mlp import check_hidden
from .base import EMBEDDING_FEATURES, Flow, StandardNormal, check_vector_features, class_context
from .images import multiscale_realnvp

MIXING = ("alternate", "random", "lu")


def _mixing_layer(features: int, mixing: str) -> list[Transform]:
    if mixing == "random":
        return [T.Permute(features, "random")]
    if mixing == "lu":
        return [T.LULinear(features)]
    return []


def _stack(
    name: str,
    features: int,
    context: int,
    layer,
    conditional_layer,
    transforms: int,
    hidden: Sequence[int],
    mixing: str = "alternate",
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> Flow:
    """Build ``transforms`` layers (conditional twins if ``context`` or ``classes``); ``layer`` gets the layer index.

    Masks or orders alternate between layers; ``mixing="random"`` adds a random
    permutation between layers and ``mixing="lu"`` an :class:`~.transforms.LULinear`.
    ``classes`` puts a label embedding in front (:func:`~.base.class_context`).
    """
    features = check_vector_features(name, features)
    if isinstance(transforms, bool) or not isinstance(transforms, Integral) or transforms < 1:
        raise ValueError(f"{name}: transforms must be an integer >= 1, got {transforms!r}")
    if mixing not in MIXING:
        raise ValueError(f"{name}: mixing must be one of {MIXING}, got {mixing!r}")
    hidden = check_hidden(hidden, name)
    context, embedding = class_context(name, classes, context, embedding_features)
    make = conditional_layer if context else layer
    extra = {"context_features": context} if context else {}
    layers: list[Transform] = []
    for i in range(transforms):
        if i:
            layers += _mixing_layer(features, mixing)
        layers.append(make(i, hidden=hidden, **extra, **kwargs))
    return Flow(StandardNormal(features), layers, context, embedding)


def _alternating_order(features: int, i: int) -> Tensor:
    order = torch.arange(features)
    return order if i % 2 == 0 else order.flip(0)


def _coupling_flow(name, features, context, transforms, hidden, cls, ccls, **kwargs) -> Flow:
    def build(cls):
        return lambda i, **kw: cls(features, mask=T.channel_mask(features, i), **kw)

    return _stack(name, features, context, build(cls), build(ccls), transforms, hidden, **kwargs)


def _autoregressive_flow(name, features, context, transforms, hidden, cls, ccls, invert, **kwargs) -> Flow:
    def build(cls):
        def make(i, **kw):
            layer = cls(features, order=_alternating_order(features, i), **kw)
            return layer.inv if invert else layer

        return make

    return _stack(name, features, context, build(cls), build(ccls), transforms, hidden, **kwargs)


def NICE(
    features: int,
    context: int = 0,
    transforms: int = 4,
    hidden: Sequence[int] = (64, 64),
    *,
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> Flow:
    r"""NICE (Dinh et al. 2015): additive couplings with alternating masks, then a diagonal scaling.

    The couplings are volume preserving; the scaling next to the base (an
    :class:`~.transforms.ActNorm`, initialised from the first batch) is what
    lets the flow match the data's scale, as NICE's final scaling layer does.

    Conditioning (as in every vector flow): ``context=F`` makes ``flow(c)`` take context vectors
    ``c`` of shape ``(..., F)``; ``classes=K`` makes it take integer labels ``y`` of shape ``(...)``
    in ``0 .. K-1``, embedded by a learned :class:`~.nn.ClassEmbedding` of ``embedding_features``
    (see :func:`~.base.class_context`). Not both. The distribution's batch shape is ``(...)``.

    References
    ----------
    - L. Dinh, D. Krueger and Y. Bengio.
      *NICE: Non-linear Independent Components Estimation*. ICLR 2015 workshop.
      `arXiv:1410.8516 <https://arxiv.org/abs/1410.8516>`__

    Example:
        >>> flow = NICE(features=2)
        >>> flow().log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
        >>> NICE(features=2, classes=3)(torch.tensor([0, 2])).sample((5,)).shape
        torch.Size([5, 2, 2])
    """
    flow = _coupling_flow(
        "NICE",
        features,
        context,
        transforms,
        hidden,
        T.AdditiveCoupling,
        T.ConditionalAdditiveCoupling,
        classes=classes,
        embedding_features=embedding_features,
        **kwargs,
    )
    return Flow(flow.base, [T.ActNorm(features), *flow.transforms], flow.context_features, flow.embedding)


def RealNVP(
    features: Optional[int] = None,
    context: int = 0,
    transforms: int = 4,
    hidden: Sequence[int] = (64, 64),
    *,
    shape: Optional[Sequence[int]] = None,
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> nn.Module:
    r"""RealNVP (Dinh et al. 2017): affine couplings with alternating masks.

    Vectors: ``RealNVP(features, context, transforms, hidden, classes=None, embedding_features=16)``,
    couplings with alternating halves; ``context`` / ``classes`` condition it as in :func:`NICE`.

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
        >>> RealNVP(features=2, classes=10)(torch.tensor(7)).log_prob(torch.randn(4, 2)).shape
        torch.Size([4])
        >>> RealNVP(shape=(1, 8, 8), pixel_levels=17)().sample((4,)).shape
        torch.Size([4, 1, 8, 8])
    """
    if shape is not None:
        if features is not None:
            raise ValueError("RealNVP: give features (vectors) or shape= (images), not both")
        return multiscale_realnvp(
            shape, context=context, hidden=hidden, classes=classes, embedding_features=embedding_features, **kwargs
        )
    if features is None:
        raise ValueError("RealNVP: give features (vectors) or shape= (images)")
    return _coupling_flow(
        "RealNVP",
        features,
        context,
        transforms,
        hidden,
        T.AffineCoupling,
        T.ConditionalAffineCoupling,
        classes=classes,
        embedding_features=embedding_features,
        **kwargs,
    )


def MAF(
    features: int,
    context: int = 0,
    transforms: int = 5,
    hidden: Sequence[int] = (64, 64),
    *,
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> Flow:
    r"""Masked autoregressive flow (Papamakarios et al. 2017): density evaluation in one pass per layer.

    Each layer is ``AffineAutoregressive(...).inv``, orders alternate between layers;
    sampling inverts each layer sequentially (exactly). ``context`` / ``classes`` condition
    it as in :func:`NICE`.

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
        >>> MAF(features=3, classes=4)(torch.tensor([[0, 1], [2, 3]])).log_prob(torch.randn(3)).shape
        torch.Size([2, 2])
    """
    return _autoregressive_flow(
        "MAF",
        features,
        context,
        transforms,
        hidden,
        T.AffineAutoregressive,
        T.ConditionalAffineAutoregressive,
        True,
        classes=classes,
        embedding_features=embedding_features,
        **kwargs,
    )


def IAF(
    features: int,
    context: int = 0,
    transforms: int = 5,
    hidden: Sequence[int] = (64, 64),
    *,
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> Flow:
    r"""Inverse autoregressive flow (Kingma et al. 2016): sampling in one pass per layer.

    Each layer is ``AffineAutoregressive(...)``; density evaluation of new points
    inverts it sequentially, while ``rsample_and_log_prob`` (VI) never does.
    ``context`` / ``classes`` condition it as in :func:`NICE`.

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
        "IAF",
        features,
        context,
        transforms,
        hidden,
        T.AffineAutoregressive,
        T.ConditionalAffineAutoregressive,
        False,
        classes=classes,
        embedding_features=embedding_features,
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
    *,
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> Flow:
    r"""Neural spline flow (Durkan et al. 2019): rational-quadratic splines with ``bins`` bins on ``[-bound, bound]``.

    ``autoregressive=True`` (default) stacks ``SplineAutoregressive(...).inv``
    (one-pass densities, like MAF); ``False`` stacks spline couplings with
    alternating masks (one-pass in both directions). ``context`` / ``classes``
    condition it as in :func:`NICE`.

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
        >>> NSF(features=4, classes=10)(torch.tensor([0, 3])).batch_shape
        torch.Size([2])
    """
    options = dict(bins=bins, bound=bound, classes=classes, embedding_features=embedding_features, **kwargs)
    if autoregressive:
        return _autoregressive_flow(
            "NSF",
            features,
            context,
            transforms,
            hidden,
            T.SplineAutoregressive,
            T.ConditionalSplineAutoregressive,
            True,
            **options,
        )
    return _coupling_flow(
        "NSF", features, context, transforms, hidden, T.SplineCoupling, T.ConditionalSplineCoupling, **options
    )
