"""Every fast backend of the FF linear ops against float64 ground truth from functional.py.

Tolerances follow FlashAttention's tests: a fast backend passes when its error against the
float64 truth is at most twice the error of the plain-torch reference backend run in the same
precision, plus a small absolute floor (``FLOOR`` times the magnitude of the quantity) for
quantities that the same-precision reference happens to get almost exactly right.
"""

import pytest
import torch

from ff_kernels import ops

from reference_tools import max_err, random_mask, ref64_step, scale_of

GOODNESS = ["ssq", "neg_ssq", "sum"]
# (positive rows, negative rows, D_in, D_out): batch 1, ragged sizes, unequal halves, one empty half
SHAPES = [(1, 1, 45, 37), (9, 5, 70, 33), (6, 0, 20, 17), (0, 4, 33, 18)]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def backend_device(backend: str) -> str:
    if backend == "triton":
        pytest.importorskip("triton")
        return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 (conftest)
    return "cpu"


def make_case(n_pos, n_neg, n_in, n_out, dtype, device, masked, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(n_pos, n_in, generator=gen)
    x_neg = torch.rand(n_neg, n_in, generator=gen)
    w = (torch.rand(n_out, n_in, generator=gen) - 0.4) * (3.0 / n_in**0.5)
    b = torch.randn(n_out, generator=gen) * 0.1
    mask = random_mask(n_out, n_in, gen) if masked else None
    if mask is not None:
        w = w * mask
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(x_pos), cast(x_neg), cast(w), cast(b), None if mask is None else mask.to(device)


def threshold_for(kind, n_out):
    return n_out * (0.5 if kind == "sum" else 1.0)


def check_close(name, fast, ref_same_precision, truth, dtype):
    bound = 2 * max_err(ref_same_precision, truth) + FLOOR[dtype] * scale_of(truth)
    err = max_err(fast, truth)
    assert err <= bound, f"{name}: error {err:.3g} vs bound {bound:.3g} (reference error {max_err(ref_same_precision, truth):.3g})"


def run_grad_mode(backend, x_pos, x_neg, w, b, kind, mask, rms, compute_dtype=None):
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    with torch.no_grad():
        step = ops.ff_linear_step(
            x_pos, x_neg, w, b, goodness=kind, threshold=threshold_for(kind, w.shape[0]), temperature=3.0,
            rms=rms, mask=mask, backend=backend, compute_dtype=compute_dtype,
        )
    return step, w.grad, b.grad


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("shape", SHAPES)
def test_step_grad_mode_matches_reference(backend, dtype, masked, kind, shape):
    device = backend_device(backend)
    x_pos, x_neg, w, b, mask = make_case(*shape, dtype, device, masked)
    rms = shape[0] % 2 == 1
    truth = ref64_step(x_pos, x_neg, w, b, goodness=kind, threshold=threshold_for(kind, w.shape[0]),
                       temperature=3.0, rms=rms, mask=mask)
    fast, fast_dw, fast_db = run_grad_mode(backend, x_pos, x_neg, w, b, kind, mask, rms)
    ref, ref_dw, ref_db = run_grad_mode("reference", x_pos, x_neg, w, b, kind, mask, rms)
    assert truth["dw"].abs().sum() > 0, "degenerate case: all gradients zero"
    check_close("loss", fast.loss, ref.loss, truth["loss"], dtype)
    check_close("goodness", fast.goodness, ref.goodness, truth["goodness"], dtype)
    check_close("output", fast.output, ref.output, truth["output"], dtype)
    check_close("dW", fast_dw, ref_dw, truth["dw"], dtype)
    check_close("db", fast_db, ref_db, truth["db"], dtype)
    assert fast.output.dtype == dtype and fast.goodness.dtype == torch.float32 and fast_dw.dtype == dtype
    if mask is not None:
        assert (fast_dw[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("masked", [False, True])
def test_sgd_mode_matches_reference_over_steps(backend, kind, masked):
    device = backend_device(backend)
    x_pos, x_neg, w, b, mask = make_case(5, 4, 29, 21, torch.float32, device, masked, seed=3)
    params = {name: (w.clone(), b.clone(), torch.zeros_like(w), torch.zeros_like(b)) for name in (backend, "reference")}
    for step in range(3):
        for name, (pw, pb, bw, bb) in params.items():
            ops.ff_linear_step(
                x_pos, x_neg, pw, pb, goodness=kind, threshold=threshold_for(kind, 21), temperature=2.0, mask=mask,
                mode="sgd", lr=0.05, momentum=0.9, weight_decay=0.01, weight_buf=bw, bias_buf=bb, backend=name,
            )
    fast, ref = params[backend], params["reference"]
    assert max_err(fast[0], w) > 1e-3, "the steps did not move the weights"
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if mask is not None:
        assert (fast[0][~mask] == 0).all() and (fast[2][~mask] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_sgd_without_momentum_and_accumulating_grad(backend):
    device = backend_device(backend)
    x_pos, x_neg, w, b, _ = make_case(3, 3, 19, 11, torch.float32, device, False, seed=5)
    results = {}
    for name in (backend, "reference"):
        pw, pb = w.clone(), b.clone()
        ops.ff_linear_step(x_pos, x_neg, pw, pb, threshold=5.0, mode="sgd", lr=0.1, weight_decay=0.1, backend=name)
        gw = w.clone().requires_grad_()
        gw.grad = torch.ones_like(w)  # existing gradient must be added to, not overwritten
        ops.ff_linear_step(x_pos, x_neg, gw, None, threshold=5.0, backend=name)
        results[name] = (pw, pb, gw.grad)
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert max_err(results[backend][2], torch.ones_like(w)) > 1e-4


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("batch", [1, 13])
def test_forward_matches_reference(backend, kind, batch):
    device = backend_device(backend)
    x, _, w, b, mask = make_case(batch, 0, 40, 26, torch.float32, device, True, seed=7)
    out, g = ops.ff_linear_forward(x, w, b, goodness=kind, mask=mask, backend=backend)
    truth = ref64_step(x, x[:0], w, b, goodness=kind, threshold=0.0, temperature=1.0, mask=mask)
    ref_out, ref_g = ops.ff_linear_forward(x, w, b, goodness=kind, mask=mask, backend="reference")
    check_close("output", out, ref_out, truth["output"], torch.float32)
    check_close("goodness", g, ref_g, truth["goodness"], torch.float32)


@pytest.mark.filterwarnings("ignore:compute_dtype=torch.bfloat16 on a CPU without")
@pytest.mark.parametrize("kind", GOODNESS)
def test_cpu_bf16_compute_mode(kind):
    """fp32 parameters, bf16 GEMMs: compare with the reference on bf16-rounded inputs and weights."""
    x_pos, x_neg, w, b, _ = make_case(8, 8, 64, 48, torch.float32, "cpu", False, seed=11)
    rounded = [t.bfloat16() for t in (x_pos, x_neg, w, b)]
    truth = ref64_step(*rounded, goodness=kind, threshold=threshold_for(kind, 48), temperature=3.0)
    fast, fast_dw, fast_db = run_grad_mode("cpu", x_pos, x_neg, w, b, kind, None, False, compute_dtype=torch.bfloat16)
    ref, ref_dw, ref_db = run_grad_mode("reference", *rounded, kind, None, False)
    assert fast_dw.dtype == torch.float32
    for name, got, want_ref, want in [
        ("loss", fast.loss, ref.loss, truth["loss"]), ("goodness", fast.goodness, ref.goodness, truth["goodness"]),
        ("dW", fast_dw, ref_dw, truth["dw"]), ("db", fast_db, ref_db, truth["db"]),
    ]:
        check_close(name, got, want_ref, want, torch.bfloat16)


@pytest.mark.parametrize("flags,warns", [({"avx512f"}, True), ({"avx512f", "amx_bf16"}, False)])
def test_bf16_mode_warns_when_the_cpu_emulates_bf16(monkeypatch, flags, warns):
    import warnings

    from ff_kernels.ops import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    cpu_features.warn_if_bf16_emulated.cache_clear()
    x, _, w, b, _ = make_case(2, 0, 8, 4, torch.float32, "cpu", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.ff_linear_forward(x, w, b, backend="cpu", compute_dtype=torch.bfloat16)
    cpu_features.warn_if_bf16_emulated.cache_clear()
    assert any("emulates bf16" in str(c.message) for c in caught) == warns
