"""Conditioner networks. They know nothing about bijections."""

from .made import MADE, MaskedLinear
from .mlp import MLP
from .vector_field import ConcatSquashLinear, VectorField

__all__ = ["MADE", "MLP", "ConcatSquashLinear", "MaskedLinear", "VectorField"]
