"""Op dispatch: one function per FF op, choosing Triton, the CPU fast path or the reference."""

from .layer_step import FFLayerStep
from .linear import BACKENDS, ff_linear_forward, ff_linear_step, resolve_backend, step_takes_peer

__all__ = ["BACKENDS", "FFLayerStep", "ff_linear_forward", "ff_linear_step", "resolve_backend", "step_takes_peer"]
