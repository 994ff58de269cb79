"""Built-in data sets: shapes, ranges, determinism."""

from __future__ import annotations

import math
import sys
import types
import urllib.error

import pytest
import torch

from pyro_flows.data import DIGITS_LEVELS, digit_images, digits, mnist, ring_mixture, two_moons


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


def test_digit_images_are_the_integer_digits_as_one_channel_images():
    images, labels = digit_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.get_default_dtype()
    raw, raw_labels = digits(dequantize=False)
    assert torch.equal(images.flatten(1), raw) and torch.equal(labels, raw_labels)
    assert torch.equal(images, images.round()) and images.min() == 0 and images.max() == DIGITS_LEVELS - 1
    # row-major 8x8: sklearn's first digit is a 0, whose centre column is blank and whose sides are inked
    assert labels[0] == 0 and images[0, 0, 3:5, 3:5].sum() < images[0, 0, 3:5, 1:3].sum()


def fake_torchvision(monkeypatch, dataset) -> None:
    """Install a stand-in ``torchvision`` whose MNIST and FashionMNIST datasets are ``dataset``."""
    datasets = types.SimpleNamespace(MNIST=dataset, FashionMNIST=dataset)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))


def test_mnist_without_torchvision_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(RuntimeError, match="needs torchvision"):
        mnist(str(tmp_path))


def test_mnist_that_cannot_be_downloaded_names_the_data_set_and_the_cause(monkeypatch, tmp_path):
    def offline(root, train, download):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    fake_torchvision(monkeypatch, offline)
    with pytest.raises(RuntimeError, match="could not load FashionMNIST.*URLError.*name resolution"):
        mnist(str(tmp_path), fashion=True)


def test_mnist_images_are_one_channel_integer_pixels(monkeypatch, tmp_path):
    pixels = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    targets = torch.tensor([3, 1, 4, 1, 5])
    calls = []

    def loaded(root, train, download):
        calls.append((root, train, download))
        return types.SimpleNamespace(data=pixels, targets=targets)

    fake_torchvision(monkeypatch, loaded)
    images, labels = mnist(str(tmp_path), train=False, download=False)
    assert calls == [(str(tmp_path), False, False)]
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.get_default_dtype()
    assert torch.equal(images[:, 0], pixels.to(images.dtype)) and torch.equal(labels, targets)
