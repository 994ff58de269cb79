"""Inference with flows: variational guides for Pyro models and simulation-based inference."""

from .guides import AmortizedFlowGuide, AutoFlowGuide

__all__: list[str] = ["AmortizedFlowGuide", "AutoFlowGuide"]
