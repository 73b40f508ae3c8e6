"""Block sizes of the kernels, and the map of which weight tiles a connectivity mask leaves empty.

One place chooses every tile shape; there is no autotuning. On a GPU the tiles are the usual
tensor-core sizes, shrunk (to a power of two, at least 16, which ``tl.dot`` needs) for small
dims. Under the interpreter (``TRITON_INTERPRET=1``) they are 16 so that the CPU emulation stays
fast and small test shapes still span several tiles.

The weight-tile sizes (``block_n``, ``block_k``) depend only on the weight's shape and dtype,
never on the batch, so a ``tile_occupancy`` map built once per layer and launcher stays valid.
The forward GEMM and the update GEMM tile the weight differently, so each needs its own map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import interpreting

_INTERPRETER_BLOCK = 16
_MIN_DOT_BLOCK = 16


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape and launch options of a GEMM kernel (see each launcher for what m, n, k mean)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowConfig:
    """Tile shape of a row-wise kernel: ``block_m`` rows by ``block_n`` columns."""

    block_m: int
    block_n: int
    num_warps: int


def _pow2_at_least(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()


def _fit(block: int, size: int, floor: int = _MIN_DOT_BLOCK) -> int:
    """``block``, or the smallest power of two >= ``size`` if that is smaller (but >= ``floor``)."""
    return min(block, max(floor, _pow2_at_least(size)))


def _warps(tile_elems: int) -> int:
    """8 warps for a full 128x128 (or 64x128) fp32 accumulator, 4 for smaller tiles."""
    return 8 if tile_elems >= 64 * 128 else 4


def block_config(dtype: torch.dtype, M: int, N: int, K: int) -> BlockConfig:
    """Tiles of the forward GEMM ``x (M, K) @ W.T (K, N)``: rows x outputs, stepping over K."""
    if interpreting():
        b = _INTERPRETER_BLOCK
        return BlockConfig(b, b, b, num_warps=1, num_stages=1)
    block_m, block_n = _fit(128, M), _fit(128, N)
    block_k = _fit(64 if dtype == torch.bfloat16 else 32, K)
    return BlockConfig(block_m, block_n, block_k, num_warps=_warps(block_m * block_n), num_stages=3)


def update_block_config(dtype: torch.dtype, M: int, N: int, K: int) -> BlockConfig:
    """Tiles of the update GEMM ``delta.T (N, M) @ x (M, K)``: a W tile (block_n, block_k), stepping over M."""
    if interpreting():
        b = _INTERPRETER_BLOCK
        return BlockConfig(b, b, b, num_warps=1, num_stages=1)
    block_n, block_k = _fit(128, N), _fit(128, K)
    block_m = _fit(64 if dtype == torch.bfloat16 else 32, M)
    return BlockConfig(block_m, block_n, block_k, num_warps=_warps(block_n * block_k), num_stages=3)


def row_stats_config(n_cols: int) -> RowConfig:
    """Tiles of the row-statistics kernel over the (M, n_cols) goodness partials."""
    if interpreting():
        return RowConfig(_INTERPRETER_BLOCK, 2, num_warps=1)  # 2 columns: tests walk the column loop
    return RowConfig(128, _fit(32, n_cols, floor=1), num_warps=4)


def scale_rows_config(n_cols: int) -> RowConfig:
    """Tiles of the elementwise row-scaling kernel over an (M, n_cols) matrix."""
    if interpreting():
        b = _INTERPRETER_BLOCK
        return RowConfig(b, b, num_warps=1)
    return RowConfig(16, _fit(256, n_cols), num_warps=4)


def mask_tile_occupancy(mask: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """Which (block_n, block_k) tiles of an (N, K) 0/1 mask hold any connection.

    Returns an int32 tensor of shape ``(cdiv(N, block_n), cdiv(K, block_k))`` on the mask's
    device: 1 where the tile has a nonzero entry, 0 where the kernels may skip it. Pure torch;
    build it once per layer and launcher (``block_config`` / ``update_block_config``) and pass it
    as ``tile_occupancy``.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (N, K), got shape {tuple(mask.shape)}")
    if block_n < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_n={block_n}, block_k={block_k}")
    n, k = mask.shape
    n_blocks, k_blocks = -(-n // block_n), -(-k // block_k)
    padded = F.pad((mask != 0).to(torch.uint8), (0, k_blocks * block_k - k, 0, n_blocks * block_n - n))
    tiles = padded.view(n_blocks, block_n, k_blocks, block_k)
    return tiles.amax(dim=(1, 3)).to(torch.int32)
