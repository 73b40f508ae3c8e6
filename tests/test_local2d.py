"""Locally connected 2-D FF layers: compiled kernels vs the torch reference vs the masked dense layer.

Every path is checked against float64 ground truth from functional_local.py with the
FlashAttention-style bound of test_ops_linear.py: a fast path's error is at most twice the error
of the plain-torch reference run in the same precision, plus a small floor relative to the
magnitude of the quantity. The masked dense path is FFLinear's (mask=local_dense_mask(spec),
paper footnote 13) on the flattened images.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from ff_kernels import ops
from ff_kernels.functional import local as FFL
from ff_kernels.functional.local import LocalSpec
from ff_kernels.ops import ext_local2d, local2d
from ff_kernels.ops.local2d import ff_local2d_forward, ff_local2d_step

from reference_tools import max_err, scale_of

GOODNESS = ["ssq", "neg_ssq", "sum"]
FLOOR = 1e-5
CIFAR = LocalSpec(3, 32, 32, 3, kernel=11, stride=1, padding=5)
MNIST = [  # footnote 8
    LocalSpec(1, 28, 28, 128, kernel=10, stride=6, padding=0),
    LocalSpec(128, 4, 4, 220, kernel=2, stride=1, padding=0),
    LocalSpec(220, 3, 3, 512, kernel=2, stride=1, padding=0),
]
ODD = [
    LocalSpec(2, 9, 7, 5, kernel=3, stride=2, padding=2),  # truncated edges, non-square map
    LocalSpec(3, 10, 8, 7, kernel=4, stride=3, padding=3),
    LocalSpec(1, 5, 5, 2, kernel=5, stride=1, padding=4),  # corner windows see one pixel
    LocalSpec(2, 6, 6, 4, kernel=3, stride=1, padding=1),
]
# (spec, positive images, negative images): batch 1, one empty half, more than one batch tile
CASES = [(CIFAR, 1, 1), (MNIST[0], 2, 1), (MNIST[1], 1, 2), (MNIST[2], 2, 2),
         (ODD[0], 1, 0), (ODD[1], 0, 3), (ODD[2], 3, 2), (ODD[3], 20, 19)]
CASE_IDS = ["cifar", "mnist1", "mnist2", "mnist3", "odd-s2p2", "odd-s3p3", "odd-k5p4", "odd-b39"]

needs_ext = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                               reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")


def make_case(spec, n_pos, n_neg, device="cpu", seed=0):
    """Inputs in [0, 1), weights with mostly positive pre-activations, zero outside the map."""
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(n_pos, *spec.input_shape, generator=gen)
    x_neg = torch.rand(n_neg, *spec.input_shape, generator=gen)
    w = (torch.rand(*spec.weight_shape, generator=gen) - 0.4) * (3.0 / spec.block_size**0.5)
    w = w * FFL.local_valid_mask(spec)[:, None, :]
    b = torch.randn(*spec.bias_shape, generator=gen) * 0.1
    return [t.to(device) for t in (x_pos, x_neg, w, b)]


def outside(t, spec):
    """The entries of a (L, C_out, K) weight-shaped tensor whose window position lies outside the map."""
    return t.transpose(1, 2)[~FFL.local_valid_mask(spec, t.device)]


def threshold_for(kind, spec):
    return spec.out_features * (0.5 if kind == "sum" else 1.0)


def truth64(x_pos, x_neg, w, b, spec, kind, rms=False, threshold=None):
    """Loss, goodness, normalized output (B, C_out, H_out, W_out), dW, db of one step in float64."""
    from ff_kernels import functional as FF

    d = [t.double() for t in (x_pos, x_neg, w, b)]
    threshold = threshold_for(kind, spec) if threshold is None else threshold
    loss, dw, db = FFL.ff_local_grads(*d, spec, kind, threshold, 3.0)
    h = FFL.local_activity(torch.cat(d[:2]), d[2], d[3], spec).flatten(1)
    output = FF.normalize(h, kind, rms).view(-1, *spec.output_shape)
    return {"loss": loss, "goodness": FF.goodness(h, kind), "output": output, "dw": dw, "db": db}


def check_close(name, fast, ref_same_precision, truth):
    bound = 2 * max_err(ref_same_precision, truth) + FLOOR * scale_of(truth)
    err = max_err(fast, truth)
    ref_err = max_err(ref_same_precision, truth)
    assert err <= bound, f"{name}: error {err:.3g} vs bound {bound:.3g} (reference error {ref_err:.3g})"


def local_step(backend, x_pos, x_neg, w, b, spec, kind, rms=False):
    """One grad-mode step on copies of the parameters -> (FFLayerStep, dW, db)."""
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    step = ff_local2d_step(x_pos, x_neg, w, b, spec, goodness=kind, threshold=threshold_for(kind, spec),
                           temperature=3.0, rms=rms, backend=backend)
    return step, w.grad, b.grad


def dense_step(backend, x_pos, x_neg, w, b, spec, kind, rms=False):
    """The same step through FFLinear's masked dense op (footnote 13) -> (FFLayerStep, dense dW, dense db)."""
    mask = FFL.local_dense_mask(spec, w.device)
    dw = FFL.local_weight_to_dense(w, spec).clone().requires_grad_()
    db = b.t().reshape(-1).clone().requires_grad_()
    step = ops.ff_linear_step(x_pos.flatten(1), x_neg.flatten(1), dw, db, goodness=kind, mask=mask, rms=rms,
                              threshold=threshold_for(kind, spec), temperature=3.0, backend=backend)
    return step, dw.grad, db.grad


@needs_ext
@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grad_step_extension_reference_and_dense_agree_with_float64(case, kind):
    spec, n_pos, n_neg = case
    x_pos, x_neg, w, b = make_case(spec, n_pos, n_neg)
    rms = n_pos % 2 == 1
    truth = truth64(x_pos, x_neg, w, b, spec, kind, rms)
    assert truth["dw"].abs().sum() > 0, "degenerate case: all gradients zero"
    fast, fast_dw, fast_db = local_step("cpu", x_pos, x_neg, w, b, spec, kind, rms)
    ref, ref_dw, ref_db = local_step("reference", x_pos, x_neg, w, b, spec, kind, rms)
    for name in ("loss", "goodness", "output"):
        check_close(name, getattr(fast, name), getattr(ref, name), truth[name])
    check_close("dW", fast_dw, ref_dw, truth["dw"])
    check_close("db", fast_db, ref_db, truth["db"])
    assert (outside(fast_dw, spec) == 0).all()

    dense, dense_dw, dense_db = dense_step("cpu", x_pos, x_neg, w, b, spec, kind, rms)
    dense_ref, dense_ref_dw, dense_ref_db = dense_step("reference", x_pos, x_neg, w, b, spec, kind, rms)
    check_close("dense output", dense.output, dense_ref.output, truth["output"].flatten(1))
    check_close("dense goodness", dense.goodness, dense_ref.goodness, truth["goodness"])
    check_close("dense dW", dense_dw, dense_ref_dw, FFL.local_weight_to_dense(truth["dw"], spec))
    check_close("dense db", dense_db, dense_ref_db, truth["db"].t().reshape(-1))


@needs_ext
@pytest.mark.parametrize("case", CASES[:5], ids=CASE_IDS[:5])
def test_forward_matches_reference_and_dense(case):
    spec, n_pos, _ = case
    x, _, w, b = make_case(spec, n_pos, 0, seed=1)
    truth = truth64(x, x[:0], w, b, spec, "ssq", threshold=0.0)
    out, g = ff_local2d_forward(x, w, b, spec, backend="cpu")
    ref_out, ref_g = ff_local2d_forward(x, w, b, spec, backend="reference")
    assert out.shape == (n_pos, *spec.output_shape) and g.dtype == torch.float32
    check_close("output", out, ref_out, truth["output"])
    check_close("goodness", g, ref_g, truth["goodness"])
    dense_out, _dense_g = ops.ff_linear_forward(x.flatten(1), FFL.local_weight_to_dense(w, spec), b.t().reshape(-1),
                                               mask=FFL.local_dense_mask(spec), backend="cpu")
    check_close("dense output", dense_out, ref_out.flatten(1), truth["output"].flatten(1))


@pytest.mark.parametrize("spec", [ODD[0], ODD[2], MNIST[1]])
@pytest.mark.parametrize("kind", GOODNESS)
def test_explicit_reference_gradients_equal_autograd(spec, kind):
    x_pos, x_neg, w, b = [t.double() for t in make_case(spec, 2, 3, seed=2)]
    loss, dw, db = FFL.ff_local_grads(x_pos, x_neg, w, b, spec, kind, threshold_for(kind, spec), 3.0)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    expected = FFL.ff_local_loss(x_pos, x_neg, w, b, spec, kind, threshold_for(kind, spec), 3.0)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(dw, w.grad)
    torch.testing.assert_close(db, b.grad)
    assert (outside(w.grad, spec) == 0).all()


def test_dense_mask_is_the_local_connectivity():
    spec = ODD[1]
    x, _, w, b = make_case(spec, 3, 0, seed=4)
    mask = FFL.local_dense_mask(spec)
    valid = FFL.local_valid_mask(spec)
    assert mask.shape == (spec.out_features, spec.in_features)
    assert int(mask.sum()) == spec.out_channels * int(valid.sum())
    dense_w = FFL.local_weight_to_dense(w, spec)
    assert (dense_w[~mask] == 0).all()
    z = FFL.local_linear(x, w, b, spec)
    torch.testing.assert_close(z.flatten(1), x.flatten(1) @ dense_w.t() + b.t().reshape(-1))
    # CIFAR interior units see 3 * 11 * 11 = 363 inputs, corner units 3 * 6 * 6
    counts = FFL.local_valid_mask(CIFAR).sum(1).view(32, 32)
    assert counts[16, 16] == 363 and counts[0, 0] == 108


SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
SGD_CASES = [(CIFAR, 1, 1), (MNIST[1], 2, 1), (ODD[2], 3, 2), (ODD[3], 20, 19)]


@needs_ext
@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("case", SGD_CASES, ids=["cifar", "mnist2", "odd-k5p4", "odd-b39"])
def test_fused_sgd_matches_reference_over_three_steps(case, kind):
    spec, n_pos, n_neg = case
    x_pos, x_neg, w, b = make_case(spec, n_pos, n_neg, seed=3)
    params = {name: (w.clone(), b.clone(), torch.zeros_like(w), torch.zeros_like(b)) for name in ("cpu", "reference")}
    for _ in range(3):
        for name, (pw, pb, bw, bb) in params.items():
            ff_local2d_step(x_pos, x_neg, pw, pb, spec, goodness=kind, threshold=threshold_for(kind, spec),
                            temperature=2.0, backend=name, mode="sgd", weight_buf=bw, bias_buf=bb, **SGD)
    fast, ref = params["cpu"], params["reference"]
    assert max_err(fast[0], w) > 1e-4, "the steps did not move the weights"
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for weight, buf in ((fast[0], fast[2]), (ref[0], ref[2])):
        assert (outside(weight, spec) == 0).all() and (outside(buf, spec) == 0).all()


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sgd_without_momentum_or_bias_and_grad_accumulation(backend):
    spec = ODD[0]
    x_pos, x_neg, w, b = make_case(spec, 3, 3, seed=5)
    results = {}
    for name in (backend, "reference"):
        pw, pb = w.clone(), b.clone()
        ff_local2d_step(x_pos, x_neg, pw, pb, spec, threshold=50.0, mode="sgd", lr=0.1, weight_decay=0.1, backend=name)
        nw = w.clone()
        ff_local2d_step(x_pos, x_neg, nw, None, spec, threshold=50.0, mode="sgd", lr=0.1, backend=name)
        gw = w.clone().requires_grad_()
        gw.grad = torch.ones_like(w)  # an existing gradient is added to, not overwritten
        ff_local2d_step(x_pos, x_neg, gw, None, spec, threshold=50.0, backend=name)
        results[name] = (pw, pb, nw, gw.grad)
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert max_err(results[backend][3], torch.ones_like(w)) > 1e-4


@needs_ext
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_cpu_builds_agree(isa):
    """The SSE2 / AVX2 builds of the kernels (picked with FF_KERNELS_CPU_ISA) match the reference."""
    script = (
        "import torch, test_local2d as t\n"
        "for case in t.CASES[3:]:\n"
        "    spec, n_pos, n_neg = case\n"
        "    x_pos, x_neg, w, b = t.make_case(spec, n_pos, n_neg)\n"
        "    fast, fast_dw, fast_db = t.local_step('cpu', x_pos, x_neg, w, b, spec, 'ssq')\n"
        "    ref, ref_dw, ref_db = t.local_step('reference', x_pos, x_neg, w, b, spec, 'ssq')\n"
        "    torch.testing.assert_close(fast.output, ref.output, rtol=1e-4, atol=1e-6)\n"
        "    torch.testing.assert_close(fast_dw, ref_dw, rtol=1e-4, atol=1e-4)\n"
        "    torch.testing.assert_close(fast_db, ref_db, rtol=1e-4, atol=1e-4)\n"
    )
    env = dict(os.environ, FF_KERNELS_CPU_ISA=isa, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=os.path.dirname(__file__))


def test_bfloat16_uses_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(local2d, "_warned", set())
    spec = ODD[0]
    x, _, w, b = [t.bfloat16() for t in make_case(spec, 2, 0)]
    with pytest.warns(RuntimeWarning, match="float32 only"):
        out, g = ff_local2d_forward(x, w, b, spec)
    ref_out, ref_g = ff_local2d_forward(x, w, b, spec, backend="reference")
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out) and torch.equal(g, ref_g)


def test_auto_without_the_extension_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.setattr(ext_local2d, "load_error", lambda: "No module named 'ff_kernels._C'")
    monkeypatch.setattr(local2d, "_warned", set())
    spec = ODD[0]
    x, _, w, b = make_case(spec, 2, 0)
    with pytest.warns(RuntimeWarning, match="No module named 'ff_kernels._C'"):
        out, g = ff_local2d_forward(x, w, b, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff_local2d_forward(x, w, b, spec)  # warned once only
    ref_out, ref_g = ff_local2d_forward(x, w, b, spec, backend="reference")
    assert torch.equal(out, ref_out) and torch.equal(g, ref_g)
    with pytest.raises(RuntimeError, match="backend 'cpu' needs the compiled kernels: No module named"):
        ff_local2d_forward(x, w, b, spec, backend="cpu")


def test_spec_errors_name_the_shapes():
    with pytest.raises(ValueError, match="does not fit the 4x4 input map"):
        LocalSpec(1, 4, 4, 2, kernel=5)
    with pytest.raises(ValueError, match="padding 3 must be smaller than the kernel 3"):
        LocalSpec(1, 8, 8, 2, kernel=3, padding=3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        LocalSpec(1, 8, 8, 2, kernel=3, stride=0)
    with pytest.raises(TypeError, match="kernel must be an int"):
        LocalSpec(1, 8, 8, 2, kernel=3.0)
    assert (MNIST[0].out_height, MNIST[0].out_width, MNIST[0].block_size) == (4, 4, 100)
    assert (CIFAR.num_locations, CIFAR.out_features) == (1024, 3072)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_bad_inputs_raise_clear_errors(backend):
    spec = ODD[0]
    x, _, w, b = make_case(spec, 2, 0)
    call = lambda *a, **k: ff_local2d_forward(*a, backend=backend, **k)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2, 9, 7\)"):
        call(x[:, :1], w, b, spec)
    with pytest.raises(TypeError, match="x must have dtype torch.float32"):
        call(x.double(), w, b, spec)
    with pytest.raises(ValueError, match=r"weight must have shape \(30, 5, 18\)"):
        call(x, w[:, :4], b, spec)
    with pytest.raises(ValueError, match=r"bias must have shape \(30, 5\)"):
        call(x, w, b.t(), spec)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        call(x, w.transpose(0, 1).contiguous().transpose(0, 1), b, spec)
    with pytest.raises(ValueError, match="contains NaN"):
        call(x * float("nan"), w, b, spec)
    with pytest.raises(TypeError, match="spec must be a ff_kernels.functional.local.LocalSpec"):
        call(x, w, b, (2, 9, 7))
    with pytest.raises(ValueError, match="momentum=0.9 needs weight_buf"):
        ff_local2d_step(x, x, w, b, spec, mode="sgd", lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match="both x_pos and x_neg are empty"):
        ff_local2d_step(x[:0], x[:0], w, b, spec, backend=backend)


def test_backend_resolution_errors():
    spec = ODD[0]
    x, _, w, b = make_case(spec, 1, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ff_local2d_forward(x, w, b, spec, backend="triton")
    with pytest.raises(ValueError, match="backend 'cuda' needs cuda tensors"):
        ff_local2d_forward(x, w, b, spec, backend="cuda")
    with pytest.raises(TypeError, match="float32 only"):
        ff_local2d_forward(x.bfloat16(), w.bfloat16(), b.bfloat16(), spec, backend="cpu")


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("spec", ODD, ids=str)
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("relu", [True, False])
def test_compiled_forward_adds_extra_before_the_optional_relu(device, spec, batch, relu):
    """relu(z + extra) and z + extra against the float64 reference, on ragged strided maps, for
    batch 1 and 33 (one image past the CPU kernel's 32-image work item)."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *spec.input_shape, generator=gen)
    w = torch.randn(*spec.weight_shape, generator=gen) * FFL.local_valid_mask(spec)[:, None, :]
    b = torch.randn(*spec.bias_shape, generator=gen)
    extra = torch.randn(batch, *spec.output_shape, generator=gen)
    z = FFL.local_linear(x.double(), w.double(), b.double(), spec) + extra.double()
    expected = torch.relu(z) if relu else z
    on = [t.to(device) for t in (x, w, b, extra)]
    got = torch.ops.ff_kernels.local2d_forward(*on[:3], spec.kernel, spec.stride, spec.padding, on[3], relu).cpu()
    assert (z < 0).any()
    # float32 sums of at most block_size products of unit-scale terms
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * spec.block_size**0.5)


@needs_ext
def test_compiled_op_checks_its_inputs():
    spec = ODD[0]
    x, _, w, b = make_case(spec, 2, 0)
    op = torch.ops.ff_kernels
    with pytest.raises(RuntimeError, match=r"local2d_forward: weight must have shape \[30, 5, 18\], got \[30, 5, 17\]"):
        op.local2d_forward(x, w[:, :, :17].contiguous(), b, 3, 2, 2)
    with pytest.raises(RuntimeError, match="local2d_forward: x must be float32"):
        op.local2d_forward(x.double(), w, b, 3, 2, 2)
    with pytest.raises(RuntimeError, match=r"local2d_forward: extra must have shape \[2, 5, 6, 5\], got \[1, 5, 6, 5\]"):
        op.local2d_forward(x, w, b, 3, 2, 2, torch.zeros(1, 5, 6, 5))
    h = op.local2d_forward(x, w, b, 3, 2, 2)
    with pytest.raises(RuntimeError, match=r"local2d_grad_: coef must have shape \[2\]"):
        op.local2d_grad_(x, h, torch.ones(3), "ssq", 3, 2, 2, torch.zeros_like(w), None)
    with pytest.raises(RuntimeError, match="goodness must be 'ssq', 'neg_ssq' or 'sum'"):
        op.local2d_grad_(x, h, torch.ones(2), "l2", 3, 2, 2, torch.zeros_like(w), None)
    with pytest.raises(RuntimeError, match="momentum 0.9 needs weight_buf"):
        op.local2d_sgd_(x, h, torch.ones(2), "ssq", 3, 2, 2, w, b, None, None, 0.1, 0.9, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_grad_step_and_forward_agree_with_float64(case, kind):
    spec, n_pos, n_neg = case
    x_pos, x_neg, w, b = make_case(spec, n_pos, n_neg, device="cuda")
    truth = truth64(x_pos, x_neg, w, b, spec, kind)
    fast, fast_dw, fast_db = local_step("cuda", x_pos, x_neg, w, b, spec, kind)
    ref, ref_dw, ref_db = local_step("reference", x_pos, x_neg, w, b, spec, kind)
    for name in ("loss", "goodness", "output"):
        check_close(name, getattr(fast, name), getattr(ref, name), truth[name])
    check_close("dW", fast_dw, ref_dw, truth["dw"])
    check_close("db", fast_db, ref_db, truth["db"])
    assert (outside(fast_dw, spec) == 0).all()
    if n_pos:
        out, g = ff_local2d_forward(x_pos, w, b, spec, goodness=kind, backend="cuda")
        ref_out, ref_g = ff_local2d_forward(x_pos, w, b, spec, goodness=kind, backend="reference")
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("case", SGD_CASES, ids=["cifar", "mnist2", "odd-k5p4", "odd-b39"])
def test_cuda_fused_sgd_matches_reference_over_three_steps(case, kind):
    spec, n_pos, n_neg = case
    x_pos, x_neg, w, b = make_case(spec, n_pos, n_neg, device="cuda", seed=3)
    params = {name: (w.clone(), b.clone(), torch.zeros_like(w), torch.zeros_like(b)) for name in ("cuda", "reference")}
    for _ in range(3):
        for name, (pw, pb, bw, bb) in params.items():
            ff_local2d_step(x_pos, x_neg, pw, pb, spec, goodness=kind, threshold=threshold_for(kind, spec),
                            temperature=2.0, backend=name, mode="sgd", weight_buf=bw, bias_buf=bb, **SGD)
    for got, want in zip(params["cuda"], params["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (outside(params["cuda"][0], spec) == 0).all() and (outside(params["cuda"][2], spec) == 0).all()
