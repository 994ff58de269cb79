"""Diagnostics: likelihoods per dimension, ArviZ conversion and PSIS for VI guides, calibration for SBI."""

from .density import bits_per_dim, nats_per_dim
from .vi import PSISReport, psis, to_inference_data

__all__ = ["bits_per_dim", "nats_per_dim", "PSISReport", "psis", "to_inference_data"]
