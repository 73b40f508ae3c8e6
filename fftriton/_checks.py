"""Argument checks shared by the launchers: every message names what was expected and what came."""

from __future__ import annotations

import os

import torch

GOODNESS = ("ssq", "neg_ssq", "sum")  # the names ff_kernels.functional.GOODNESS uses
PRECISIONS = ("tf32", "ieee")
FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def goodness_kind(kind: str) -> tuple[bool, float]:
    """``(squared, sign)`` for a goodness name: squared for "ssq"/"neg_ssq", sign -1 for "neg_ssq"."""
    if kind not in GOODNESS:
        raise ValueError(f"goodness must be one of {GOODNESS}, got {kind!r}")
    return kind != "sum", -1.0 if kind == "neg_ssq" else 1.0


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is a tl.dot input precision the kernels accept."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """``t`` must live on ``device``, and that must be CUDA unless the interpreter runs."""
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the weight, got {t.device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def check_tensor(
    name: str,
    t: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    contiguous: bool = False,
) -> None:
    """Type, shape, dtype and device of ``t``; 2-D tensors need unit stride in the last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    check_device(name, t, device)
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")


def check_weight(weight: torch.Tensor) -> tuple[int, int]:
    """A contiguous (N, K) float32/bfloat16 weight; returns ``(N, K)``, both at least 1."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (N >= 1, K >= 1), got {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight dtype must be one of {FLOAT_DTYPES}, got {weight.dtype}")
    check_tensor("weight", weight, weight.shape, weight.dtype, weight.device, contiguous=True)
    return weight.shape[0], weight.shape[1]


def check_rows(
    x_pos: torch.Tensor, x_neg: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Check x_pos (Mp, K) and x_neg (Mn, K) against the weight.

    Returns the two tensors to hand to a kernel (an empty one replaced by the other, so no
    kernel ever gets a possibly-null pointer) and ``(Mp, Mn)``.
    """
    k = weight.shape[1]
    for name, x in (("x_pos", x_pos), ("x_neg", x_neg)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, {k}), got shape {tuple(x.shape)}")
        check_tensor(name, x, (x.shape[0], k), weight.dtype, weight.device)
    n_pos, n_neg = x_pos.shape[0], x_neg.shape[0]
    if n_pos == 0:
        x_pos = x_neg
    if n_neg == 0:
        x_neg = x_pos
    return x_pos, x_neg, n_pos, n_neg


def check_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A contiguous (N, K) bool or uint8 0/1 connectivity mask, returned as uint8."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"mask must be bool or uint8 (0/1), got {mask.dtype}; convert it with mask.bool()")
    check_tensor("mask", mask, weight.shape, mask.dtype, weight.device, contiguous=True)
    return mask.view(torch.uint8)


def check_occupancy(tile_occupancy: torch.Tensor, expected_shape: tuple[int, int], device: torch.device) -> None:
    """An int32 contiguous tile map of the launcher's own (BLOCK_N, BLOCK_K) tiling."""
    try:
        check_tensor("tile_occupancy", tile_occupancy, expected_shape, torch.int32, device, contiguous=True)
    except ValueError as err:
        raise ValueError(
            f"{err} (build it with mask_tile_occupancy(mask, block_n, block_k) using this launcher's block config)"
        ) from None
