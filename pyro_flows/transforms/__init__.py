"""Bijective layers. Every class is a Pyro ``TransformModule`` (conditional twins are also
``ConditionalTransformModule``) mapping base space to data space."""

from . import maps
from .autoregressive import (
    AffineAutoregressive,
    Autoregressive,
    ConditionalAffineAutoregressive,
    ConditionalAutoregressive,
    ConditionalSplineAutoregressive,
    SplineAutoregressive,
)
from .base import Conditional, ConditionalInverse, ConditionedTransform, FlowTransform, Inverse
from .continuous import ConditionalContinuousFlow, ContinuousFlow
from .coupling import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalAffineCoupling,
    ConditionalCoupling,
    ConditionalSplineCoupling,
    Coupling,
    SplineCoupling,
    channel_mask,
    checkerboard_mask,
)
from .linear import InvertibleConv1x1, LULinear, LUWeight, Permute
from .maps import Affine, RationalQuadraticSpline, Shift
from .multiscale import Chain, ConditionalChain, ConditionalFactorOut, FactorOut, Squeeze
from .normalization import ActNorm, BatchNorm, Standardize
from .preprocessing import Logit
from .signals import Squeeze1d

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "Affine",
    "AffineAutoregressive",
    "AffineCoupling",
    "Autoregressive",
    "BatchNorm",
    "Chain",
    "channel_mask",
    "checkerboard_mask",
    "Conditional",
    "ConditionalAdditiveCoupling",
    "ConditionalAffineAutoregressive",
    "ConditionalAffineCoupling",
    "ConditionalAutoregressive",
    "ConditionalChain",
    "ConditionalContinuousFlow",
    "ConditionalCoupling",
    "ConditionalFactorOut",
    "ConditionalInverse",
    "ConditionalSplineAutoregressive",
    "ConditionalSplineCoupling",
    "ConditionedTransform",
    "ContinuousFlow",
    "Coupling",
    "FactorOut",
    "FlowTransform",
    "Inverse",
    "InvertibleConv1x1",
    "Logit",
    "LULinear",
    "LUWeight",
    "maps",
    "Permute",
    "RationalQuadraticSpline",
    "Shift",
    "SplineAutoregressive",
    "SplineCoupling",
    "Squeeze",
    "Squeeze1d",
    "Standardize",
]
