"""Built-in data sets: generated on the fly or shipped with scikit-learn (nothing is downloaded)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .utils import require

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
    dtype = torch.get_default_dtype()
    x = torch.as_tensor(images, dtype=torch.float64)
    if dequantize:
        x = (x + torch.rand(x.shape, generator=generator, dtype=torch.float64)) / DIGITS_LEVELS
        below_one = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
        x = x.to(dtype).clamp(max=below_one)  # (16 + u) / 17 must not round up to 1 in float32
    return x.to(dtype), torch.as_tensor(labels, dtype=torch.long)


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


def mnist(root: str, fashion: bool = False, train: bool = True, download: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST (or FashionMNIST) through torchvision: ``X`` ``(N, 1, 28, 28)`` with values ``0..255`` and labels ``(N,)``.

    Needs ``torchvision`` and, unless the files are already in ``root``, internet
    access; either missing raises a RuntimeError that says so. Use with
    ``pixel_levels=256``.
    """
    name = "FashionMNIST" if fashion else "MNIST"
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
