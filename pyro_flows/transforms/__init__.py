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
)
from .linear import LULinear, LUWeight, Permute
from .maps import Affine, RationalQuadraticSpline, Shift
from .normalization import ActNorm, BatchNorm, Standardize

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "Affine",
    "AffineAutoregressive",
    "AffineCoupling",
    "Autoregressive",
    "BatchNorm",
    "Conditional",
    "ConditionalAdditiveCoupling",
    "ConditionalAffineAutoregressive",
    "ConditionalAffineCoupling",
    "ConditionalAutoregressive",
    "ConditionalContinuousFlow",
    "ConditionalCoupling",
    "ConditionalInverse",
    "ConditionalSplineAutoregressive",
    "ConditionalSplineCoupling",
    "ConditionedTransform",
    "ContinuousFlow",
    "Coupling",
    "FlowTransform",
    "Inverse",
    "LULinear",
    "LUWeight",
    "Permute",
    "RationalQuadraticSpline",
    "Shift",
    "SplineAutoregressive",
    "SplineCoupling",
    "Standardize",
    "maps",
]
