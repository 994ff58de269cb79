"""pyro_flows: normalizing flows for Pyro."""

from . import data, diagnostics, infer, latent, nn, transforms
from .compiled import CompiledFlow, compile_flow
from .dequantization import Dequantized, DequantizedDistribution, VariationalDequantizer
from .diagnostics import bits_per_dim, nats_per_dim
from .estimator import DensityEstimator
from .flows import (
    CNF,
    FFJORD,
    IAF,
    MAF,
    NICE,
    NSF,
    Flow,
    FlowDistribution,
    Glow,
    ImageCNF,
    RealNVP,
    StandardNormal,
    WaveGlow,
    image_rows,
)
from .objectives import CNFRegularizedNLL, FlowMatching, NegativeLogLikelihood, guided_sample, reflow_pairs
from .train import FitHistory, fit
from .transforms.continuous import fixed_steps

__version__ = "0.1.0"

__all__ = [
    "Glow",
    "WaveGlow",
    "VariationalDequantizer",
    "DequantizedDistribution",
    "Dequantized",
    "bits_per_dim",
    "CNF",
    "CNFRegularizedNLL",
    "CompiledFlow",
    "compile_flow",
    "DensityEstimator",
    "data",
    "diagnostics",
    "infer",
    "latent",
    "FFJORD",
    "fit",
    "fixed_steps",
    "guided_sample",
    "reflow_pairs",
    "FlowMatching",
    "FitHistory",
    "NegativeLogLikelihood",
    "IAF",
    "ImageCNF",
    "image_rows",
    "MAF",
    "NICE",
    "NSF",
    "Flow",
    "FlowDistribution",
    "RealNVP",
    "StandardNormal",
    "nats_per_dim",
    "nn",
    "transforms",
]
