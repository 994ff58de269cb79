"""Conditioner networks. They know nothing about bijections."""

from .cnn import CNN, ClassEmbedding
from .made import MADE, MaskedLinear
from .mlp import MLP
from .vector_field import ConcatSquashLinear, VectorField

__all__ = ["CNN", "ClassEmbedding", "MADE", "MLP", "ConcatSquashLinear", "MaskedLinear", "VectorField"]
