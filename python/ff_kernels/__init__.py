"""ff_kernels: Forward-Forward training (Hinton 2022) with fused kernels and a pure-torch reference.

    import ff_kernels
    layer = ff_kernels.FFLinear(784, 2000)
    loss = layer.ff_backward(x_pos, x_neg)   # local gradients into .grad
"""

from . import functional, ops
from .nn import FFLinear, FFLocal2d, FFRecurrent, FFSequential, PeerNormalization

__version__ = "0.1.0"

__all__ = [
    "FFLinear", "FFLocal2d", "FFRecurrent", "FFSequential", "PeerNormalization", "__version__", "functional", "ops",
]
