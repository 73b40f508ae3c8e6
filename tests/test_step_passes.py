"""The compiled CPU passes of a step (csrc/ff_epilogue_cpu.cpp, csrc/gather_cpu.cpp) against their
torch-op references (ops/step_epilogue.py's ``*_torch``, ``torch.index_select``, the windows of
``functional.local.local_patches``).

hypothesis draws the sizes (L locations, B rows, C units: 1 to 40, so rows that fill no whole
vector, batch 1 and a single location all occur), the goodness, the bias, how many leading rows
are summed (0, some, all) and whether the delta, its extra term and the bias sums are asked for.
The output and the delta are one multiply (and one add) per element in both: they agree to
1 ulp-scale rounding (an FMA may fuse the add); g and the column sums are float32 sums in another
order, so they agree to 1e-5 of the sum of magnitudes. The gather copies values: exactly equal.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ff_kernels.functional.local import LocalSpec, local_patches
from ff_kernels.ops import ext_local2d, gemm_local2d, step_epilogue

pytestmark = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                                reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")
SUM_RTOL = 1e-5


@st.composite
def cases(draw):
    locations, batch, channels = draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return {
        "shape": (locations, batch, channels), "kind": draw(st.sampled_from(["ssq", "neg_ssq", "sum"])),
        "bias": draw(st.booleans()), "n_sum": draw(st.sampled_from([0, 1, batch // 2, batch])),
        "delta": draw(st.booleans()), "extra": draw(st.booleans()), "n_extra": draw(st.integers(0, batch)),
        "bias_sum": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
    }


def close_sums(fast, reference, magnitude):
    assert fast.shape == reference.shape
    assert torch.all((fast - reference).abs() <= SUM_RTOL * magnitude + 1e-30), (fast, reference)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_compiled_passes_match_the_torch_passes(case):
    gen = torch.Generator().manual_seed(case["seed"])
    locations, batch, channels = case["shape"]
    h = torch.randn(case["shape"], generator=gen)
    bias = torch.randn(locations, channels, generator=gen) if case["bias"] else None
    fast_h, ref_h = h.clone(), h.clone()
    g, col = step_epilogue.relu_goodness_(fast_h, bias, case["kind"], case["n_sum"])
    g_ref, col_ref = step_epilogue.relu_goodness_torch(ref_h, bias, case["kind"], case["n_sum"])
    assert torch.equal(fast_h, ref_h)  # relu(h + b): the same single add and max
    close_sums(g, g_ref, ref_h.abs().square().sum((0, 2)) if case["kind"] != "sum" else ref_h.sum((0, 2)))
    assert (col is None) == (col_ref is None) == (case["n_sum"] == 0)
    if col is not None:
        close_sums(col, col_ref, ref_h[:, : case["n_sum"]].sum(1))

    scale = torch.rand(batch, generator=gen) + 0.5
    coef = torch.randn(batch, generator=gen) if case["delta"] else None
    extra = torch.randn(locations, channels, generator=gen) if case["delta"] and case["extra"] else None
    bias_sum = case["delta"] and case["bias_sum"]
    out, out_ref = torch.empty(batch, locations * channels), torch.empty(batch, locations * channels)
    sums = step_epilogue.output_and_delta_(fast_h, scale, out, coef, case["kind"], extra, case["n_extra"], bias_sum)
    magnitude = ref_h.abs().amax().item() + 1.0
    sums_ref = step_epilogue.output_and_delta_torch(ref_h, scale, out_ref, coef, case["kind"], extra,
                                                    case["n_extra"], bias_sum)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast_h, ref_h, rtol=1e-6, atol=1e-6 * magnitude)
    assert (sums is None) == (sums_ref is None) == (not bias_sum)
    if sums is not None:
        close_sums(sums, sums_ref, ref_h.abs().sum(1))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_the_relu_pass_from_a_source_equals_the_pass_in_place(case):
    """``source``: h = relu(source + bias) written into h, source untouched; the same bits, g and
    column sums as the in-place pass over a copy of source."""
    gen = torch.Generator().manual_seed(case["seed"])
    locations, _, channels = case["shape"]
    source = torch.randn(case["shape"], generator=gen)
    bias = torch.randn(locations, channels, generator=gen) if case["bias"] else None
    kept, in_place = source.clone(), source.clone()
    h = torch.full(case["shape"], float("nan"))  # every entry must be written
    g, col = step_epilogue.relu_goodness_(h, bias, case["kind"], case["n_sum"], source=source)
    g_in, col_in = step_epilogue.relu_goodness_(in_place, bias, case["kind"], case["n_sum"])
    assert torch.equal(source, kept) and torch.equal(h, in_place) and torch.equal(g, g_in)
    assert (col is None and col_in is None) or torch.equal(col, col_in)
    ref = torch.empty(case["shape"])
    step_epilogue.relu_goodness_torch(ref, bias, case["kind"], case["n_sum"], source=source)
    assert torch.equal(ref, h)


def test_the_relu_pass_refuses_a_source_that_overlaps_h():
    storage = torch.randn(2 * 3 * 4 + 4)
    h, shifted = storage[:24].view(2, 3, 4), storage[4:].view(2, 3, 4)
    with pytest.raises(RuntimeError, match="source must be h itself or not overlap it"):
        torch.ops.ff_kernels.ff_relu_goodness_(h, None, "ssq", 0, shifted)
    g, _ = torch.ops.ff_kernels.ff_relu_goodness_(h, None, "ssq", 0, h)  # itself: in place
    assert (h >= 0).all()
    torch.testing.assert_close(g, h.square().sum((0, 2)), rtol=1e-5, atol=0)


def test_a_nan_activity_stays_nan_through_the_relu():
    h = torch.tensor([[[1.0, float("nan"), -2.0]]])
    g, _ = step_epilogue.relu_goodness_(h, None, "ssq")
    assert h[0, 0, 0] == 1.0 and h[0, 0, 1].isnan() and h[0, 0, 2] == 0.0 and g.isnan().all()


def test_the_passes_say_which_argument_is_wrong():
    h = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[2, 4\], got \[4\]"):
        torch.ops.ff_kernels.ff_relu_goodness_(h, torch.randn(4), "ssq", 0)
    with pytest.raises(RuntimeError, match=r"n_sum must be in \[0, B = 3\], got 4"):
        torch.ops.ff_kernels.ff_relu_goodness_(h, None, "ssq", 4)
    with pytest.raises(RuntimeError, match="goodness must be 'ssq', 'neg_ssq' or 'sum', got 'l2'"):
        torch.ops.ff_kernels.ff_relu_goodness_(h, None, "l2", 0)
    with pytest.raises(RuntimeError, match=r"h must be 3-D \(L, B, C\), got shape \[3, 4\]"):
        torch.ops.ff_kernels.ff_relu_goodness_(h[0], None, "ssq", 0)
    with pytest.raises(RuntimeError, match="h must be contiguous"):
        torch.ops.ff_kernels.ff_relu_goodness_(h.transpose(1, 2), None, "ssq", 0)
    with pytest.raises(RuntimeError, match=r"source must have shape \[2, 3, 4\], got \[2, 3\]"):
        torch.ops.ff_kernels.ff_relu_goodness_(h, None, "ssq", 0, torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"out must have shape \[3, 8\], got \[3, 4\]"):
        torch.ops.ff_kernels.ff_output_delta_(h, torch.ones(3), torch.empty(3, 4), None, "ssq", None, 0, False)
    with pytest.raises(RuntimeError, match="extra and bias_sum belong to the delta, which needs coef"):
        torch.ops.ff_kernels.ff_output_delta_(h, torch.ones(3), torch.empty(3, 8), None, "ssq", None, 0, True)
    with pytest.raises(RuntimeError, match="scale must be float32, got Double"):
        torch.ops.ff_kernels.ff_output_delta_(h, torch.ones(3, dtype=torch.float64), torch.empty(3, 8), None, "ssq",
                                              None, 0, False)


def test_bfloat16_takes_the_torch_passes():
    h = torch.randn(2, 3, 4).to(torch.bfloat16)
    ref = h.clone()
    g, _ = step_epilogue.relu_goodness_(h, None, "ssq")
    assert g.dtype == torch.float32 and torch.equal(h, ref.relu())
    torch.testing.assert_close(g, ref.float().relu().square().sum((0, 2)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 50), st.integers(0, 60), st.integers(0, 2**16))
def test_gather_columns_matches_index_select_with_a_zero_column(batch, columns, m, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(batch, columns, generator=gen)
    index = torch.randint(0, columns + 1, (m,), generator=gen)  # == columns: past the end, reads 0
    out = torch.empty(batch, m)
    torch.ops.ff_kernels.gather_columns(rows, index, out)
    padded = torch.cat([rows, rows.new_zeros(batch, 1)], dim=1)
    assert torch.equal(out, torch.index_select(padded, 1, index))


def test_gather_columns_says_what_it_needs():
    rows = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=r"index must be a contiguous 1-D int64 CPU tensor, got shape \[3\], Int"):
        torch.ops.ff_kernels.gather_columns(rows, torch.zeros(3, dtype=torch.int32), torch.empty(2, 3))
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 3\], got \[3, 3\]"):
        torch.ops.ff_kernels.gather_columns(rows, torch.zeros(3, dtype=torch.long), torch.empty(3, 3))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 30), st.lists(st.tuples(st.integers(0, 8), st.booleans()), max_size=8),
       st.integers(0, 2**16))
def test_gather_runs_copies_each_run_or_zeros_it(batch, columns, runs, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(batch, columns, generator=gen)
    table, want, dst = [], [], 0
    for length, zero in runs:
        length = min(length, columns)
        src = -1 if zero else int(torch.randint(0, columns - length + 1, (1,), generator=gen))
        table.append((dst, src, length))
        want.append(torch.zeros(batch, length) if zero else rows[:, src:src + length])
        dst += length
    out = torch.full((batch, dst), float("nan"))
    torch.ops.ff_kernels.gather_runs(rows, torch.tensor(table, dtype=torch.long).view(-1, 3), out)
    assert torch.equal(out, torch.cat(want, dim=1) if want else torch.empty(batch, 0))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.sampled_from([1, 2, 3, 4, 9]), st.integers(1, 12),
       st.integers(0, 2**16))
def test_gather_interleaved_matches_its_definition(batch, locations, g, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    columns = channels + 10
    rows = torch.randn(batch, columns, generator=gen)
    starts = torch.randint(-1, columns - channels + 1, (locations, g), generator=gen)
    out = torch.empty(batch, locations * g * channels)
    torch.ops.ff_kernels.gather_interleaved(rows, starts, channels, out)
    padded = torch.cat([rows, rows.new_zeros(batch, channels)], dim=1)  # start -1 -> the zero tail
    source = torch.where(starts < 0, columns, starts)[:, None, :] + torch.arange(channels)[None, :, None]
    assert torch.equal(out.view(batch, locations, channels, g), padded[:, source])


@pytest.mark.parametrize("spec", [
    LocalSpec(1, 28, 28, 128, kernel=10, stride=6), LocalSpec(128, 4, 4, 220, kernel=2),
    LocalSpec(2, 9, 7, 17, kernel=3, stride=2, padding=2), LocalSpec(3, 10, 8, 16, kernel=4, stride=3, padding=3),
    LocalSpec(5, 6, 6, 16, kernel=3, stride=1, padding=1),
], ids=["mnist1", "mnist2", "s2p2", "s3p3", "k3p1"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_windows_equal_the_patches_of_the_definition(spec, layout):
    x = torch.randn(3, *spec.input_shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rows, in_channels_last = gemm_local2d.image_rows(x)
    assert torch.equal(gemm_local2d.windows(rows, spec, in_channels_last), local_patches(x.contiguous(), spec))


def test_the_window_gathers_pick_the_plan_their_layout_allows():
    assert gemm_local2d._gather_plan(LocalSpec(1, 28, 28, 128, kernel=10, stride=6), False)[0] == "runs"
    assert gemm_local2d._gather_plan(LocalSpec(128, 4, 4, 220, kernel=2), True)[0] == "interleaved"
    assert gemm_local2d._gather_plan(LocalSpec(128, 4, 4, 220, kernel=2), False)[0] == "columns"


def test_the_gathers_refuse_what_would_read_outside_the_rows():
    rows = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=r"index entries must lie in \[0, 5\], got 6 at 1"):
        torch.ops.ff_kernels.gather_columns(rows, torch.tensor([0, 6]), torch.empty(2, 2))
    with pytest.raises(RuntimeError, match=r"run 0 \(dst 0, src 3, n 3\) leaves rows \(5 columns\)"):
        torch.ops.ff_kernels.gather_runs(rows, torch.tensor([[0, 3, 3]]), torch.empty(2, 3))
    with pytest.raises(RuntimeError, match=r"starts entries must lie in \[-1, 3\], got 4 at 1"):
        torch.ops.ff_kernels.gather_interleaved(rows, torch.tensor([[0, 4]]), 2, torch.empty(2, 4))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.data(), st.sampled_from(["ssq", "neg_ssq", "sum"]), st.floats(-50, 50),
       st.floats(0.05, 20), st.integers(0, 2**16))
def test_compiled_loss_matches_the_functional_loss(batch, data, kind, threshold, temperature, seed):
    from ff_kernels import functional as FF

    n_pos = data.draw(st.integers(0, batch))
    g = (torch.randn(batch, generator=torch.Generator().manual_seed(seed)) * 40).abs()
    loss, coef = step_epilogue.loss_and_coef(g, n_pos, kind, threshold, temperature)
    want_loss, want_coef = FF.ff_loss_and_goodness_grad(g, n_pos, kind, threshold, temperature)
    assert loss.shape == () and loss.dtype == coef.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(coef, want_coef, rtol=2e-6, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 200), st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       st.floats(0, 1), st.booleans(), st.integers(0, 2**16))
def test_compiled_peer_update_matches_peer_normalization(locations, channels, n_pos, momentum, strength,
                                                         channels_major, seed):
    """The fused update against PeerNormalization.update_ on the same running mean: r is one lerp
    per unit (equal up to an FMA's rounding); the mean of r is a sum in another order (float64
    here), so p and the extra term agree to 1e-6 of |strength| * max |r|."""
    from ff_kernels.nn import PeerNormalization

    gen = torch.Generator().manual_seed(seed)
    units = locations * channels
    fast, slow = PeerNormalization(units, strength, momentum), PeerNormalization(units, strength, momentum)
    start = torch.rand(units, generator=gen) * 3
    fast.running_mean.copy_(start)
    slow.running_mean.copy_(start)
    col_sum = torch.rand(locations, channels, generator=gen) * n_pos
    p, extra = step_epilogue.peer_update_(fast, col_sum, n_pos, channels_major)
    p_ref, extra_ref = step_epilogue.peer_update_torch(slow, col_sum, n_pos, channels_major)
    torch.testing.assert_close(fast.running_mean, slow.running_mean, rtol=1e-6, atol=1e-6)
    bound = 1e-6 * abs(strength) * float(slow.running_mean.abs().max()) + 1e-12
    assert float((p - p_ref).abs().max()) <= bound
    assert float((extra - extra_ref).abs().max()) <= bound / n_pos + 1e-12
    assert extra.shape == (locations, channels) and p.shape == (units,)


def test_peer_update_takes_any_function_and_checks_its_arguments():
    col_sum = torch.ones(2, 3)
    p, extra = step_epilogue.peer_update_(lambda mean: mean * 2, col_sum, 4, channels_major=True)
    torch.testing.assert_close(p, torch.full((6,), 0.5))
    torch.testing.assert_close(extra, torch.full((2, 3), 0.125))
    with pytest.raises(RuntimeError, match=r"running_mean must have shape \[6\], got \[5\]"):
        torch.ops.ff_kernels.ff_peer_update_(torch.zeros(5), col_sum, 4, 0.9, 0.1, True)
    with pytest.raises(RuntimeError, match="n_pos must be >= 1, got 0"):
        torch.ops.ff_kernels.ff_peer_update_(torch.zeros(6), col_sum, 0, 0.9, 0.1, True)


@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("features", [1, 7, 2048])
def test_compiled_inverse_scale_equals_the_torch_ops(kind, rms, features):
    """The same float32 operations in the same order, but torch's vectorized sqrt is not always the
    correctly rounded one: an ulp there, carried through the reciprocal, is up to 2 ulps (batch
    1 and zero goodness included)."""
    from ff_kernels import functional as FF

    g = torch.cat([torch.zeros(1), torch.rand(40, generator=torch.Generator().manual_seed(features)) * 1e3])
    want = FF.normalization_scale(g, kind, features, rms).reciprocal_()
    torch.testing.assert_close(step_epilogue.inverse_scale(g, kind, features, rms), want, rtol=2.5e-7, atol=0)
    torch.testing.assert_close(step_epilogue.inverse_scale(g[:1], kind, features, rms), want[:1], rtol=2.5e-7, atol=0)
