"""Kernel (a): the FF layer's forward GEMM with a fused ReLU and per-tile goodness epilogue."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    check_mask,
    check_occupancy,
    check_precision,
    check_rows,
    check_tensor,
    check_weight,
    goodness_kind,
    interpreting,
)
from ._tiles import load_x_tile
from .config import block_config, mask_tile_occupancy


@triton.jit
def _linear_forward_kernel(
    xp_ptr, xn_ptr, w_ptr, b_ptr, xs_ptr, mask_ptr, occ_ptr, h_ptr, part_ptr,
    M, Mp, N, K,
    stride_xp, stride_xn, stride_h, stride_occ, n_col_blocks,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, SQUARED: tl.constexpr,
    PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    out_ok = outs < N
    w_rows = outs.to(tl.int64) * K  # W and mask are contiguous (N, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        ins = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_end = K
        if HAS_MASK:  # an empty tile loads nothing (all lanes masked off) and its dot adds zeros
            k_end = tl.where(tl.load(occ_ptr + pid_n * stride_occ + kb) != 0, K, 0)
        x = load_x_tile(xp_ptr, xn_ptr, stride_xp, stride_xn, rows, ins, M, Mp, k_end)
        w_ok = out_ok[:, None] & (ins < k_end)[None, :]
        w_offs = w_rows[:, None] + ins[None, :]
        w = tl.load(w_ptr + w_offs, mask=w_ok, other=0.0)
        if HAS_MASK:
            w = tl.where(tl.load(mask_ptr + w_offs, mask=w_ok, other=0) != 0, w, 0.0)
        if DOT_IN_FP32:  # the interpreter's tl.dot cannot multiply bfloat16 (triton#11584)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)

    if HAS_SCALE:
        acc = acc * tl.load(xs_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.maximum(acc, 0.0)  # zero in the padding columns: their W and bias loads gave 0
    h_offs = rows.to(tl.int64)[:, None] * stride_h + outs[None, :]
    tl.store(h_ptr + h_offs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])
    if SQUARED:
        g = tl.sum(h * h, axis=1)
    else:
        g = tl.sum(h, axis=1)
    tl.store(part_ptr + rows.to(tl.int64) * n_col_blocks + pid_n, g, mask=row_ok)


def ff_linear_forward(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    goodness: str,
    x_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    tile_occupancy: torch.Tensor | None = None,
    precision: str = "tf32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU activities of positive and negative rows and their partial goodness, in one launch.

    With x = [x_pos; x_neg] (M = Mp + Mn rows, never concatenated in memory) and s = x_scale
    (ones if None)::

        h = relu(s[:, None] * (x @ (W * mask).T) + b)                       (M, N), dtype of x
        partials[m, j] = sum over columns n of block j of h[m, n]**2        (M, cdiv(N, BLOCK_N)) fp32
                         (h[m, n] for goodness "sum")

    so the goodness is ``partials.sum(1)`` (``ff_row_stats`` does that). Goodness is summed
    from the fp32 accumulator, before h is rounded to bfloat16.

    Args:
        x_pos: (Mp, K) positive rows; x_neg: (Mn, K) negative rows. float32 or bfloat16 like
            the weight, unit stride in the last dim; either may have 0 rows.
        weight: (N, K) contiguous; bias: (N,) of the weight's dtype, or None.
        goodness: "ssq", "neg_ssq" or "sum" (only squared vs plain sum matters here).
        x_scale: optional (M,) fp32 per-row factor of the input, e.g. the previous layer's
            ``inv_norm``: passing the previous raw h with it equals passing its normalized
            output. Applied to the fp32 accumulator, so costs no extra pass.
        mask: optional (N, K) bool/uint8 connectivity; masked weights are read as zero.
        tile_occupancy: optional int32 (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)) map of this
            launcher's ``block_config`` tiles (see ``mask_tile_occupancy``); K-steps over
            empty tiles load nothing. Built here from the mask when None (a pass over the
            whole mask: cache it per layer instead).
        precision: "tf32" (tensor-core TF32 for float32 inputs) or "ieee"; bfloat16 ignores it.

    Memory passes: one program per (BLOCK_M rows, BLOCK_N outputs) tile, so x is read once per
    column block and W once per row block (both tiles stream through on-chip memory), h is
    written once and the partials (M x N/BLOCK_N floats) once. No atomics: each program
    writes its own partial, which makes the result deterministic.

    The normalized output h / (||h|| + eps) is not written here: a program sees only
    BLOCK_N of the N columns, and the row norm needs all of them, i.e. the partials of every
    column block. Producing it would need a grid-wide sync or a second pass; instead the next
    layer can consume h with ``x_scale = inv_norm`` (no pass at all), or ``scale_rows`` makes
    it in one read and one write.

    Returns:
        ``(h, partials)``.
    """
    squared, _ = goodness_kind(goodness)
    precision = check_precision(precision)
    n, k = check_weight(weight)
    xp, xn, n_pos, n_neg = check_rows(x_pos, x_neg, weight)
    m, device = n_pos + n_neg, weight.device
    if bias is not None:
        check_tensor("bias", bias, (n,), weight.dtype, device, contiguous=True)
    if x_scale is not None:
        check_tensor("x_scale", x_scale, (m,), torch.float32, device, contiguous=True)
    cfg = block_config(weight.dtype, n, k, precision)
    n_col_blocks = triton.cdiv(n, cfg.block_n)
    if mask is not None:
        mask = check_mask(mask, weight)
        if tile_occupancy is None:
            tile_occupancy = mask_tile_occupancy(mask, cfg.block_n, cfg.block_k)
        check_occupancy(tile_occupancy, (n_col_blocks, triton.cdiv(k, cfg.block_k)), device)
    elif tile_occupancy is not None:
        raise ValueError("tile_occupancy was given without a mask")

    h = torch.empty((m, n), dtype=weight.dtype, device=device)
    partials = torch.empty((m, n_col_blocks), dtype=torch.float32, device=device)
    if m == 0:
        return h, partials
    grid = (triton.cdiv(m, cfg.block_m), n_col_blocks)
    _linear_forward_kernel[grid](
        xp, xn, weight,
        weight if bias is None else bias,
        partials if x_scale is None else x_scale,
        weight if mask is None else mask,
        partials if tile_occupancy is None else tile_occupancy,
        h, partials,
        m, n_pos, n, k,
        xp.stride(0), xn.stride(0), h.stride(0),
        0 if tile_occupancy is None else tile_occupancy.stride(0), n_col_blocks,
        HAS_BIAS=bias is not None, HAS_SCALE=x_scale is not None, HAS_MASK=mask is not None,
        SQUARED=squared, PRECISION=precision, DOT_IN_FP32=interpreting(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h, partials
