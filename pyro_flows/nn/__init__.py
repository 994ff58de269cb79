"""Conditioner networks. They know nothing about bijections."""

from .made import MADE, MaskedLinear
from .mlp import MLP

__all__ = ["MADE", "MLP", "MaskedLinear"]
