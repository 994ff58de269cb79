"""Built-in data sets, generated on the fly (nothing is downloaded)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def two_moons(n: int, noise: float = 0.1, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` points ``(n, 2)`` from the two interleaving half circles, with Gaussian noise."""
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack((x, y), dim=-1) + noise * torch.randn(n, 2, generator=generator)
    return points.to(torch.get_default_dtype())
