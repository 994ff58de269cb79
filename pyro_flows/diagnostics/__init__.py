"""Diagnostics: likelihoods per dimension, ArviZ conversion and PSIS for VI guides, calibration for SBI."""

from .calibration import SBCResult, c2st, expected_coverage, sbc
from .density import bits_per_dim, nats_per_dim
from .vi import PSISReport, psis, to_inference_data

__all__ = [
    "bits_per_dim",
    "c2st",
    "expected_coverage",
    "nats_per_dim",
    "SBCResult",
    "sbc",
    "PSISReport",
    "psis",
    "to_inference_data",
]
