"""Inference with flows: variational guides for Pyro models and simulation-based inference."""

from .guides import AmortizedFlowGuide, AutoFlowGuide
from .sbi import NPE, AtomicProposalLoss, NPEPosterior, PosteriorEstimator, PosteriorFlowMatching
from .simulation import simulate

__all__: list[str] = [
    "AmortizedFlowGuide",
    "AtomicProposalLoss",
    "AutoFlowGuide",
    "NPE",
    "NPEPosterior",
    "PosteriorEstimator",
    "PosteriorFlowMatching",
    "simulate",
]
