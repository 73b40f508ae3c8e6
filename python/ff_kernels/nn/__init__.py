"""Modules users hold: FF layers and the containers that stack them."""

from .linear import FFLinear
from .sequential import FFSequential

__all__ = ["FFLinear", "FFSequential"]
