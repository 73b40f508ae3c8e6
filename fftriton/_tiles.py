"""Device helper shared by the GEMM kernels: reading rows of the virtual matrix [x_pos; x_neg]."""

import triton
import triton.language as tl


@triton.jit
def load_x_tile(xp_ptr, xn_ptr, stride_xp, stride_xn, rows, cols, M, Mp, K):
    """The (len(rows), len(cols)) tile of x = [x_pos; x_neg] in x's dtype, zero outside (M, K).

    Row r < Mp is x_pos[r], row Mp <= r < M is x_neg[r - Mp]; the two tensors are never
    concatenated in memory. Each row is read through exactly one of two complementary masked
    loads, and row indices are clamped to 0 where masked off so no pointer leaves its tensor.
    """
    is_pos = rows < Mp
    is_neg = (rows >= Mp) & (rows < M)
    col_ok = (cols < K)[None, :]
    pos_rows = tl.where(is_pos, rows, 0).to(tl.int64)
    neg_rows = tl.where(is_neg, rows - Mp, 0).to(tl.int64)
    xp = tl.load(xp_ptr + pos_rows[:, None] * stride_xp + cols[None, :], mask=is_pos[:, None] & col_ok, other=0.0)
    xn = tl.load(xn_ptr + neg_rows[:, None] * stride_xn + cols[None, :], mask=is_neg[:, None] & col_ok, other=0.0)
    return tl.where(is_pos[:, None], xp, xn)
