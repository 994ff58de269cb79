"""Flows: :class:`Flow` (a base distribution and layers as one module) and the presets built on it."""

from .base import Flow, FlowDistribution, StandardNormal
from .continuous import CNF, FFJORD
from .image_cnf import ImageCNF, image_rows
from .images import Glow
from .registry import FLOWS, build_flow
from .signals import WaveGlow
from .tabular import IAF, MAF, MIXING, NICE, NSF, RealNVP

__all__ = [
    "CNF",
    "FFJORD",
    "FLOWS",
    "Flow",
    "FlowDistribution",
    "Glow",
    "IAF",
    "ImageCNF",
    "MAF",
    "MIXING",
    "NICE",
    "NSF",
    "RealNVP",
    "StandardNormal",
    "WaveGlow",
    "build_flow",
    "image_rows",
]
