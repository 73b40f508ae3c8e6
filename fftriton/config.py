"""Block sizes of the kernels, and the map of which weight tiles a connectivity mask leaves empty.

One place chooses every tile shape; there is no autotuning. On a GPU the GEMM tiles come from a
small table (``GEMM_TILES``), checked by scripts/check_gpu_compile.py, which compiles each one
for sm_90 and fails on any register spill. Its entries depend on the kind of GEMM, the dtype
and fp32 precision, and on whether both weight dims are multiples of 16: Triton specializes
such shapes to vectorized loads, which need fewer registers, so they get the larger tiles;
other ("ragged") shapes get smaller ones. Under the interpreter (``TRITON_INTERPRET=1``) every
block is 16 so that the CPU emulation stays fast and small test shapes span several tiles;
``gpu_tiles()`` selects the GPU tiles there too, so that tests exercise them on the CPU.

The weight-tile sizes (``block_n``, ``block_k``) depend only on the weight's shape and dtype and
the precision, never on the batch, so a ``tile_occupancy`` map built once per layer and
launcher stays valid. The forward GEMM and the update GEMM tile the weight differently, so each
needs its own map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_precision, interpreting

_INTERPRETER_BLOCK = 16
_ALIGN = 16  # Triton's JIT marks integer arguments divisible by 16, and vectorizes loads along them
_use_gpu_tiles = False


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


# (kind, dtype/precision, aligned) -> tiles on an sm_90 GPU. "forward" tiles x (M, K) @ W.T: a
# (block_m rows, block_n outputs) tile stepping over K in block_k steps. "update" tiles
# delta.T (N, M) @ x (M, K): a (block_n, block_k) W tile stepping over M in block_m steps; its
# epilogue holds the W tile, its gradient or its momentum buffer in registers at once, so its W
# tile is half the forward's. IEEE fp32 dots run on FMA units with their operands in registers,
# hence the shorter forward tile. Registers per thread (sm_90, triton 3.6, worst variant) are in
# docs/gpu.md; none spills.
GEMM_TILES = {
    ("forward", "fp32-tf32", True): BlockConfig(128, 128, 32, num_warps=8, num_stages=3),
    ("forward", "fp32-ieee", True): BlockConfig(64, 128, 32, num_warps=8, num_stages=3),
    ("forward", "bf16", True): BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    ("update", "fp32-tf32", True): BlockConfig(32, 128, 64, num_warps=8, num_stages=3),
    ("update", "fp32-ieee", True): BlockConfig(32, 128, 64, num_warps=8, num_stages=3),
    ("update", "bf16", True): BlockConfig(64, 128, 64, num_warps=8, num_stages=3),
    ("forward", "fp32-tf32", False): BlockConfig(64, 64, 32, num_warps=8, num_stages=2),
    ("forward", "fp32-ieee", False): BlockConfig(64, 64, 32, num_warps=8, num_stages=2),
    ("forward", "bf16", False): BlockConfig(64, 64, 32, num_warps=8, num_stages=2),
    ("update", "fp32-tf32", False): BlockConfig(32, 64, 64, num_warps=8, num_stages=2),
    ("update", "fp32-ieee", False): BlockConfig(32, 64, 64, num_warps=8, num_stages=2),
    ("update", "bf16", False): BlockConfig(32, 64, 64, num_warps=8, num_stages=2),
}


@contextlib.contextmanager
def gpu_tiles() -> Iterator[None]:
    """Within this block, choose the GPU's tiles even under the interpreter (for tests)."""
    global _use_gpu_tiles
    previous, _use_gpu_tiles = _use_gpu_tiles, True
    try:
        yield
    finally:
        _use_gpu_tiles = previous


def _interpreter_tiles() -> bool:
    return interpreting() and not _use_gpu_tiles


def dtype_key(dtype: torch.dtype, precision: str) -> str:
    """"bf16", "fp32-tf32" or "fp32-ieee": the GEMM_TILES column of a dtype and precision."""
    return "bf16" if dtype == torch.bfloat16 else f"fp32-{check_precision(precision)}"


def _gemm_tiles(kind: str, dtype: torch.dtype, N: int, K: int, precision: str) -> BlockConfig:
    if _interpreter_tiles():
        b = _INTERPRETER_BLOCK
        return BlockConfig(b, b, b, num_warps=1, num_stages=1)
    aligned = N % _ALIGN == 0 and K % _ALIGN == 0
    return GEMM_TILES[(kind, dtype_key(dtype, precision), aligned)]


def block_config(dtype: torch.dtype, N: int, K: int, precision: str = "tf32") -> BlockConfig:
    """Tiles of the forward GEMM ``x (M, K) @ W.T (K, N)``: rows x outputs, stepping over K."""
    return _gemm_tiles("forward", dtype, N, K, precision)


def update_block_config(dtype: torch.dtype, N: int, K: int, precision: str = "tf32") -> BlockConfig:
    """Tiles of the update GEMM ``delta.T (N, M) @ x (M, K)``: a W tile (block_n, block_k), stepping over M."""
    return _gemm_tiles("update", dtype, N, K, precision)


def _pow2_at_least(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()


def row_stats_config(n_cols: int) -> RowConfig:
    """Tiles of the row-statistics kernel over the (M, n_cols) goodness partials."""
    if _interpreter_tiles():
        return RowConfig(_INTERPRETER_BLOCK, 2, num_warps=1)  # 2 columns: tests walk the column loop
    return RowConfig(64, min(16, _pow2_at_least(n_cols)), num_warps=4)


def scale_rows_config(n_cols: int) -> RowConfig:
    """Tiles of the elementwise row-scaling kernel over an (M, n_cols) matrix."""
    if _interpreter_tiles():
        b = _INTERPRETER_BLOCK
        return RowConfig(b, b, num_warps=1)
    return RowConfig(16, min(256, max(16, _pow2_at_least(n_cols))), num_warps=4)


def mask_tile_occupancy(mask: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """Which (block_n, block_k) tiles of an (N, K) 0/1 mask hold any connection.

    Returns an int32 tensor of shape ``(cdiv(N, block_n), cdiv(K, block_k))`` on the mask's
    device: 1 where the tile has a nonzero entry, 0 where the kernels skip its loads. Pure torch;
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


def gpu_row_configs(kind: str) -> list[RowConfig]:
    """Every config ``row_stats_config`` ("row_stats") or ``scale_rows_config`` ("scale_rows") chooses on a GPU."""
    choose = {"row_stats": row_stats_config, "scale_rows": scale_rows_config}[kind]
    return sorted({choose(1 << i) for i in range(16)}, key=str)
