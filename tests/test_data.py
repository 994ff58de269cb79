"""Built-in data sets: shapes, ranges, determinism."""

from __future__ import annotations

import gzip
import math
import struct
import sys
import types
import urllib.error

import pytest
import torch

from pyro_flows.data import (
    DIGITS_LEVELS,
    IDX_FILES,
    digit_images,
    digits,
    mnist,
    read_idx,
    ring_mixture,
    two_moons,
    upscaled_digits,
)


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


def test_upscaled_digits_are_the_digits_at_28x28():
    images, labels = upscaled_digits()
    small, small_labels = digit_images()
    assert images.shape == (1797, 1, 28, 28) and images.dtype == torch.get_default_dtype()
    assert torch.equal(labels, small_labels)
    assert torch.equal(images, images.round()) and images.min() == 0 and images.max() == DIGITS_LEVELS - 1
    # bilinear resizing keeps each image's mean intensity (up to the borders and rounding)
    ratio = images.mean((1, 2, 3)) / small.mean((1, 2, 3))
    assert ((ratio - 1).abs() < 0.02).all()
    wide, _ = upscaled_digits(levels=256)
    assert torch.equal(wide, wide.round()) and wide.max() == 255
    assert ((wide.mean((1, 2, 3)) / (small.mean((1, 2, 3)) * 255 / 16) - 1).abs() < 0.01).all()
    assert upscaled_digits(16)[0].shape == (1797, 1, 16, 16)
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        upscaled_digits(4)
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        upscaled_digits(levels=1)


def write_idx(path, values: torch.Tensor, compress: bool) -> None:
    data = bytes([0, 0, 8, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    data += values.to(torch.uint8).numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_a_local_copy_of_the_idx_files_without_torchvision(monkeypatch, tmp_path, layout, compress):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not needed
    pixels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8, generator=seeded())
    targets = torch.tensor([9, 0, 0, 3])
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    suffix = ".gz" if compress else ""
    images_file, labels_file = IDX_FILES[False]
    write_idx(folder / (images_file + suffix), pixels, compress)
    write_idx(folder / (labels_file + suffix), targets, compress)
    images, labels = mnist(tmp_path, fashion=True, train=False)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.get_default_dtype()
    assert torch.equal(images[:, 0], pixels.to(images.dtype)) and torch.equal(labels, targets)
    assert torch.equal(read_idx(folder / (labels_file + suffix)), targets.to(torch.uint8))
    with pytest.raises(RuntimeError, match="needs torchvision"):  # the training files are not there
        mnist(tmp_path, fashion=True, train=True)


def test_read_idx_names_a_file_that_is_not_idx(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(bad)
    short = tmp_path / "y-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes(3))
    with pytest.raises(ValueError, match=r"3 bytes of data for the shape \(5,\)"):
        read_idx(short)


def test_mnist_with_one_label_too_few_says_so(tmp_path):
    write_idx(tmp_path / IDX_FILES[True][0], torch.zeros(3, 28, 28), False)
    write_idx(tmp_path / IDX_FILES[True][1], torch.zeros(2), False)
    with pytest.raises(ValueError, match="not one label per 2-D image"):
        mnist(tmp_path)
