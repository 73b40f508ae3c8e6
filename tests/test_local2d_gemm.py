"""The batched-GEMM form of the local ops (ops/gemm_local2d.py) against float64 ground truth.

The "cpu" backend runs it for layers of >= 16 units per location (footnote 8's MNIST net) and
the compiled kernels otherwise; FF_KERNELS_LOCAL2D_CPU forces either ("gemm", or "tiles" /
"rows"). Every shape runs both ways here: truncated windows (the zero column), batch 1, an
empty half, each goodness, both modes, with and without momentum and bias. Bound as in
test_local2d.py: at most twice the float32 reference's error plus 1e-5 of the quantity's scale.
"""

import pytest
import torch

from ff_kernels import functional as FF
from ff_kernels.functional import local as FFL
from ff_kernels.functional.local import LocalSpec
from ff_kernels.nn import FFLocal2d, PeerNormalization
from ff_kernels.ops import ext_local2d, gemm_local2d, local2d
from ff_kernels.ops.local2d import ff_local2d_forward, ff_local2d_step

from reference_tools import max_err, scale_of

needs_ext = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                               reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")
FLOOR = 1e-5
CASES = [
    (LocalSpec(1, 28, 28, 128, kernel=10, stride=6), 2, 1),  # footnote 8
    (LocalSpec(128, 4, 4, 220, kernel=2), 1, 2),
    (LocalSpec(220, 3, 3, 512, kernel=2), 1, 0),
    (LocalSpec(2, 9, 7, 17, kernel=3, stride=2, padding=2), 3, 2),  # truncated windows, 17 units
    (LocalSpec(3, 10, 8, 16, kernel=4, stride=3, padding=3), 0, 3),
    (LocalSpec(3, 12, 12, 3, kernel=5, stride=1, padding=2), 1, 1),  # CIFAR-like: 3 units
]
IDS = ["mnist1", "mnist2", "mnist3", "s2p2-u17", "s3p3-u16", "k5p2-u3"]


def make_case(spec, n_pos, n_neg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(n_pos, *spec.input_shape, generator=gen)
    x_neg = torch.rand(n_neg, *spec.input_shape, generator=gen)
    w = (torch.rand(*spec.weight_shape, generator=gen) - 0.4) * (3.0 / spec.block_size**0.5)
    w = w * FFL.local_valid_mask(spec)[:, None, :]
    b = torch.randn(*spec.bias_shape, generator=gen) * 0.1
    return x_pos, x_neg, w, b


def threshold_for(kind, spec):
    return spec.out_features * (0.5 if kind == "sum" else 1.0)


def check_close(name, fast, reference, truth):
    bound = 2 * max_err(reference, truth) + FLOOR * scale_of(truth)
    assert max_err(fast, truth) <= bound, f"{name}: error {max_err(fast, truth):.3g} vs bound {bound:.3g}"


def test_the_cpu_backend_picks_the_batched_gemms_for_many_units_per_location(monkeypatch):
    monkeypatch.delenv("FF_KERNELS_LOCAL2D_CPU", raising=False)
    cpu = torch.device("cpu")
    assert local2d.compiled_module(CASES[0][0], cpu) is gemm_local2d
    assert local2d.compiled_module(CASES[5][0], cpu) is ext_local2d
    monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", "tiles")
    assert local2d.compiled_module(CASES[0][0], cpu) is ext_local2d
    monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", "gemm")
    assert local2d.compiled_module(CASES[5][0], cpu) is gemm_local2d


@needs_ext
@pytest.mark.parametrize("algorithm", ["gemm", "tiles"])
@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_step_and_forward_agree_with_float64(monkeypatch, case, kind, algorithm):
    monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", algorithm)
    spec, n_pos, n_neg = case
    x_pos, x_neg, w, b = make_case(spec, n_pos, n_neg)
    rms = n_pos % 2 == 1
    d = [t.double() for t in (x_pos, x_neg, w, b)]
    loss, dw, db = FFL.ff_local_grads(*d, spec, kind, threshold_for(kind, spec), 3.0)
    h = FFL.local_activity(torch.cat(d[:2]), d[2], d[3], spec).flatten(1)
    truth = {"loss": loss, "goodness": FF.goodness(h, kind), "dw": dw, "db": db,
             "output": FF.normalize(h, kind, rms).view(-1, *spec.output_shape)}
    got, want = {}, {}
    for backend, result in (("cpu", got), ("reference", want)):
        wb = [w.clone().requires_grad_(), b.clone().requires_grad_()]
        step = ff_local2d_step(x_pos, x_neg, *wb, spec, goodness=kind, threshold=threshold_for(kind, spec),
                               temperature=3.0, rms=rms, backend=backend)
        result.update(loss=step.loss, goodness=step.goodness, output=step.output, dw=wb[0].grad, db=wb[1].grad)
    for name, value in truth.items():
        check_close(name, got[name], want[name], value)
    assert (got["dw"].transpose(1, 2)[~FFL.local_valid_mask(spec)] == 0).all()
    x = torch.cat([x_pos, x_neg])
    out, g = ff_local2d_forward(x, w, b, spec, goodness=kind, rms=rms, backend="cpu")
    check_close("forward output", out, want["output"], truth["output"])
    check_close("forward goodness", g, want["goodness"], truth["goodness"])


@needs_ext
@pytest.mark.parametrize("sgd_pass", ["compiled", "fused", "two"], ids=["compiled-pass", "fused-sgd-pass", "two-passes"])
@pytest.mark.parametrize("momentum,bias", [(0.9, True), (0.0, True), (0.9, False)])
@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_fused_sgd_with_peer_norm_follows_the_reference_layer(monkeypatch, case, momentum, bias, sgd_pass):
    """``sgd_pass``: the update of ``cpu_linear.sgd_update`` with weight decay: the compiled pass
    (float32 CPU), torch's fused SGD kernel on a gradient workspace (from FUSED_SGD_MIN weights
    on; here for these small layers too) or two torch passes."""
    from ff_kernels.ops import cpu_linear

    monkeypatch.setattr(cpu_linear, "FUSED_SGD_MIN", 0 if sgd_pass == "fused" else 1 << 62)
    if sgd_pass != "compiled":
        monkeypatch.setattr(cpu_linear, "decay_apply_takes", lambda param, buf: False)
    monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", "gemm")
    spec, n_pos, n_neg = case
    x_pos, x_neg, _, _ = make_case(spec, max(n_pos, 1), n_neg, seed=3)
    layers = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        layers.append(FFLocal2d(spec.in_channels, (spec.in_height, spec.in_width), spec.out_channels, spec.kernel, spec.stride,
                                spec.padding, bias=bias, backend=backend, rms_norm=True,
                                temperature=float(spec.out_features),
                                peer_norm=ff_peer(spec.out_features)))
    fast, ref = layers
    for _ in range(3):
        got = fast.ff_step(x_pos, x_neg, lr=0.05, momentum=momentum, weight_decay=0.01)
        want = ref.ff_step(x_pos, x_neg, lr=0.05, momentum=momentum, weight_decay=0.01)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(float(b.abs().max()), 1e-6), msg=name)
    assert (fast.weight.transpose(1, 2)[~FFL.local_valid_mask(spec)] == 0).all()


def ff_peer(units):
    return PeerNormalization(units, strength=0.2)


def _layouts(x):
    """``x`` stored three ways: contiguous, channels-last, and a strided view of a larger tensor."""
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3])
    wide[..., ::2] = x
    return {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last), "strided": wide[..., ::2]}


@needs_ext
@pytest.mark.parametrize("case", CASES[:5], ids=IDS[:5])
def test_every_input_layout_gives_the_same_step_and_a_channels_last_output(monkeypatch, case):
    """The batched-GEMM form reads contiguous, channels-last (its own output's layout) and other
    strided inputs, also mixed between the halves, to the same bits; it writes channels-last."""
    monkeypatch.setenv("FF_KERNELS_LOCAL2D_CPU", "gemm")
    spec, n_pos, n_neg = case
    x_pos, x_neg, w, b = make_case(spec, max(n_pos, 1), n_neg, seed=5)
    pos_layouts, neg_layouts = _layouts(x_pos), _layouts(x_neg)
    results = {}
    for pos_name, neg_name in [(name, name) for name in pos_layouts] + [("channels_last", "contiguous")]:
        wb = [w.clone().requires_grad_(), b.clone().requires_grad_()]
        step = ff_local2d_step(pos_layouts[pos_name], neg_layouts[neg_name], *wb, spec,
                               threshold=threshold_for("ssq", spec), temperature=3.0, backend="cpu")
        out, g = ff_local2d_forward(pos_layouts[pos_name], w, b, spec, backend="cpu")
        results[pos_name, neg_name] = (step.loss, step.goodness, step.output, wb[0].grad, wb[1].grad, out, g)
        assert spec.out_height * spec.out_width == 1 or step.output.is_contiguous(memory_format=torch.channels_last)
    first = results["contiguous", "contiguous"]
    for key, values in results.items():
        for name, a, b_ in zip(("loss", "goodness", "output", "dw", "db", "forward", "forward goodness"), values, first,
                               strict=True):
            assert torch.equal(a, b_), f"{key}: {name} differs from the contiguous inputs'"
