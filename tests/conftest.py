"""Shared helpers for the transform tests (small on purpose)."""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

# Tiny tensors: one intra-op thread per test process (pytest -n workers would otherwise oversubscribe the cores,
# which makes these tests ~20x slower).
torch.set_num_threads(1)

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
"""The devices of the device-parametrised tests: the CPU always, CUDA where there is one (no skipped cases)."""


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each device of :data:`DEVICES` in turn: a test taking ``device`` runs once per device present."""
    return request.param


@pytest.fixture(autouse=True)
def _distribution_validation_restored():
    """Each test starts with the process's torch.distributions argument validation as the session began: importing
    a peer (zuko) switches it off process-wide, which would silently change later tests' error checks."""
    before = torch.distributions.Distribution._validate_args
    yield
    torch.distributions.Distribution.set_default_validate_args(before)


# Tolerances of the exact (round-trip, fused-vs-Pyro) checks.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@torch.no_grad()
def perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Add seeded Gaussian noise to every parameter, so zero-initialised last layers stop being the identity."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))
    return module


def per_sample_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Jacobians ``d fn(x)_b / d x_b`` of shape ``(n, D, D)`` for ``x`` of shape ``(n, D)``.

    Computed by autograd over the whole batch; also asserts that samples do not
    interact (the cross-sample blocks are exactly zero).
    """
    n, d = x.shape
    full = torch.autograd.functional.jacobian(fn, x)  # (n, D, n, D)
    assert full.shape == (n, d, n, d)
    index = torch.arange(n)
    blocks = full[index, :, index, :]  # (n, D, D)
    off = full.clone()
    off[index, :, index, :] = 0
    assert off.abs().max() == 0, "samples of a batch must not interact"
    return blocks


def slogdet_ladj(fn, x: torch.Tensor) -> torch.Tensor:
    """``log|det d fn / dx|`` per sample by autograd, shape ``(n,)``."""
    sign, logabsdet = torch.linalg.slogdet(per_sample_jacobian(fn, x))
    assert (sign != 0).all(), "singular Jacobian"
    return logabsdet


@functools.cache
def load_benchmark(name: str) -> types.ModuleType:
    """Import ``benchmarks/<name>.py`` (not a package) as a module, once."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
