"""Per-thread scratch buffers reused from call to call by the CPU ops.

A fresh multi-megabyte tensor every step costs the page faults of new memory (and, for a
gradient, a pass that writes it before the GEMM does): the ops' large temporaries live here
instead, one buffer per (name, shape, dtype, device) and thread.
"""

from __future__ import annotations

import collections
import threading

import torch

WORKSPACES = 16  # buffers kept per thread (the least recently used one goes first)

_local = threading.local()


def workspace(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape`` with ``like``'s dtype and device, the same one for every call with the
    same name, shape, dtype and device on this thread (contents undefined)."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = collections.OrderedDict()
    key = (name, tuple(shape), like.dtype, like.device)
    buffer = cache.pop(key, None)
    if buffer is None:
        buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        while len(cache) >= WORKSPACES:
            cache.popitem(last=False)
    cache[key] = buffer
    return buffer
