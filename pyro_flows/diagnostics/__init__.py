"""Diagnostics: likelihoods per dimension, ArviZ conversion and PSIS for VI guides, calibration for SBI."""

from .density import bits_per_dim, nats_per_dim

__all__ = ["bits_per_dim", "nats_per_dim"]
