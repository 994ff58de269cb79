"""pyro_flows: normalizing flows for Pyro."""

from . import data, diagnostics, infer, nn, transforms
from .dequantization import Dequantized, DequantizedDistribution, VariationalDequantizer
from .diagnostics import bits_per_dim, nats_per_dim
from .estimator import DensityEstimator
from .flows import CNF, FFJORD, IAF, MAF, NICE, NSF, Flow, FlowDistribution, Glow, RealNVP, StandardNormal
from .objectives import CNFRegularizedNLL, FlowMatching, NegativeLogLikelihood, reflow_pairs
from .train import FitHistory, fit
from .transforms.continuous import fixed_steps

__version__ = "0.1.0"

__all__ = [
    "Glow",
    "VariationalDequantizer",
    "DequantizedDistribution",
    "Dequantized",
    "bits_per_dim",
    "CNF",
    "CNFRegularizedNLL",
    "DensityEstimator",
    "data",
    "diagnostics",
    "infer",
    "FFJORD",
    "fit",
    "fixed_steps",
    "reflow_pairs",
    "FlowMatching",
    "FitHistory",
    "NegativeLogLikelihood",
    "IAF",
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
