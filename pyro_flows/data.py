"""Built-in data sets: generated on the fly or shipped with scikit-learn (nothing is downloaded)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .dequantization import uniform_dequantize
from .utils import PathLike, require

DIGITS_LEVELS = 17
"""Grey levels of scikit-learn's digits (integers ``0..16``): pass as ``levels`` to bits/dim of the discrete data."""


def two_moons(n: int, noise: float = 0.1, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` points ``(n, 2)`` from the two interleaving half circles, with Gaussian noise.

    Example:
        >>> two_moons(500, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([500, 2])
    """
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack((x, y), dim=-1) + noise * torch.randn(n, 2, generator=generator)
    return points.to(torch.get_default_dtype())


def ring_mixture(
    n: int,
    rings: int = 8,
    radius: float = 2.0,
    noise: float = 0.1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``n`` points ``(n, 2)`` from an equal mixture of ``rings`` Gaussians (std ``noise``) spaced evenly on a circle.

    With the defaults, the classic "8 Gaussians" benchmark: eight modes at
    radius 2, separated by low-density gaps a unimodal model cannot represent.

    Example:
        >>> x = ring_mixture(1000)
        >>> x.shape, round(x.norm(dim=-1).mean().item())
        (torch.Size([1000, 2]), 2)
    """
    if rings < 1:
        raise ValueError(f"ring_mixture: rings must be at least 1, got {rings}")
    component = torch.randint(rings, (n,), generator=generator)
    angle = component.to(torch.float64) * (2 * math.pi / rings)
    centres = radius * torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
    points = centres + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points.to(torch.get_default_dtype())


def digits(dequantize: bool = True, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 handwritten digits: images ``X`` ``(1797, 64)`` and labels ``y`` ``(1797,)``.

    Needs scikit-learn (``pip install "pyro-flows[sklearn]"``); without it, an ImportError says so.
    The pixels are integers in ``0..16`` (:data:`DIGITS_LEVELS` = 17 grey levels).
    With ``dequantize=True`` (default) they become ``(x + u) / 17`` with
    ``u ~ U[0, 1)``: continuous values in ``[0, 1)`` whose density bounds the
    discrete likelihood, so ``bits_per_dim(X, levels=DIGITS_LEVELS)`` is the
    discrete data's. With ``dequantize=False`` the raw integer levels come back.

    Example:
        >>> X, y = digits()
        >>> X.shape, y.shape, bool((X >= 0).all() and (X < 1).all())
        (torch.Size([1797, 64]), torch.Size([1797]), True)
    """
    images, labels = require("sklearn.datasets", "pf.data.digits").load_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float64)
    x = uniform_dequantize(x, DIGITS_LEVELS, generator) if dequantize else x.to(torch.get_default_dtype())
    return x, torch.as_tensor(labels, dtype=torch.long)


def digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as integer images: ``X`` ``(1797, 1, 8, 8)`` with values ``0..16`` and labels ``(1797,)``.

    The pixels are whole numbers in the default float dtype: the input of an image
    flow with ``pixel_levels=DIGITS_LEVELS`` (e.g. ``pf.Glow``), which dequantises them itself.

    Example:
        >>> images, labels = digit_images()
        >>> images.shape, int(images.max()), labels[:5].tolist()
        (torch.Size([1797, 1, 8, 8]), 16, [0, 1, 2, 3, 4])
    """
    images, labels = digits(dequantize=False)
    return images.reshape(-1, 1, 8, 8), labels


def upscaled_digits(size: int = 28, levels: int = DIGITS_LEVELS) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits resized to ``size×size``: a built-in stand-in for MNIST-sized images.

    Each 8×8 image of :func:`digit_images` (levels 0..16) is resized bilinearly, scaled to ``0 .. levels - 1``
    and rounded: ``X`` ``(1797, 1, size, size)``, whole numbers in the default float dtype (for
    ``pixel_levels=levels``: the digits' own 17 grey levels by default, 256 for MNIST's range), and the labels
    ``(1797,)``. Not MNIST: 1,797 smooth, blurred digits, so bits/dim on them are not comparable with published
    MNIST or FashionMNIST numbers; use it where no copy of those is at hand (tests, CI). Needs scikit-learn, as
    :func:`digits` does.

    Example:
        >>> images, labels = upscaled_digits()
        >>> images.shape, int(images.min()), int(images.max()), bool((images == images.round()).all())
        (torch.Size([1797, 1, 28, 28]), 0, 16, True)
        >>> int(upscaled_digits(levels=256)[0].max())
        255
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"upscaled_digits: size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"upscaled_digits: levels must be an integer >= 2, got {levels!r}")
    images, labels = digit_images()
    resized = torch.nn.functional.interpolate(images.double(), size=(size, size), mode="bilinear")
    pixels = (resized * ((levels - 1) / (DIGITS_LEVELS - 1))).round().clamp(0, levels - 1)
    return pixels.to(torch.get_default_dtype()), labels


IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The IDX files of (Fashion)MNIST's training (``True``) and test (``False``) images and labels."""


def read_idx(path: PathLike) -> Tensor:
    """An IDX file of unsigned bytes (LeCun's MNIST format; ``.gz`` files are decompressed) as a ``uint8`` tensor.

    Raises a ValueError naming the file when it is not such a file or its size does not match its header.
    """
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise ValueError(f"read_idx: {path} is not an IDX file of unsigned bytes (its header is {data[:4]!r})")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    if len(data) != 4 + 4 * dims + math.prod(shape):
        raise ValueError(f"read_idx: {path} has {len(data) - 4 - 4 * dims} bytes of data for the shape {shape}")
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def _idx_file(root: PathLike, name: str, stem: str) -> Optional[Path]:
    """``stem`` (or ``stem.gz``) in ``root`` or in torchvision's ``root/<name>/raw``, if there."""
    for folder in (Path(root), Path(root) / name / "raw"):
        for file in (folder / stem, folder / f"{stem}.gz"):
            if file.is_file():
                return file
    return None


def mnist(root: PathLike, fashion: bool = False, train: bool = True, download: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST (or FashionMNIST): ``X`` ``(N, 1, 28, 28)`` with values ``0..255`` and labels ``(N,)``.

    A local copy of the IDX files (``train-images-idx3-ubyte`` ..., gzipped or not) in ``root`` itself (as
    Zalando's repository or Debian's ``dataset-fashion-mnist`` package lays them out) or in ``root/MNIST/raw``
    / ``root/FashionMNIST/raw`` (torchvision's layout) is read directly, with no torchvision and no download.
    Otherwise the data come through torchvision, which needs ``torchvision`` and, unless ``download=False``
    and the files are in ``root``, internet access; either missing raises a RuntimeError that says so.
    Use with ``pixel_levels=256``.
    """
    name = "FashionMNIST" if fashion else "MNIST"
    files = [_idx_file(root, name, stem) for stem in IDX_FILES[bool(train)]]
    if files[0] is not None and files[1] is not None:
        pixels, targets = read_idx(files[0]), read_idx(files[1])
        if pixels.dim() != 3 or targets.shape != pixels.shape[:1]:
            raise ValueError(
                f"mnist: {files[0]} holds images of shape {tuple(pixels.shape)} and {files[1]} labels of shape "
                f"{tuple(targets.shape)}: not one label per 2-D image"
            )
        return pixels.to(torch.get_default_dtype()).unsqueeze(1), targets.long()
    try:
        import torchvision
    except ImportError:
        raise RuntimeError(f"mnist: loading {name} needs torchvision (pip install 'pyro-flows[vision]')") from None
    try:
        dataset = getattr(torchvision.datasets, name)(root, train=train, download=download)
    except Exception as error:  # torchvision raises URLError, RuntimeError, ... depending on what failed
        raise RuntimeError(
            f"mnist: could not load {name} into {root!r} ({type(error).__name__}: {error}); it must be downloadable "
            "from here, or already be in root (download=False reads it from there)"
        ) from error
    images = dataset.data.to(torch.get_default_dtype()).unsqueeze(1)
    return images, dataset.targets.long()
