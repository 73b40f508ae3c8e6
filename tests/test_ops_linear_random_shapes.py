"""The CPU fast path of one FF step against float64 truth at shapes drawn by hypothesis.

The fixed shapes of test_ops_linear.py cover batch 1, empty halves and ragged sizes; here
hypothesis draws the sizes (1 to 70 inputs and units, 0 to 9 rows per half, at least one row),
the goodness function, RMS normalization, a mask and block-wise goodness, and shrinks a failure
to the smallest shape that shows it. Tolerance as in test_ops_linear.py: the fast path's error
against the float64 truth is at most twice that of the float32 reference backend plus 1e-5 of
the quantity's magnitude.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ff_kernels import functional as FF
from ff_kernels import ops

from reference_tools import max_err, scale_of

FLOOR = 1e-5


@st.composite
def cases(draw):
    n_pos, n_neg = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    if n_pos + n_neg == 0:
        n_pos = 1
    n_in = draw(st.integers(1, 70))
    blocks = draw(st.sampled_from([None, 1, 2, 3]))
    n_out = draw(st.integers(1, 24)) * (blocks or 1)
    return {
        "n_pos": n_pos, "n_neg": n_neg, "n_in": n_in, "n_out": n_out, "blocks": blocks,
        "kind": draw(st.sampled_from(["ssq", "neg_ssq", "sum"])), "rms": draw(st.booleans()),
        "masked": draw(st.booleans()) and blocks is None, "seed": draw(st.integers(0, 2**16)),
    }


def truth64(x_pos, x_neg, w, b, mask, kind, threshold, blocks):
    """Loss, goodness, dW, db in float64 by autograd on functional.py."""
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    m = None if mask is None else mask.double()
    h_pos = FF.linear_activity(x_pos.double(), w64, b64, m)
    h_neg = FF.linear_activity(x_neg.double(), w64, b64, m)
    g_pos, g_neg = FF.goodness(h_pos, kind, blocks), FF.goodness(h_neg, kind, blocks)
    loss = FF.ff_loss(g_pos, g_neg, kind, threshold, 3.0)
    loss.backward()
    return loss.detach(), torch.cat([g_pos, g_neg]).detach(), w64.grad, b64.grad


def step(backend, x_pos, x_neg, w, b, mask, case, threshold):
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    with torch.no_grad():
        result = ops.ff_linear_step(x_pos, x_neg, w, b, goodness=case["kind"], threshold=threshold, temperature=3.0,
                                    rms=case["rms"], mask=mask, backend=backend, blocks=case["blocks"])
    return result.loss, result.goodness, w.grad, b.grad


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_cpu_step_matches_float64_truth_at_drawn_shapes(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n_in, n_out = case["n_in"], case["n_out"]
    x_pos, x_neg = torch.rand(case["n_pos"], n_in, generator=gen), torch.rand(case["n_neg"], n_in, generator=gen)
    w = (torch.rand(n_out, n_in, generator=gen) - 0.4) * (3.0 / n_in**0.5)
    b = torch.randn(n_out, generator=gen) * 0.1
    mask = (torch.rand(n_out, n_in, generator=gen) < 0.6) if case["masked"] else None
    if mask is not None:
        w = w * mask
    units = n_out // (case["blocks"] or 1)
    threshold = units * (0.5 if case["kind"] == "sum" else 1.0)
    truth = truth64(x_pos, x_neg, w, b, mask, case["kind"], threshold, case["blocks"])
    fast = step("cpu", x_pos, x_neg, w, b, mask, case, threshold)
    ref = step("reference", x_pos, x_neg, w, b, mask, case, threshold)
    for name, got, same_precision, want in zip(("loss", "goodness", "dW", "db"), fast, ref, truth):
        bound = 2 * max_err(same_precision, want) + FLOOR * scale_of(want)
        assert max_err(got, want) <= bound, f"{name}: error {max_err(got, want):.3g} > {bound:.3g} in {case}"
    if mask is not None:
        assert (fast[2][~mask] == 0).all()
