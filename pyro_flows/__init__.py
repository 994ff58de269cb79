"""pyro_flows: normalizing flows for Pyro."""

from . import nn, transforms
from .flows import IAF, MAF, NICE, NSF, Flow, FlowDistribution, RealNVP, StandardNormal
from .train import fit

__version__ = "0.1.0"

__all__ = [
    "fit",
    "IAF",
    "MAF",
    "NICE",
    "NSF",
    "Flow",
    "FlowDistribution",
    "RealNVP",
    "StandardNormal",
    "nn",
    "transforms",
]
