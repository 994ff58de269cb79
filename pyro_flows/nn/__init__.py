"""Conditioner networks. They know nothing about bijections."""

from .cnn import CNN, AlignedContext, ClassEmbedding, pack_context
from .made import MADE, MaskedLinear
from .mlp import MLP
from .unet import UNet
from .vector_field import ConcatSquashLinear, ResidualVectorField, VectorField
from .wavenet import WaveNet

__all__ = [
    "AlignedContext",
    "CNN",
    "ClassEmbedding",
    "pack_context",
    "MADE",
    "MLP",
    "UNet",
    "ConcatSquashLinear",
    "MaskedLinear",
    "ResidualVectorField",
    "VectorField",
    "WaveNet",
]
