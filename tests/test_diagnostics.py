"""Tests of ``pyro_flows.diagnostics``: nats and bits per dimension against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyro_flows as pf
from pyro_flows import bits_per_dim, nats_per_dim


def test_nats_per_dim_is_minus_mean_over_dims():
    log_prob = [-3.0, -5.0, -10.0]  # mean -6, D = 4
    assert nats_per_dim(log_prob, 4) == pytest.approx(1.5, abs=1e-15)


@pytest.mark.parametrize(
    "log_prob",
    [np.array([-3.0, -5.0, -10.0]), torch.tensor([-3.0, -5.0, -10.0]), [-3.0, -5.0, -10.0], (-6.0,), -6.0],
    ids=["numpy", "torch", "list", "tuple", "float"],
)
def test_every_input_type_gives_the_same_value(log_prob):
    assert bits_per_dim(log_prob, 3) == pytest.approx(6.0 / (3 * math.log(2)), rel=1e-12)


def test_bits_per_dim_of_a_uniform_density_counts_bits():
    # Uniform on [0, 1/2)^5 has density 2^5: log p = 5 log 2, i.e. -1 bit per dimension.
    assert bits_per_dim(torch.full((10,), 5 * math.log(2), dtype=torch.float64), 5) == pytest.approx(-1.0, abs=1e-12)
    # Uniform on [0, 4)^3: density 4^-3, 2 bits per dimension.
    assert bits_per_dim(np.full(7, -3 * math.log(4)), 3) == pytest.approx(2.0, abs=1e-12)


def test_bits_per_dim_with_levels_is_the_discrete_bound():
    # Uniform dequantised 8-bit data: p = 1 on [0, 1)^D, so P(x) = 256^-D exactly: 8 bits/dim.
    assert bits_per_dim(np.zeros(4), 12, levels=256) == pytest.approx(8.0, abs=1e-12)
    # A density on the integer scale x + u (log q) equals one on the [0, 1) scale minus D log L:
    # log p((x + u) / L) = log q(x + u) + D log L, and both conventions give the same bits/dim.
    dims, levels = 6, 17
    rng = np.random.default_rng(0)
    log_q = rng.normal(-20.0, 2.0, size=50)
    log_p_unit = log_q + dims * math.log(levels)
    by_hand = -log_q.mean() / (dims * math.log(2))
    assert bits_per_dim(log_p_unit, dims, levels=levels) == pytest.approx(by_hand, rel=1e-12)
    assert bits_per_dim(log_q, dims) == pytest.approx(by_hand, rel=1e-12)


def test_bits_are_nats_over_log_two_and_gradients_are_not_needed():
    log_prob = torch.randn(20, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert bits_per_dim(log_prob, 2) == pytest.approx(nats_per_dim(log_prob, 2) / math.log(2), rel=1e-12)


def test_means_over_every_entry_of_a_matrix():
    log_prob = np.array([[-1.0, -2.0], [-3.0, -6.0]])
    assert nats_per_dim(log_prob, 1) == pytest.approx(3.0, abs=1e-15)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: nats_per_dim([], 2), "empty"),
        (lambda: nats_per_dim([-1.0, float("nan")], 2), "NaN or inf"),
        (lambda: bits_per_dim([-1.0, -float("inf")], 2), "NaN or inf"),
        (lambda: nats_per_dim([-1.0], 0), "dims must be a positive integer"),
        (lambda: nats_per_dim([-1.0], 2.5), "dims must be a positive integer"),
        (lambda: bits_per_dim([-1.0], 2, levels=1), "levels must be an integer >= 2"),
        (lambda: bits_per_dim([-1.0], 2, levels=25.6), "levels must be an integer >= 2"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_model_form_of_bits_per_dim_is_the_hand_computation_over_batches_in_eval_mode():
    """A fresh Glow: eval mode leaves its ActNorms uninitialised; the noise is drawn batch after batch."""
    torch.manual_seed(0)
    model = pf.Glow(shape=(1, 4, 4), levels=2, steps=1, hidden_channels=4, classes=3, pixel_levels=5)
    images, labels = torch.randint(0, 5, (10, 1, 4, 4)).float(), torch.randint(0, 3, (10,))
    torch.manual_seed(1)
    bits = bits_per_dim(model, images, context=labels, batch_size=4)
    assert model.training  # restored
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        log_prob = torch.cat([model(labels[k : k + 4]).log_prob(images[k : k + 4]) for k in (0, 4, 8)])
    assert math.isclose(bits, -log_prob.double().mean().item() / (16 * math.log(2)), rel_tol=1e-12)
    torch.manual_seed(1)
    assert math.isclose(nats_per_dim(model, images, context=labels, batch_size=4), bits * math.log(2), rel_tol=1e-12)
    # eval mode: the data did not initialise the ActNorm layers (training mode would have)
    assert not any(bool(m.initialized) for m in model.modules() if isinstance(m, pf.transforms.ActNorm))


def test_model_form_of_bits_per_dim_for_an_unconditional_continuous_flow():
    torch.manual_seed(0)
    flow = pf.RealNVP(3, transforms=2, hidden=(8,))
    x = torch.randn(7, 3)
    expected = -flow().log_prob(x).detach().double().mean().item() / (3 * math.log(2))
    assert math.isclose(bits_per_dim(flow, x), expected, rel_tol=1e-6)


@pytest.mark.parametrize(
    "data, context, message",
    [
        (torch.randn(5), None, "data must be a tensor of rows"),
        (torch.randn(5, 3), torch.randn(4, 2), "context must be a tensor with one row per data row"),
    ],
)
def test_model_form_bad_arguments_are_named(data, context, message):
    with pytest.raises(ValueError, match=message):
        bits_per_dim(pf.RealNVP(3, transforms=1, hidden=(4,)), data, context=context)
