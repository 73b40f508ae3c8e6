"""The fftriton kernels against the plain-torch reference ``ff_kernels.functional``.

Runs on CUDA tensors when a GPU is present, else on CPU tensors in the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 then).

Tolerances. Errors are measured normwise, ``max|got - ref| <= rel * max|ref|``: the usual
error measure of a GEMM, which stays meaningful for entries that cancel to about zero.
References are computed in float64 from exactly the values the kernel sees (bfloat16 inputs
are rounded first), so only the kernel's own rounding counts.

* REL_FP32 = 1e-5 for float32 with precision="ieee" (the interpreter always computes exact
  fp32). Every checked value is a chain of fp32 operations over sums of L terms (L = K in the
  forward, M rows in the update: up to 48 and 33 with the interpreter's tiles, 384 and 257 with
  a GPU's). A length-L sum errs by at most L * u * sum|terms| with u = 2**-24 ~ 6e-8 (<= 2.3e-5
  at L = 384), and by about u * L * sigma / sqrt(2) when its rounding errors are independent
  and the terms have standard deviation sigma; max|ref| is a few times the typical sum
  sqrt(L) * sigma, so the normwise error is about u * sqrt(L) <= 1.2e-6 (2.7e-6 at L = 2000).
* bfloat16 keeps 8 significant bits. A GPU rounds fp32 -> bf16 to nearest (relative error
  <= u = 2**-8 ~ 3.9e-3); the interpreter truncates (its cast passes no rounding mode), which
  errs by up to 2u = 2**-7 ~ 7.8e-3. The tolerances below are ~2x the interpreter's bound.
* REL_BF16_H = 1.6e-2 for the bfloat16 h (and normalized y): bf16 products are exact in the
  fp32 accumulator, so the error is the one conversion of the result to bfloat16. Goodness,
  loss, coef and inv_norm are taken from the fp32 accumulator, so REL_FP32 holds for them.
* REL_BF16_GRAD = 3e-2 for bfloat16 gradients and SGD states: delta = c * 2h carries two
  conversions (h, then delta before the bf16 tensor-core dot) and the result a third, into
  the bf16 gradient/buffer/parameter: up to 3 * 2**-7 ~ 2.3e-2 per term (3 * 2**-8 on a GPU),
  measured against sum|terms|; the test data keep that within a small factor of max|ref|
  (observed: under half the tolerance).
* REL_TF32 = 1e-2 for the default precision="tf32" on a GPU: TF32 keeps 10 mantissa bits
  (u = 2**-11, up to 2**-10 when truncating), so each product errs by up to ~2e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ff_kernels import functional as FF
from fftriton import (
    block_config,
    ff_linear_forward,
    ff_linear_update,
    ff_row_stats,
    mask_tile_occupancy,
    scale_rows,
    update_block_config,
)

REL_FP32 = 1e-5
REL_BF16_H = 1.6e-2
REL_BF16_GRAD = 3e-2
REL_TF32 = 1e-2
TEMPERATURE = 2.0

DTYPES = [torch.float32, torch.bfloat16]
PRECISIONS = ["tf32", "ieee"]


def tile_units() -> tuple[int, int]:
    """(ragged, aligned): the largest weight-tile side that any GEMM config takes for weight shapes
    with a dim that is not a multiple of 16, and for shapes with both dims multiples of 16.

    16 and 16 under the interpreter's tiles; the GPU's (64 and 128) on a GPU or in ``gpu_tiles()``.
    """
    def side(n, k):
        return max(
            max(choose(dtype, n, k, precision).block_n, choose(dtype, n, k, precision).block_k)
            for choose in (block_config, update_block_config) for dtype in DTYPES for precision in PRECISIONS
        )

    return side(1, 1), side(16, 16)


def make_cases(ragged: int, aligned: int) -> list[tuple]:
    """(n_pos, n_neg, N, K, bias, strided x_pos), in units of the tile sides of ``tile_units()``.

    Batch of one; Mp != Mn with x_pos a column slice of a wider tensor (row stride != K); no
    negatives; no positives and no bias; several row blocks with the positive/negative split
    inside one, at dims that are multiples of 16. Every weight spans two or more tiles of every
    launcher in both dims, with a partial last tile except in the aligned case. With the
    interpreter's 16: (37, 45), (20, 17) and 33 rows by (32, 48).
    """
    r, a = ragged, aligned
    return [
        (1, 1, 2 * r + 5, 2 * r + 13, True, False),
        (5, 3, 2 * r + 5, 2 * r + 13, True, True),
        (6, 0, 2 * r + 5, 2 * r + 13, True, False),
        (0, 4, r + 4, r + 1, False, False),
        (a + 3, a - 2, 2 * a, 3 * a, True, False),
    ]


CASES = make_cases(*tile_units())
CASE_IDS = ["batch1", "mp_ne_mn_strided", "no_neg", "no_pos_no_bias", "multi_row_block"]
FEATURES = {"plain": (False, False), "scaled": (True, False), "masked": (False, True), "scaled_masked": (True, True)}


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    """Normwise check ``max|got - ref| <= rel * max|ref|`` (see the module docstring)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if ref.numel() == 0:
        return
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * max|ref| = {rel * scale:.3g}"


def rel_for(dtype: torch.dtype, bf16_rel: float) -> float:
    return REL_FP32 if dtype == torch.float32 else bf16_rel


def sparse_mask(n: int, k: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A random (n, k) bool mask whose first and last weight tile are empty for every launcher and precision."""
    mask = torch.rand(n, k, generator=generator) < 0.6
    configs = [choose(dtype, n, k, p) for choose in (block_config, update_block_config) for p in PRECISIONS]
    bn, bk = max(cfg.block_n for cfg in configs), max(cfg.block_k for cfg in configs)
    mask[:bn, :bk] = False
    mask[(n - 1) // bn * bn :, (k - 1) // bk * bk :] = False
    for cfg in configs:
        occ = mask_tile_occupancy(mask, cfg.block_n, cfg.block_k)
        assert (occ == 0).any() and (occ == 1).any(), "test mask must have empty and occupied tiles"
    return mask


@dataclass
class Problem:
    """One layer's inputs on the test device, in the kernel dtype."""

    x_pos: torch.Tensor
    x_neg: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    x_scale: torch.Tensor | None
    mask: torch.Tensor | None

    @property
    def n_pos(self) -> int:
        return self.x_pos.shape[0]

    def reference(self, device="cpu") -> tuple:
        """float64 copies (x_pos, x_neg, W, b, mask) of the kernel's inputs on ``device``, x_scale folded into x."""
        def copy(t):
            return None if t is None else t.detach().to(device, torch.float64, copy=True)

        x = copy(torch.cat([self.x_pos, self.x_neg]))
        if self.x_scale is not None:
            x = x * copy(self.x_scale)[:, None]
        mask = None if self.mask is None else self.mask.to(device)
        return x[: self.n_pos], x[self.n_pos :], copy(self.weight), copy(self.bias), mask

    def threshold(self, goodness: str) -> float:
        """The mean reference goodness: logits of both signs and moderate size."""
        x_pos, x_neg, w, b, mask = self.reference()
        return FF.goodness(FF.linear_activity(torch.cat([x_pos, x_neg]), w, b, mask), goodness).mean().item()

    def kernel_inputs(self) -> dict:
        return {"x_scale": self.x_scale, "mask": self.mask}


def make_problem(device, dtype, n_pos, n_neg, n, k, *, bias=True, strided=False, scaled=False, masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_pos = torch.randn(n_pos, k + 3 if strided else k, generator=g)  # sliced to k columns below
    x_neg = torch.randn(n_neg, k, generator=g)
    mask = sparse_mask(n, k, dtype, g) if masked else None
    weight = torch.randn(n, k, generator=g) / k**0.5
    if mask is not None:
        weight = weight * mask
    b = 0.1 * torch.randn(n, generator=g) if bias else None
    x_scale = torch.rand(n_pos + n_neg, generator=g) + 0.5 if scaled else None

    def put(t, dt=dtype):
        return None if t is None else t.to(device=device, dtype=dt)

    x_pos = put(x_pos)[:, :k]  # strided: row stride k + 3 on every device and dtype
    return Problem(x_pos, put(x_neg), put(weight), put(b), put(x_scale, torch.float32), put(mask, torch.bool))


def case_problem(device, dtype, case, features, seed=0) -> Problem:
    n_pos, n_neg, n, k, bias, strided = case
    scaled, masked = FEATURES[features]
    return make_problem(
        device, dtype, n_pos, n_neg, n, k, bias=bias, strided=strided, scaled=scaled, masked=masked, seed=seed
    )


def kernel_stats(p: Problem, goodness: str, threshold: float, precision: str = "ieee"):
    """Forward GEMM + row statistics: returns (h, RowStats)."""
    h, partials = ff_linear_forward(
        p.x_pos, p.x_neg, p.weight, p.bias, goodness=goodness, precision=precision, **p.kernel_inputs()
    )
    stats = ff_row_stats(
        partials, p.n_pos, goodness=goodness, threshold=threshold, temperature=TEMPERATURE, n_features=p.weight.shape[0]
    )
    return h, stats


def reference_grads(p: Problem, goodness: str, threshold: float, device="cpu"):
    """float64 (loss, dW, db) by autograd on functional.ff_linear_loss, computed on ``device``."""
    x_pos, x_neg, w, b, mask = p.reference(device)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    loss = FF.ff_linear_loss(x_pos, x_neg, w, b, goodness, threshold, TEMPERATURE, mask)
    loss.backward()
    return loss.detach(), w.grad, None if b is None else b.grad


def test_mask_tile_occupancy():
    mask = torch.zeros(37, 45, dtype=torch.bool)
    mask[3, 40] = True
    mask[36, 0] = True
    expected = torch.zeros(3, 3, dtype=torch.int32)
    expected[0, 2] = 1
    expected[2, 0] = 1
    assert torch.equal(mask_tile_occupancy(mask, 16, 16), expected)
    assert torch.equal(mask_tile_occupancy(mask.to(torch.uint8), 16, 16), expected)
    assert mask_tile_occupancy(mask, 64, 64).tolist() == [[1]]


@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("goodness", ["ssq", "sum"])  # the forward treats "neg_ssq" exactly as "ssq"
def test_forward(device, goodness, dtype, case, features):
    check_forward(device, goodness, dtype, case, features)


def check_forward(device, goodness, dtype, case, features):
    """h and goodness partials of the forward launcher against the float64 reference."""
    p = case_problem(device, dtype, case, features)
    assert p.x_pos.stride(0) == p.x_pos.shape[1] + (3 if case[5] else 0)
    h, partials = ff_linear_forward(
        p.x_pos, p.x_neg, p.weight, p.bias, goodness=goodness, precision="ieee", **p.kernel_inputs()
    )
    x_pos, x_neg, w, b, mask = p.reference()
    ref_h = FF.linear_activity(torch.cat([x_pos, x_neg]), w, b, mask)
    m, n, k = ref_h.shape[0], w.shape[0], w.shape[1]
    assert h.dtype == dtype and partials.dtype == torch.float32
    assert partials.shape == (m, -(-n // block_config(dtype, n, k, "ieee").block_n))
    assert_close(h, ref_h, rel_for(dtype, REL_BF16_H), "h")
    assert_close(partials.sum(1), FF.goodness(ref_h, goodness), REL_FP32, "goodness")


def random_partials(h: torch.Tensor, goodness: str, block: int) -> torch.Tensor:
    """Per-column-block goodness sums of h, as the forward kernel writes them."""
    terms = h.square() if goodness != "sum" else h
    return torch.stack([c.sum(1) for c in terms.split(block, dim=1)], dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["norm", "rms"])
@pytest.mark.parametrize("rows", [(1, 1), (5, 3), (6, 0), (0, 4), (19, 14)], ids=str)
@pytest.mark.parametrize("goodness", FF.GOODNESS)
def test_row_stats_and_scale_rows(device, goodness, rows, rms, dtype):
    n_pos, n_neg = rows
    g = torch.Generator().manual_seed(1)
    h = torch.relu(torch.randn(n_pos + n_neg, 37, generator=g)).to(dtype).double()
    if h.shape[0] > 2:
        h[2] = 0.0  # a dead row: G = 0, the normalized output stays 0
    ref_g = FF.goodness(h, goodness)
    threshold = ref_g.mean().item() if ref_g.numel() else 0.0
    partials = random_partials(h, goodness, 16).float().to(device)
    stats = ff_row_stats(
        partials, n_pos, goodness=goodness, threshold=threshold, temperature=TEMPERATURE, n_features=37, rms=rms
    )
    assert all(t.dtype == torch.float32 and t.shape == (n_pos + n_neg,) for t in stats)
    assert_close(stats.goodness, ref_g, REL_FP32, "goodness")
    ref_loss = FF.ff_loss(ref_g[:n_pos], ref_g[n_pos:], goodness, threshold, TEMPERATURE)
    assert_close(stats.loss_rows.sum(), ref_loss, REL_FP32, "loss")
    ref_coef = FF.loss_goodness_grad(ref_g, n_pos, goodness, threshold, TEMPERATURE)
    assert_close(stats.coef, ref_coef, REL_FP32, "coef")
    y = scale_rows(h.to(device=device, dtype=dtype), stats.inv_norm)
    assert y.dtype == dtype
    assert_close(y, FF.normalize(h, goodness, rms), rel_for(dtype, REL_BF16_H), "normalized output")


@pytest.mark.parametrize("goodness", FF.GOODNESS)
def test_row_stats_saturated_logits(device, goodness):
    """|logit| = 200: exp(-|v|) underflows to 0, loss and coef stay finite and exact."""
    partials = torch.tensor([[600.0], [200.0], [600.0], [200.0]], device=device)
    stats = ff_row_stats(partials, 2, goodness=goodness, threshold=400.0, temperature=1.0, n_features=4)
    ref_g = partials.double().cpu().sum(1)
    ref_loss = FF.ff_loss(ref_g[:2], ref_g[2:], goodness, 400.0)
    assert_close(stats.loss_rows.sum(), ref_loss, REL_FP32, "loss")
    assert_close(stats.coef, FF.loss_goodness_grad(ref_g, 2, goodness, 400.0), REL_FP32, "coef")


# Every case with x_scale and mask on (each alone is covered by test_forward), two cases plain.
UPDATE_CASES = [(case, "scaled_masked") for case in CASES] + [(CASES[1], "plain"), (CASES[3], "plain")]
UPDATE_IDS = [f"{name}-scaled_masked" for name in CASE_IDS] + [f"{CASE_IDS[1]}-plain", f"{CASE_IDS[3]}-plain"]


@pytest.mark.parametrize("case, features", UPDATE_CASES, ids=UPDATE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("goodness", FF.GOODNESS)
def test_update_grad_matches_autograd(device, goodness, dtype, case, features):
    check_update_grad(device, goodness, dtype, case, features)


def check_update_grad(device, goodness, dtype, case, features):
    """Forward, row statistics and the update in "grad" mode against autograd on the float64 loss."""
    p = case_problem(device, dtype, case, features, seed=2)
    threshold = p.threshold(goodness)
    h, stats = kernel_stats(p, goodness, threshold)
    g = torch.Generator().manual_seed(3)
    grad_w0 = 0.01 * torch.randn(p.weight.shape, generator=g)  # "grad" accumulates, like backward()
    grad_b0 = None if p.bias is None else 0.01 * torch.randn(p.bias.shape, generator=g)
    weight_grad = grad_w0.to(device=device, dtype=dtype, copy=True)
    bias_grad = None if grad_b0 is None else grad_b0.to(device=device, dtype=dtype, copy=True)
    ff_linear_update(
        p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness=goodness, mode="grad",
        weight_grad=weight_grad, bias_grad=bias_grad, precision="ieee", **p.kernel_inputs(),
    )
    ref_loss, ref_dw, ref_db = reference_grads(p, goodness, threshold)
    assert_close(stats.loss_rows.sum(), ref_loss, REL_FP32, "loss")
    rel = rel_for(dtype, REL_BF16_GRAD)
    assert_close(weight_grad, grad_w0.to(dtype).double() + ref_dw, rel, "weight_grad")
    if p.bias is not None:
        assert_close(bias_grad, grad_b0.to(dtype).double() + ref_db, rel, "bias_grad")


def sgd_reference_step(ref_params, ref_bufs, p, goodness, threshold, lr, momentum, weight_decay):
    """One float64 functional.sgd_momentum_ step at ref_params (updated in place, with ref_bufs)."""
    ref_p = Problem(p.x_pos, p.x_neg, ref_params[0], ref_params[1], p.x_scale, p.mask)
    _, dw, db = reference_grads(ref_p, goodness, threshold)
    mask = None if p.mask is None else p.mask.cpu()
    FF.sgd_momentum_(ref_params[0], dw, ref_bufs[0], lr, momentum, weight_decay, mask)
    if ref_params[1] is not None:
        FF.sgd_momentum_(ref_params[1], db, ref_bufs[1], lr, momentum, weight_decay)


@pytest.mark.parametrize("features", ["plain", "scaled_masked"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASE_IDS[1], CASE_IDS[3]])
@pytest.mark.parametrize("goodness", FF.GOODNESS)
def test_update_sgd_three_steps_fp32(device, goodness, case, features):
    check_sgd_fp32(device, goodness, case, features)


def check_sgd_fp32(device, goodness, case, features):
    """Three fused SGD steps follow the float64 reference trajectory; masked weights stay exactly 0."""
    lr, momentum, weight_decay = 0.3, 0.9, 0.01
    p = case_problem(device, torch.float32, case, features, seed=4)
    threshold = p.threshold(goodness)
    ref_params = [p.weight.double().cpu(), None if p.bias is None else p.bias.double().cpu()]
    ref_bufs = [torch.zeros_like(t) if t is not None else None for t in ref_params]
    weight_buf = torch.zeros_like(p.weight)
    bias_buf = None if p.bias is None else torch.zeros_like(p.bias)
    for step in range(3):
        sgd_reference_step(ref_params, ref_bufs, p, goodness, threshold, lr, momentum, weight_decay)
        h, stats = kernel_stats(p, goodness, threshold)
        ff_linear_update(
            p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness=goodness, mode="sgd",
            weight_buf=weight_buf, bias_buf=bias_buf, lr=lr, momentum=momentum, weight_decay=weight_decay,
            precision="ieee", **p.kernel_inputs(),
        )
        assert_close(p.weight, ref_params[0], REL_FP32, f"weight after step {step + 1}")
        assert_close(weight_buf, ref_bufs[0], REL_FP32, f"weight_buf after step {step + 1}")
        if p.bias is not None:
            assert_close(p.bias, ref_params[1], REL_FP32, f"bias after step {step + 1}")
            assert_close(bias_buf, ref_bufs[1], REL_FP32, f"bias_buf after step {step + 1}")
    if p.mask is not None:
        absent = ~p.mask
        assert (p.weight[absent] == 0).all() and (weight_buf[absent] == 0).all()


@pytest.mark.parametrize("goodness", FF.GOODNESS)
def test_update_sgd_bf16(device, goodness):
    check_sgd_bf16(device, goodness, CASES[1])


def check_sgd_bf16(device, goodness, case):
    """bfloat16 states: each of three steps matches the float64 step taken from the same bf16 state."""
    lr, momentum, weight_decay = 0.3, 0.9, 0.01
    p = case_problem(device, torch.bfloat16, case, "scaled_masked", seed=5)
    threshold = p.threshold(goodness)
    weight_buf, bias_buf = torch.zeros_like(p.weight), torch.zeros_like(p.bias)
    for step in range(3):
        ref_params = [p.weight.double().cpu(), p.bias.double().cpu()]
        ref_bufs = [weight_buf.double().cpu(), bias_buf.double().cpu()]
        sgd_reference_step(ref_params, ref_bufs, p, goodness, threshold, lr, momentum, weight_decay)
        h, stats = kernel_stats(p, goodness, threshold)
        ff_linear_update(
            p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness=goodness, mode="sgd",
            weight_buf=weight_buf, bias_buf=bias_buf, lr=lr, momentum=momentum, weight_decay=weight_decay,
            **p.kernel_inputs(),
        )
        # Compare the steps themselves, not the parameters, which would hide the step in W's size.
        assert_close(weight_buf, ref_bufs[0], REL_BF16_GRAD, f"weight_buf after step {step + 1}")
        assert_close(bias_buf, ref_bufs[1], REL_BF16_GRAD, f"bias_buf after step {step + 1}")
        assert_close(p.weight, ref_params[0], REL_BF16_GRAD, f"weight after step {step + 1}")
    assert (p.weight[~p.mask] == 0).all() and (weight_buf[~p.mask] == 0).all()


def test_empty_tile_map_is_honored(device):
    """With every tile marked empty, the GEMMs skip all of W; the bias gradient is still formed."""
    p = make_problem(device, torch.float32, 3, 2, 37, 45, masked=False, seed=6)
    full = torch.ones_like(p.weight, dtype=torch.bool)
    fwd, upd = block_config(torch.float32, 37, 45, "ieee"), update_block_config(torch.float32, 37, 45, "ieee")
    none_fwd = torch.zeros_like(mask_tile_occupancy(full, fwd.block_n, fwd.block_k))
    none_upd = torch.zeros_like(mask_tile_occupancy(full, upd.block_n, upd.block_k))
    h, partials = ff_linear_forward(
        p.x_pos, p.x_neg, p.weight, p.bias, goodness="ssq", mask=full, tile_occupancy=none_fwd, precision="ieee"
    )
    assert_close(h, torch.relu(p.bias.double().cpu()).expand(5, -1), REL_FP32, "h from skipped tiles")
    stats = ff_row_stats(partials, 3, goodness="ssq", threshold=1.0, temperature=TEMPERATURE, n_features=37)
    weight_grad, bias_grad = torch.zeros_like(p.weight), torch.zeros_like(p.bias)
    ff_linear_update(
        p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness="ssq", mask=full, tile_occupancy=none_upd,
        mode="grad", weight_grad=weight_grad, bias_grad=bias_grad, precision="ieee",
    )
    assert (weight_grad == 0).all()
    h64 = h.double().cpu()
    ref_db = (stats.coef.double().cpu()[:, None] * FF.goodness_activity_grad(h64, "ssq")).sum(0)
    assert_close(bias_grad, ref_db, REL_FP32, "bias_grad")


def test_empty_batch_and_plain_sgd(device):
    """M = 0: empty forward and stats; an SGD step without momentum buffers still applies weight decay."""
    p = make_problem(device, torch.float32, 0, 0, 37, 45, seed=7)
    h, partials = ff_linear_forward(p.x_pos, p.x_neg, p.weight, p.bias, goodness="sum")
    assert h.shape == (0, 37) and partials.shape[0] == 0
    stats = ff_row_stats(partials, 0, goodness="sum", threshold=0.0, temperature=1.0, n_features=37)
    assert stats.coef.shape == (0,)
    w0, b0 = p.weight.clone(), p.bias.clone()
    ff_linear_update(
        p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness="sum", mode="sgd", lr=0.5, weight_decay=0.1
    )
    assert_close(p.weight, w0.double() * (1 - 0.05), REL_FP32, "decayed weight")
    assert_close(p.bias, b0.double() * (1 - 0.05), REL_FP32, "decayed bias")


def test_default_tf32_precision(device):
    """The default precision ("tf32": TF32 tensor cores on a GPU) within the TF32 tolerance."""
    p = make_problem(device, torch.float32, 5, 3, 37, 45, scaled=True, seed=8)
    threshold = p.threshold("ssq")
    h, stats = kernel_stats(p, "ssq", threshold, precision="tf32")
    x_pos, x_neg, w, b, _ = p.reference()
    assert_close(h, FF.linear_activity(torch.cat([x_pos, x_neg]), w, b), REL_TF32, "h")
    weight_grad, bias_grad = torch.zeros_like(p.weight), torch.zeros_like(p.bias)
    ff_linear_update(
        p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness="ssq", x_scale=p.x_scale,
        mode="grad", weight_grad=weight_grad, bias_grad=bias_grad,
    )
    _, ref_dw, ref_db = reference_grads(p, "ssq", threshold)
    assert_close(weight_grad, ref_dw, REL_TF32, "weight_grad")
    assert_close(bias_grad, ref_db, REL_TF32, "bias_grad")


def _forward(p, **kw):
    args = {"x_pos": p.x_pos, "x_neg": p.x_neg, "weight": p.weight, "bias": p.bias, "goodness": "ssq"} | kw
    return ff_linear_forward(args.pop("x_pos"), args.pop("x_neg"), args.pop("weight"), args.pop("bias"), **args)


def _row_stats(p, **kw):
    args = {"partials": torch.zeros(5, 3, device=p.weight.device), "n_pos": 2, "goodness": "ssq"} | kw
    args = {"threshold": 0.0, "temperature": 1.0, "n_features": 37} | args
    return ff_row_stats(args.pop("partials"), args.pop("n_pos"), **args)


def _update(p, **kw):
    dev = p.weight.device
    args = {"h": torch.zeros(5, 37, device=dev), "coef": torch.zeros(5, device=dev), "goodness": "ssq"} | kw
    h, coef = args.pop("h"), args.pop("coef")
    return ff_linear_update(p.x_pos, p.x_neg, h, coef, p.weight, p.bias, **args)


def _grads(p):
    return {"weight_grad": torch.zeros_like(p.weight), "bias_grad": torch.zeros_like(p.bias)}


BAD_CALLS = {  # name: (call on a Problem with Mp=3, Mn=2, N=37, K=45, exception, message pattern)
    "goodness": (lambda p: _forward(p, goodness="l2"), ValueError, "goodness must be one of"),
    "precision": (lambda p: _forward(p, precision="tf64"), ValueError, "precision must be one of"),
    "x_neg_width": (lambda p: _forward(p, x_neg=p.x_neg[:, :7]), ValueError, r"x_neg must have shape \(2, 45\)"),
    "x_dtype": (lambda p: _forward(p, x_pos=p.x_pos.double()), TypeError, "x_pos must have dtype torch.float32"),
    "weight_dtype": (lambda p: _forward(p, weight=p.weight.half(), bias=None), TypeError, "weight dtype"),
    "bias_shape": (lambda p: _forward(p, bias=p.bias[:5]), ValueError, r"bias must have shape \(37,\)"),
    "x_stride": (lambda p: _forward(p, x_pos=p.x_pos.T.contiguous().T), ValueError, "unit stride"),
    "x_scale_shape": (
        lambda p: _forward(p, x_scale=torch.ones(4, device=p.weight.device)),
        ValueError,
        r"x_scale must have shape \(5,\)",
    ),
    "mask_dtype": (lambda p: _forward(p, mask=torch.ones_like(p.weight)), TypeError, "mask must be bool or uint8"),
    "occupancy_shape": (
        lambda p: _forward(
            p,
            mask=torch.ones_like(p.weight, dtype=torch.bool),
            tile_occupancy=torch.ones(1, 1, dtype=torch.int32, device=p.weight.device),
        ),
        ValueError,
        "tile_occupancy must have shape",
    ),
    "occupancy_without_mask": (
        lambda p: _forward(p, tile_occupancy=torch.ones(3, 3, dtype=torch.int32, device=p.weight.device)),
        ValueError,
        "without a mask",
    ),
    "n_pos": (lambda p: _row_stats(p, n_pos=6), ValueError, "n_pos must be in"),
    "temperature": (lambda p: _row_stats(p, temperature=0.0), ValueError, "temperature"),
    "partials_dtype": (
        lambda p: _row_stats(p, partials=torch.zeros(5, 3, dtype=torch.float64, device=p.weight.device)),
        TypeError,
        "partials must have dtype",
    ),
    "inv_norm_shape": (
        lambda p: scale_rows(torch.zeros(5, 37, device=p.weight.device), torch.ones(3, device=p.weight.device)),
        ValueError,
        r"inv_norm must have shape \(5,\)",
    ),
    "mode": (lambda p: _update(p, mode="adam", **_grads(p)), ValueError, "mode must be one of"),
    "grad_missing": (lambda p: _update(p, mode="grad"), ValueError, "needs weight_grad"),
    "grad_with_lr": (lambda p: _update(p, mode="grad", lr=0.1, **_grads(p)), ValueError, "for mode='sgd' only"),
    "sgd_with_grad": (
        lambda p: _update(p, mode="sgd", lr=0.1, weight_grad=torch.zeros_like(p.weight)),
        ValueError,
        "for mode='grad' only",
    ),
    "momentum_without_buf": (lambda p: _update(p, mode="sgd", lr=0.1, momentum=0.9), ValueError, "needs weight_buf"),
    "half_the_bufs": (
        lambda p: _update(p, mode="sgd", lr=0.1, momentum=0.9, weight_buf=torch.zeros_like(p.weight)),
        ValueError,
        "both weight_buf and bias_buf",
    ),
    "weight_grad_shape": (
        lambda p: _update(p, weight_grad=p.weight[:3].clone(), bias_grad=torch.zeros_like(p.bias)),
        ValueError,
        r"weight_grad must have shape \(37, 45\)",
    ),
    "h_shape": (
        lambda p: _update(p, h=torch.zeros(4, 37, device=p.weight.device), **_grads(p)),
        ValueError,
        r"h must have shape \(5, 37\)",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise(device, name):
    call, exc, match = BAD_CALLS[name]
    p = make_problem(device, torch.float32, 3, 2, 37, 45, seed=9)
    with pytest.raises(exc, match=match):
        call(p)


@pytest.mark.gpu
def test_cpu_tensors_rejected_on_gpu():
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs CPU tensors")
    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ff_linear_forward(torch.zeros(1, 4), torch.zeros(1, 4), w, None, goodness="ssq")
