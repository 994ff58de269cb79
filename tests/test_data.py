"""Built-in data sets: shapes, ranges, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_flows.data import DIGITS_LEVELS, digits, ring_mixture, two_moons


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("make", [two_moons, ring_mixture])
def test_2d_sets_are_deterministic_with_a_generator(make):
    first, second = make(500, generator=seeded()), make(500, generator=seeded())
    assert first.shape == (500, 2) and first.dtype == torch.get_default_dtype()
    assert torch.equal(first, second)
    assert not torch.equal(first, make(500, generator=seeded(1)))


def test_two_moons_lie_near_the_half_circles():
    x = two_moons(4000, noise=0.0, generator=seeded())
    upper = (x[:, 0] ** 2 + x[:, 1] ** 2).sqrt()
    lower = ((x[:, 0] - 1) ** 2 + (x[:, 1] - 0.5) ** 2).sqrt()
    assert torch.minimum((upper - 1).abs(), (lower - 1).abs()).max() < 1e-5


def test_ring_mixture_modes_are_on_the_circle_and_equally_used():
    x = ring_mixture(8000, rings=8, radius=2.0, noise=0.05, generator=seeded())
    assert ((x.norm(dim=-1) - 2.0).abs() < 0.4).all()
    mode = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (2 * math.pi / 8)).remainder(8).long()
    counts = torch.bincount(mode, minlength=8).float()
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000
    assert ring_mixture(10, rings=3, generator=seeded()).shape == (10, 2)
    with pytest.raises(ValueError, match="rings"):
        ring_mixture(10, rings=0)


def test_digits_dequantised_in_unit_interval_and_recovers_levels():
    x, y = digits(generator=seeded())
    assert x.shape == (1797, 64) and y.shape == (1797,) and y.dtype == torch.long
    assert set(y.tolist()) == set(range(10))
    assert x.min() >= 0.0 and x.max() < 1.0
    raw, raw_y = digits(dequantize=False)
    assert torch.equal(y, raw_y)
    assert raw.min() == 0 and raw.max() == DIGITS_LEVELS - 1 and torch.equal(raw, raw.round())
    # each dequantised value lies in its level's cell [k / 17, (k + 1) / 17)
    assert torch.equal(torch.floor(x.double() * DIGITS_LEVELS), raw.double())


def test_digits_dequantisation_is_deterministic_with_a_generator():
    first, _ = digits(generator=seeded())
    assert torch.equal(first, digits(generator=seeded())[0])
    assert not torch.equal(first, digits(generator=seeded(1))[0])
