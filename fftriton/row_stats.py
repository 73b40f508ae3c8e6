"""Per-row FF statistics from the forward's goodness partials, and the normalized-output pass."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import check_tensor, goodness_kind
from .config import row_stats_config, scale_rows_config


class RowStats(NamedTuple):
    """Per-row results of ``ff_row_stats``, each (M,) float32."""

    goodness: torch.Tensor  # G
    loss_rows: torch.Tensor  # this row's share of the layer loss; loss = loss_rows.sum()
    coef: torch.Tensor  # dL/dG
    inv_norm: torch.Tensor  # 1 / (scale + eps), the factor that normalizes the row


@triton.jit
def _log1p(e):
    """log(1 + e) to a few ulps also for tiny e, where log(1.0 + e) loses e's low bits.

    ``log(u) * e / (u - 1)`` with ``u = 1 + e`` divides out the rounding of u (Goldberg, "What
    every computer scientist should know about floating-point arithmetic", thm. 4); it needs
    only log, which every Triton version has (log1p is device-specific libdevice).
    """
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _row_stats_kernel(
    part_ptr, g_ptr, loss_ptr, coef_ptr, inv_ptr,
    M, Mp, n_cols,
    threshold, sign, temperature, inv_n_pos, inv_n_neg, norm_div, eps,
    SQUARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    part_rows = rows.to(tl.int64) * n_cols
    # Sum whole tiles in the loop and reduce once after it: a row sum carried through the loop
    # crashes triton 3.6's sm_90 compiler (OptimizeThreadLocality) when n_cols is a multiple of 16.
    tile_sum = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        tile_sum += tl.load(part_ptr + part_rows[:, None] + cols[None, :], mask=ok, other=0.0)
    g = tl.sum(tile_sum, axis=1)

    # v is the softplus argument: -s for positive rows, s for negative rows.
    s = sign * (g - threshold) / temperature
    is_pos = rows < Mp
    v = tl.where(is_pos, -s, s)
    e = tl.exp(-tl.abs(v))  # in (0, 1]: neither softplus nor sigmoid can overflow
    softplus = tl.maximum(v, 0.0) + _log1p(e)
    sigmoid = tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    row_weight = tl.where(is_pos, inv_n_pos, inv_n_neg)  # 1 / batch size: the means of the loss
    # dL/dG = dL/dv * dv/ds * ds/dG = sigmoid(v) * (-1 | +1) * sign / T, per row weight
    coef = tl.where(is_pos, -sign, sign) / temperature * sigmoid * row_weight

    if SQUARED:
        scale = tl.sqrt(g / norm_div)
    else:
        scale = g / norm_div
    tl.store(g_ptr + rows, g, mask=row_ok)
    tl.store(loss_ptr + rows, softplus * row_weight, mask=row_ok)
    tl.store(coef_ptr + rows, coef, mask=row_ok)
    tl.store(inv_ptr + rows, 1.0 / (scale + eps), mask=row_ok)


def ff_row_stats(
    partials: torch.Tensor,
    n_pos: int,
    *,
    goodness: str,
    threshold: float,
    temperature: float,
    n_features: int,
    rms: bool = False,
    eps: float = 1e-6,
) -> RowStats:
    """Goodness, loss share, dL/dG and normalizing factor of every row, from the goodness partials.

    With G = partials.sum(1), sign = -1 for "neg_ssq" else +1, s = sign * (G - threshold) / T,
    the first ``n_pos`` rows positive (Mp) and the rest negative (Mn)::

        loss_rows = softplus(-s) / max(Mp, 1)            positive rows
                    softplus(s) / max(Mn, 1)             negative rows
        coef      = -sign / T * sigmoid(-s) / max(Mp, 1)  positive rows   (= dL/dG)
                    +sign / T * sigmoid(s) / max(Mn, 1)   negative rows
        inv_norm  = 1 / (scale + eps),  scale = sqrt(G) ("ssq", "neg_ssq") or G ("sum"),
                    or with rms: sqrt(G / n_features) or G / n_features

    so ``loss_rows.sum()`` is the layer loss of ``ff_kernels.functional.ff_loss``. Softplus
    and sigmoid are evaluated through exp(-|v|), which is finite for every logit.

    Args:
        partials: (M, C) float32 contiguous, from ``ff_linear_forward``.
        n_pos: number of positive rows, 0 <= n_pos <= M.
        n_features: N, the width of the layer (used by ``rms``).

    One program per block of rows reads the partials once and writes four (M,) vectors.
    """
    squared, sign = goodness_kind(goodness)
    if not isinstance(partials, torch.Tensor) or partials.dim() != 2 or partials.shape[1] < 1:
        shape = tuple(partials.shape) if isinstance(partials, torch.Tensor) else type(partials).__name__
        raise ValueError(f"partials must be an (M, C >= 1) tensor, got {shape}")
    m, n_cols = partials.shape
    check_tensor("partials", partials, (m, n_cols), torch.float32, partials.device, contiguous=True)
    if not 0 <= n_pos <= m:
        raise ValueError(f"n_pos must be in [0, {m}] (the rows of partials), got {n_pos}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    out = [torch.empty(m, dtype=torch.float32, device=partials.device) for _ in RowStats._fields]
    stats = RowStats(*out)
    if m == 0:
        return stats
    cfg = row_stats_config(n_cols)
    _row_stats_kernel[(triton.cdiv(m, cfg.block_m),)](
        partials, *stats,
        m, n_pos, n_cols,
        float(threshold), sign, float(temperature),
        1.0 / max(n_pos, 1), 1.0 / max(m - n_pos, 1), float(n_features if rms else 1), float(eps),
        SQUARED=squared, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_n, num_warps=cfg.num_warps,
    )
    return stats


@triton.jit
def _scale_rows_kernel(
    h_ptr, inv_ptr, y_ptr, M, N, stride_h, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    h = tl.load(h_ptr + rows64[:, None] * stride_h + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + rows, mask=row_ok, other=0.0)
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], (h * inv[:, None]).to(y_ptr.dtype.element_ty), mask=ok)


def scale_rows(h: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """The normalized output ``y = h * inv_norm[:, None]``: h (M, N) float32/bfloat16, inv_norm (M,) float32.

    Returns a new (M, N) tensor of h's dtype; one read of h, one write of y. It is a pass of
    its own because inv_norm needs the whole row's goodness, which exists only after every
    column block of the forward GEMM has finished (see ``ff_linear_forward``). Callers that
    feed the next layer can skip it by passing h with ``x_scale=inv_norm`` instead.
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a 2-D (M, N) tensor, got {getattr(h, 'shape', type(h).__name__)}")
    if h.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"h must be float32 or bfloat16, got {h.dtype}")
    m, n = h.shape
    check_tensor("h", h, (m, n), h.dtype, h.device)
    check_tensor("inv_norm", inv_norm, (m,), torch.float32, h.device, contiguous=True)
    y = torch.empty_like(h, memory_format=torch.contiguous_format)
    if m == 0 or n == 0:
        return y
    cfg = scale_rows_config(n)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    _scale_rows_kernel[grid](
        h, inv_norm, y, m, n, h.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )
    return y
