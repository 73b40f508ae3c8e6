"""Kernel (b): the FF layer's weight-gradient GEMM, fused with gradient accumulation or an SGD step."""

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
from .config import mask_tile_occupancy, update_block_config

MODES = ("grad", "sgd")


@triton.jit
def _accumulate(grad_ptr, offs, ok, value):
    """grad[offs] += value (fp32 math, stored in grad's dtype) where ok."""
    old = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offs, (old + value).to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sgd_step(param_ptr, buf_ptr, offs, ok, keep, grad, lr, momentum, weight_decay, USE_BUF: tl.constexpr):
    """torch.optim.SGD on param[offs] where ok; the step direction is zeroed where not keep."""
    p = tl.load(param_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d = tl.where(keep, grad + weight_decay * p, 0.0)
    if USE_BUF:
        d = momentum * tl.load(buf_ptr + offs, mask=ok, other=0.0).to(tl.float32) + d
        tl.store(buf_ptr + offs, d.to(buf_ptr.dtype.element_ty), mask=ok)
    tl.store(param_ptr + offs, (p - lr * d).to(param_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _linear_update_kernel(
    xp_ptr, xn_ptr, h_ptr, coef_ptr, xs_ptr, mask_ptr, occ_ptr,
    w_ptr, b_ptr, wg_ptr, bg_ptr, wbuf_ptr, bbuf_ptr,
    M, Mp, N, K,
    stride_xp, stride_xn, stride_h, stride_occ,
    lr, momentum, weight_decay,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
    USE_BUF: tl.constexpr, SQUARED: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    occupied = True
    k_end = K  # columns of x read; 0 in a bias-owning program of an empty tile, whose dots add zeros
    if HAS_MASK:
        occupancy = tl.load(occ_ptr + pid_n * stride_occ + pid_k)
        idle = occupancy == 0
        if HAS_BIAS:
            idle = idle & (pid_k != 0)  # the pid_k == 0 programs own the bias: they always run
        if idle:
            return  # an empty tile: W and its momentum are zero there (invariant) and stay so
        occupied = occupancy != 0
        k_end = tl.where(occupied, K, 0)

    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ins = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    out_ok = outs < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        h_offs = rows.to(tl.int64)[:, None] * stride_h + outs[None, :]
        h = tl.load(h_ptr + h_offs, mask=row_ok[:, None] & out_ok[None, :], other=0.0).to(tl.float32)
        if SQUARED:
            dg_dz = 2.0 * h
        else:
            dg_dz = tl.where(h > 0, 1.0, 0.0)  # h = relu(z): the ReLU mask is in h itself
        c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)  # zero on padding rows
        if HAS_BIAS:
            db += tl.sum(c[:, None] * dg_dz, axis=0)
        if HAS_SCALE:  # delta.T @ (s * x) == (s * delta).T @ x: fold s into the row coefficient
            c = c * tl.load(xs_ptr + rows, mask=row_ok, other=0.0)
        # Branch-free (k_end, not an `if`), so that the loop is software-pipelined.
        x = load_x_tile(xp_ptr, xn_ptr, stride_xp, stride_xn, rows, ins, M, Mp, k_end)
        delta = (c[:, None] * dg_dz).to(x.dtype)  # a bfloat16 dot: both operands bfloat16
        if DOT_IN_FP32:  # the interpreter's tl.dot cannot multiply bfloat16 (triton#11584)
            x = x.to(tl.float32)
            delta = delta.to(tl.float32)
        acc = tl.dot(tl.trans(delta), x, acc, input_precision=PRECISION)

    tile_ok = out_ok[:, None] & (ins < K)[None, :]
    w_offs = outs.to(tl.int64)[:, None] * K + ins[None, :]  # W-shaped tensors are contiguous (N, K)
    keep = tile_ok
    if HAS_MASK:
        keep = tl.where(occupied, keep & (tl.load(mask_ptr + w_offs, mask=tile_ok, other=0) != 0), False)
    bias_ok = tl.where(pid_k == 0, out_ok, False)  # (where, not &: the interpreter mistypes block & scalar)
    if MODE == "grad":
        _accumulate(wg_ptr, w_offs, tile_ok, tl.where(keep, acc, 0.0))
        if HAS_BIAS:
            _accumulate(bg_ptr, outs, bias_ok, db)
    else:
        _sgd_step(w_ptr, wbuf_ptr, w_offs, tile_ok, keep, acc, lr, momentum, weight_decay, USE_BUF)
        if HAS_BIAS:
            _sgd_step(b_ptr, bbuf_ptr, outs, bias_ok, bias_ok, db, lr, momentum, weight_decay, USE_BUF)


def _check_mode_args(
    mode: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_grad: torch.Tensor | None,
    bias_grad: torch.Tensor | None,
    weight_buf: torch.Tensor | None,
    bias_buf: torch.Tensor | None,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """Each mode needs its own tensors and rejects the other's, so nothing is silently ignored."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if bias is None and (bias_grad is not None or bias_buf is not None):
        raise ValueError("bias_grad/bias_buf were given but bias is None")
    if mode == "grad":
        if weight_buf is not None or bias_buf is not None or (lr, momentum, weight_decay) != (0.0, 0.0, 0.0):
            raise ValueError("weight_buf, bias_buf, lr, momentum and weight_decay are for mode='sgd' only")
        if weight_grad is None or (bias is not None and bias_grad is None):
            raise ValueError("mode='grad' needs weight_grad, and bias_grad when bias is given")
        check_tensor("weight_grad", weight_grad, weight.shape, weight.dtype, weight.device, contiguous=True)
        if bias is not None:
            check_tensor("bias_grad", bias_grad, bias.shape, bias.dtype, weight.device, contiguous=True)
        return
    if weight_grad is not None or bias_grad is not None:
        raise ValueError("weight_grad and bias_grad are for mode='grad' only; mode='sgd' never forms the gradient")
    if not (lr >= 0 and momentum >= 0 and weight_decay >= 0):
        raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
    if bias is not None and (weight_buf is None) != (bias_buf is None):
        raise ValueError("give both weight_buf and bias_buf, or neither")
    if weight_buf is None:
        if momentum != 0:
            raise ValueError(f"momentum={momentum} needs weight_buf (and bias_buf when bias is given)")
        return
    check_tensor("weight_buf", weight_buf, weight.shape, weight.dtype, weight.device, contiguous=True)
    if bias is not None:
        check_tensor("bias_buf", bias_buf, bias.shape, bias.dtype, weight.device, contiguous=True)


def ff_linear_update(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    h: torch.Tensor,
    coef: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    goodness: str,
    x_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    tile_occupancy: torch.Tensor | None = None,
    mode: str = "grad",
    weight_grad: torch.Tensor | None = None,
    bias_grad: torch.Tensor | None = None,
    weight_buf: torch.Tensor | None = None,
    bias_buf: torch.Tensor | None = None,
    lr: float = 0.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    precision: str = "tf32",
) -> None:
    """The layer's local weight gradient, consumed in place: accumulated, or applied as an SGD step.

    With x = [x_pos; x_neg] (M rows, never concatenated), s = x_scale (ones if None), h and
    coef = dL/dG from the forward (``ff_linear_forward``, ``ff_row_stats``)::

        delta = coef[:, None] * (2 h            for "ssq", "neg_ssq")       (M, N)
                                (1[h > 0]       for "sum")
        dW = (delta.T @ (s[:, None] * x)) * mask                            (N, K)
        db = delta.sum(0)                                                   (N,)

    mode="grad": ``weight_grad += dW`` and ``bias_grad += db`` (what loss.backward() does).
    mode="sgd": one ``torch.optim.SGD`` step (dampening 0, no Nesterov) on W and b::

        d = (dW + weight_decay * W) * mask;  buf = momentum * buf + d;  W -= lr * buf

    with ``buf`` = ``weight_buf`` (``bias_buf`` for b, unmasked), which must start at zero;
    without buffers (momentum 0 only) ``buf = d``. Weight decay applies to the bias too, as in
    a single SGD param group. Where the mask is 0 the step is zero, so W stays exactly 0 there.

    Args:
        x_pos (Mp, K), x_neg (Mn, K), h (M, N): dtype of the weight (float32 or bfloat16),
            unit stride in the last dim. coef, x_scale: (M,) float32.
        weight (N, K) contiguous; bias (N,) or None (then no bias work). Gradients and
            buffers: contiguous, shaped and typed like their parameter; math is in fp32.
        mask: optional (N, K) bool/uint8; tile_occupancy: optional int32 map of this
            launcher's ``update_block_config`` tiles (built from the mask when None; cache it).
            Programs whose whole W tile is empty return at once.
        precision: "tf32" or "ieee" for float32 inputs.

    One program per (BLOCK_N, BLOCK_K) tile of W loops over the M rows in BLOCK_M steps,
    forming delta from h and coef on the fly (delta is never stored) and accumulating
    delta.T @ x in fp32. So h is read once per column of W tiles (K / BLOCK_K times), x once
    per row of W tiles (N / BLOCK_N times), and W, its gradient or its buffer are read and
    written exactly once, in the epilogue: dW is never materialized, because the optimizer
    step is applied to the accumulator while it is still on chip. The bias gradient is a
    by-product of the pid_k == 0 programs (they see every (row, output) pair of their
    outputs once); every program writes only its own tile, so no atomics and a
    deterministic result.
    """
    squared, _ = goodness_kind(goodness)
    precision = check_precision(precision)
    n, k = check_weight(weight)
    xp, xn, n_pos, n_neg = check_rows(x_pos, x_neg, weight)
    m, device = n_pos + n_neg, weight.device
    check_tensor("h", h, (m, n), weight.dtype, device)
    check_tensor("coef", coef, (m,), torch.float32, device, contiguous=True)
    if bias is not None:
        check_tensor("bias", bias, (n,), weight.dtype, device, contiguous=True)
    if x_scale is not None:
        check_tensor("x_scale", x_scale, (m,), torch.float32, device, contiguous=True)
    _check_mode_args(mode, weight, bias, weight_grad, bias_grad, weight_buf, bias_buf, lr, momentum, weight_decay)
    cfg = update_block_config(weight.dtype, n, k, precision)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
    if mask is not None:
        mask = check_mask(mask, weight)
        if tile_occupancy is None:
            tile_occupancy = mask_tile_occupancy(mask, cfg.block_n, cfg.block_k)
        check_occupancy(tile_occupancy, grid, device)
    elif tile_occupancy is not None:
        raise ValueError("tile_occupancy was given without a mask")

    if m == 0:
        if mode == "grad":
            return
        # "sgd" still steps (weight decay, momentum); the row loop is empty, so no row tensor is
        # read and the possibly-null pointers of the empty ones are not passed at all.
        xp = xn = h = coef = weight
        x_scale = None

    def _or_dummy(t: torch.Tensor | None) -> torch.Tensor:
        return weight if t is None else t

    _linear_update_kernel[grid](
        xp, xn, h, coef, _or_dummy(x_scale), _or_dummy(mask), _or_dummy(tile_occupancy),
        weight, _or_dummy(bias), _or_dummy(weight_grad), _or_dummy(bias_grad),
        _or_dummy(weight_buf), _or_dummy(bias_buf),
        m, n_pos, n, k,
        xp.stride(0), xn.stride(0), h.stride(0), 0 if tile_occupancy is None else tile_occupancy.stride(0),
        float(lr), float(momentum), float(weight_decay),
        MODE=mode, HAS_BIAS=bias is not None, HAS_SCALE=x_scale is not None, HAS_MASK=mask is not None,
        USE_BUF=weight_buf is not None, SQUARED=squared, PRECISION=precision, DOT_IN_FP32=interpreting(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
