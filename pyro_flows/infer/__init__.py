"""Inference with flows: variational guides for Pyro models and simulation-based inference."""

__all__: list[str] = []
