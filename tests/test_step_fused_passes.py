"""The passes between a step's ReLU pass and its weight-gradient GEMM in one compiled call
(``step_epilogue.loss_output_delta_`` -> ``ff_loss_output_delta_``) against the four calls it
replaces (loss and dL/dG, peer normalization's update, the row scale, the output and delta),
each already tested against its torch reference in test_step_passes.py, and against the torch
ops themselves (the same function with the compiled ops switched off).

The fused op runs the same four compiled loops in the same order, so every result is the same
bits: loss, p, the running mean, the normalized output, the delta and its column sums.
hypothesis draws the sizes (L, B, C from 1, so batch 1, one location and rows that fill no whole
vector occur), the goodness, how many rows are positive (0, some, all), peer normalization or
not, its unit order, the bias sums and the row scale's divisor.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ff_kernels.nn import PeerNormalization
from ff_kernels.ops import ext_local2d, step_epilogue

pytestmark = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                                reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")


@st.composite
def cases(draw):
    locations, batch, channels = draw(st.integers(1, 5)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    n_pos = draw(st.sampled_from([0, 1, batch // 2, batch]))
    return {
        "shape": (locations, batch, channels), "kind": draw(st.sampled_from(["ssq", "neg_ssq", "sum"])),
        "n_pos": n_pos, "peer": n_pos > 0 and draw(st.booleans()), "channels_major": draw(st.booleans()),
        "bias_sum": draw(st.booleans()), "rms": draw(st.booleans()),
        "threshold": draw(st.floats(-20, 200)), "temperature": draw(st.floats(0.1, 100)),
        "seed": draw(st.integers(0, 2**16)),
    }


def four_calls(h, g, positive_sum, out, case, peer):
    """The sequence the fused call replaces, one compiled call each."""
    loss, coef = step_epilogue.loss_and_coef(g, case["n_pos"], case["kind"], case["threshold"], case["temperature"])
    p, extra = (step_epilogue.peer_update_(peer, positive_sum, case["n_pos"], case["channels_major"])
                if peer is not None else (None, None))
    locations, _, channels = h.shape
    scale = step_epilogue.inverse_scale(g, case["kind"], locations * channels, case["rms"])
    col_sum = step_epilogue.output_and_delta_(h, scale, out, coef, case["kind"], extra, case["n_pos"], case["bias_sum"])
    return loss, p, col_sum


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_one_call_gives_the_bits_of_the_four(case):
    gen = torch.Generator().manual_seed(case["seed"])
    locations, batch, channels = case["shape"]
    h = torch.randn(case["shape"], generator=gen)
    g, positive_sum = step_epilogue.relu_goodness_(h, None, case["kind"], case["n_pos"] if case["peer"] else 0)
    peers = []
    for _ in range(2):
        peer = PeerNormalization(locations * channels, 0.05, 0.9) if case["peer"] else None
        if peer is not None:
            peer.running_mean.copy_(torch.arange(locations * channels, dtype=torch.float32).div_(7).sin_())
        peers.append(peer)
    fused_h, four_h = h.clone(), h.clone()
    fused_out, four_out = torch.empty(batch, locations * channels), torch.empty(batch, locations * channels)

    loss, p, col_sum = step_epilogue.loss_output_delta_(
        fused_h, g, positive_sum, fused_out, case["n_pos"], case["kind"], case["threshold"], case["temperature"],
        locations * channels, case["rms"], peers[0], case["channels_major"], bias_sum=case["bias_sum"])
    loss_ref, p_ref, col_ref = four_calls(four_h, g, positive_sum, four_out, case, peers[1])

    assert torch.equal(loss, loss_ref) and loss.shape == ()
    assert torch.equal(fused_out, four_out)
    assert torch.equal(fused_h, four_h)  # the delta
    assert (p is None) == (p_ref is None) == (not case["peer"])
    if case["peer"]:
        assert torch.equal(p, p_ref) and torch.equal(peers[0].running_mean, peers[1].running_mean)
    assert (col_sum is None) == (col_ref is None) == (not case["bias_sum"])
    if case["bias_sum"]:
        assert torch.equal(col_sum, col_ref)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_one_call_matches_the_torch_ops(case):
    """The compiled call against the torch-op passes (``cpu_ops_take`` off). Tolerances: the loss
    and dL/dG are a few float32 operations per row (test_step_passes' 2e-6); the row scale may
    differ by an ulp of a sqrt, so the output and the delta agree to 1e-5 relative; p and the
    column sums are sums in another order, to 1e-5 of the sum of magnitudes (a positive row's
    delta carries p / n_pos, so its tolerance and the column sums' add p's)."""
    gen = torch.Generator().manual_seed(case["seed"])
    locations, batch, channels = case["shape"]
    units = locations * channels
    h = torch.randn(case["shape"], generator=gen)
    g, positive_sum = step_epilogue.relu_goodness_(h, None, case["kind"], case["n_pos"] if case["peer"] else 0)
    peers = [PeerNormalization(units, 0.05, 0.9) if case["peer"] else None for _ in range(2)]
    outs = [torch.empty(batch, units) for _ in range(2)]
    deltas = [h.clone(), h.clone()]
    args = (case["n_pos"], case["kind"], case["threshold"], case["temperature"], units, case["rms"])
    fast = step_epilogue.loss_output_delta_(deltas[0], g, positive_sum, outs[0], *args, peers[0],
                                            case["channels_major"], bias_sum=case["bias_sum"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_epilogue, "cpu_ops_take", lambda *tensors: False)
        slow = step_epilogue.loss_output_delta_(deltas[1], g, positive_sum, outs[1], *args, peers[1],
                                                case["channels_major"], bias_sum=case["bias_sum"])
    torch.testing.assert_close(fast[0], slow[0], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-7)
    # p's tolerance (a sum in another order, times the strength); a positive row's delta adds p / n_pos
    p_tol = 1e-5 * 0.05 * float(peers[1].running_mean.abs().sum()) + 1e-12 if case["peer"] else 0.0
    delta_atol = 1e-7 * float(deltas[1].abs().max()) + (p_tol / case["n_pos"] if case["peer"] else 0.0) + 1e-30
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-5, atol=delta_atol)
    if case["peer"]:
        torch.testing.assert_close(peers[0].running_mean, peers[1].running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=p_tol)
    assert (fast[2] is None) == (slow[2] is None) == (not case["bias_sum"])
    if case["bias_sum"]:
        magnitude = deltas[1].abs().sum(1)
        assert torch.all((fast[2] - slow[2]).abs() <= 1e-5 * magnitude + p_tol + 1e-30)  # n_pos rows of p / n_pos


def test_an_unfolded_or_plain_function_peer_takes_the_separate_calls():
    """Peer normalization as any function, or a peer term kept apart from the delta (a layer
    whose delta is in a lower dtype adds it later), runs the separate calls: the delta then has
    no extra term, and p is returned either way."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, 6, 5, generator=gen)
    g, positive_sum = step_epilogue.relu_goodness_(h, None, "ssq", 3)
    kept, plain = h.clone(), h.clone()
    out_kept, out_plain = torch.empty(6, 5), torch.empty(6, 5)
    _, p, _ = step_epilogue.loss_output_delta_(kept, g, positive_sum, out_kept, 3, "ssq", 5.0, 1.0, 5, True,
                                               lambda mean: mean * 2, fold=False)
    torch.testing.assert_close(p, positive_sum.view(-1) / 3 * 2)
    step_epilogue.loss_output_delta_(plain, g, None, out_plain, 3, "ssq", 5.0, 1.0, 5, True)
    assert torch.equal(kept, plain) and torch.equal(out_kept, out_plain)


def test_the_fused_call_says_which_argument_is_wrong():
    op = torch.ops.ff_kernels.ff_loss_output_delta_
    h, g, out = torch.zeros(2, 4, 3), torch.ones(4), torch.empty(4, 6)

    def call(**changes):
        args = {"h": h, "g": g, "out": out, "n_pos": 2, "col_sum": None, "running_mean": None}
        args.update(changes)
        return op(args["h"], args["g"], args["out"], args["n_pos"], 1.0, 0.0, "ssq", 1.0, 1e-8, args["col_sum"],
                  args["running_mean"], 0.9, 0.1, False, True)

    call()  # the arguments as given are fine
    with pytest.raises(RuntimeError, match=r"g must have shape \[4\], got \[5\]"):
        call(g=torch.ones(5))
    with pytest.raises(RuntimeError, match=r"out must have shape \[4, 6\]"):
        call(out=torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="out must not be h"):
        call(out=h.view(4, 6))
    with pytest.raises(RuntimeError, match=r"n_pos must be in \[0, B = 4\], got 5"):
        call(n_pos=5)
    with pytest.raises(RuntimeError, match="col_sum and running_mean come together"):
        call(col_sum=torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="peer normalization needs n_pos >= 1, got 0"):
        call(n_pos=0, col_sum=torch.zeros(2, 3), running_mean=torch.zeros(6))
    with pytest.raises(RuntimeError, match=r"running_mean must have shape \[6\]"):
        call(col_sum=torch.zeros(2, 3), running_mean=torch.zeros(5))
