"""Modules users hold: FF layers and the containers that stack them."""

from .layer import GoodnessOverflowError
from .linear import FFLinear
from .local2d import FFLocal2d
from .peer_norm import PeerNormalization
from .recurrent import FFRecurrent
from .sequential import FFSequential

__all__ = ["FFLinear", "FFLocal2d", "FFRecurrent", "FFSequential", "GoodnessOverflowError", "PeerNormalization"]
