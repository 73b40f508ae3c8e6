"""One FF layer step of the fftriton kernels at the paper's shapes, against a float64 reference.

M = 1024 rows, 500 positive and 524 negative, so the positive/negative split falls inside a
row block; N = 2000 units; K = 784 (MNIST) and 2000 inputs. Every launcher of a training step
runs (forward, row statistics, normalized output, update) for fp32 with TF32 tensor cores,
fp32 with IEEE FMAs and bfloat16, dense and masked (empty and occupied tiles), in "grad" and
"sgd" mode, with x_scale on. Every tensor a launcher allocates is filled with NaN first, so an
element a kernel never writes fails the finite check of ``assert_close``.

``test_production_shapes`` needs a GPU (marked gpu); its float64 reference runs on the GPU too.
``test_production_check_gpu_tiles`` runs the same check on the CPU, with the GPU's tiles in the
interpreter at shapes cut to a few tiles (marked slow), so that the check itself is exercised
before a GPU is at hand.

Tolerances (argued in test_fftriton.py): REL_FP32 for IEEE fp32 and for every fp32 statistic
taken from an IEEE accumulator; REL_TF32 for everything downstream of a TF32 dot; REL_BF16_H
and REL_BF16_GRAD for bfloat16 outputs and states. At K = 2000 the IEEE bound is about
u * sqrt(K) ~ 2.7e-6, within REL_FP32.
"""

from __future__ import annotations

import pytest
import torch
from test_fftriton import (
    REL_BF16_GRAD,
    REL_BF16_H,
    REL_FP32,
    REL_TF32,
    TEMPERATURE,
    assert_close,
    make_problem,
    reference_grads,
)

from ff_kernels import functional as FF
from fftriton import ff_linear_forward, ff_linear_update, ff_row_stats, scale_rows
from fftriton._checks import interpreting
from fftriton.config import gpu_tiles

VARIANTS = {"fp32-tf32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee"), "bf16": (torch.bfloat16, "tf32")}
GOODNESS = "ssq"
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


@pytest.fixture
def nan_outputs(monkeypatch):
    """torch.empty and torch.empty_like return NaN-filled floating tensors while the test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))
    assert torch.isnan(torch.empty(2)).all()


def tolerances(variant: str) -> tuple[float, float, float]:
    """(h and output, fp32 statistics, gradients and states) of a variant."""
    if variant == "bf16":
        return REL_BF16_H, REL_FP32, REL_BF16_GRAD
    if variant == "fp32-tf32":
        return REL_TF32, REL_TF32, REL_TF32
    return REL_FP32, REL_FP32, REL_FP32


def check_step(device, variant, masked, mode, n_pos, n_neg, n, k):
    """One step of every launcher on a random layer, each result against float64 autograd."""
    dtype, precision = VARIANTS[variant]
    rel_h, rel_stats, rel_grad = tolerances(variant)
    p = make_problem(device, dtype, n_pos, n_neg, n, k, scaled=True, masked=masked, seed=11)
    ref_device = "cpu" if interpreting() else device
    x_pos, x_neg, w, b, mask = p.reference(ref_device)
    ref_h = FF.linear_activity(torch.cat([x_pos, x_neg]), w, b, mask)
    ref_g = FF.goodness(ref_h, GOODNESS)
    threshold = ref_g.mean().item()

    h, partials = ff_linear_forward(p.x_pos, p.x_neg, p.weight, p.bias, goodness=GOODNESS, precision=precision,
                                    **p.kernel_inputs())
    assert_close(h, ref_h, rel_h, "h")
    stats = ff_row_stats(partials, n_pos, goodness=GOODNESS, threshold=threshold, temperature=TEMPERATURE,
                         n_features=n)
    assert_close(stats.goodness, ref_g, rel_stats, "goodness")
    ref_loss, ref_dw, ref_db = reference_grads(p, GOODNESS, threshold, ref_device)
    assert_close(stats.loss_rows.sum(), ref_loss, rel_stats, "loss")
    assert_close(stats.coef, FF.loss_goodness_grad(ref_g, n_pos, GOODNESS, threshold, TEMPERATURE), rel_stats, "coef")
    assert_close(scale_rows(h, stats.inv_norm), FF.normalize(ref_h, GOODNESS, False), rel_h, "normalized output")

    if mode == "grad":
        weight_grad, bias_grad = torch.zeros_like(p.weight), torch.zeros_like(p.bias)
        ff_linear_update(p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness=GOODNESS, mode="grad",
                         weight_grad=weight_grad, bias_grad=bias_grad, precision=precision, **p.kernel_inputs())
        assert_close(weight_grad, ref_dw, rel_grad, "weight_grad")
        assert_close(bias_grad, ref_db, rel_grad, "bias_grad")
    else:
        ref_w, ref_b = w.clone(), b.clone()
        ref_bufs = [torch.zeros_like(ref_w), torch.zeros_like(ref_b)]
        FF.sgd_momentum_(ref_w, ref_dw, ref_bufs[0], SGD["lr"], SGD["momentum"], SGD["weight_decay"], mask)
        FF.sgd_momentum_(ref_b, ref_db, ref_bufs[1], SGD["lr"], SGD["momentum"], SGD["weight_decay"])
        weight_buf, bias_buf = torch.zeros_like(p.weight), torch.zeros_like(p.bias)
        ff_linear_update(p.x_pos, p.x_neg, h, stats.coef, p.weight, p.bias, goodness=GOODNESS, mode="sgd",
                         weight_buf=weight_buf, bias_buf=bias_buf, precision=precision, **p.kernel_inputs(), **SGD)
        assert_close(weight_buf, ref_bufs[0], rel_grad, "weight_buf")  # the step itself
        assert_close(bias_buf, ref_bufs[1], rel_grad, "bias_buf")
        assert_close(p.weight, ref_w, rel_grad, "weight")
        assert_close(p.bias, ref_b, rel_grad, "bias")
    if masked:
        absent = ~p.mask
        target = weight_grad if mode == "grad" else p.weight
        assert (target[absent] == 0).all(), "a masked weight moved"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["grad", "sgd"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [784, 2000])
def test_production_shapes(device, nan_outputs, k, variant, masked, mode):
    check_step(device, variant, masked, mode, 500, 524, 2000, k)


@pytest.mark.slow
@pytest.mark.skipif(not interpreting(), reason="the interpreter's stand-in for test_production_shapes")
@pytest.mark.parametrize("mode", ["grad", "sgd"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_production_check_gpu_tiles(device, nan_outputs, variant, masked, mode):
    """280 rows split at 150 (inside the second 128-row block), 272 units, 400 inputs."""
    with gpu_tiles():
        check_step(device, variant, masked, mode, 150, 130, 272, 400)
