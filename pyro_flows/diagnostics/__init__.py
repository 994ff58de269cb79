"""Diagnostics: likelihoods per dimension, ArviZ conversion, PSIS and mode coverage for VI guides, SBI calibration,
distances between samples."""

from .calibration import SBCResult, c2st, expected_coverage, sbc
from .density import bits_per_dim, nats_per_dim
from .distances import sliced_wasserstein
from .vi import ModeCoverage, PSISReport, mode_coverage, psis, to_inference_data

__all__ = [
    "bits_per_dim",
    "c2st",
    "expected_coverage",
    "nats_per_dim",
    "SBCResult",
    "sbc",
    "sliced_wasserstein",
    "ModeCoverage",
    "mode_coverage",
    "PSISReport",
    "psis",
    "to_inference_data",
]
