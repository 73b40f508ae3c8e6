"""Helpers that let the fast FF steps run fewer tensor ops, against the plain functions."""

import pytest
import torch

from ff_kernels import functional as FF
from ff_kernels.nn import FFLinear


@pytest.mark.parametrize("blocks", [None, 3])
@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("batch,n_pos", [(1, 1), (1, 0), (5, 0), (5, 5), (7, 3), (200, 100)])
def test_loss_and_goodness_grad_together_equal_the_two_functions(kind, batch, n_pos, blocks):
    shape = (batch,) if blocks is None else (batch, blocks)  # per-block goodness (B, k)
    g = torch.rand(shape, generator=torch.Generator().manual_seed(batch)) * 40
    loss, coef = FF.ff_loss_and_goodness_grad(g, n_pos, kind, 20.0, 3.0)
    # the same float32 terms, summed or scaled in another order: a few ulps
    torch.testing.assert_close(loss, FF.ff_loss(g[:n_pos], g[n_pos:], kind, 20.0, 3.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(coef, FF.loss_goodness_grad(g, n_pos, kind, 20.0, 3.0), rtol=1e-6, atol=1e-9)


def test_loss_and_goodness_grad_constants_made_in_inference_mode_serve_autograd_later():
    g = torch.rand(6) * 40
    with torch.inference_mode():
        FF.ff_loss_and_goodness_grad(g, 3, "ssq", 20.0, 3.0)  # keeps this split's per-row constants
    g.requires_grad_(True)
    loss, coef = FF.ff_loss_and_goodness_grad(g, 3, "ssq", 20.0, 3.0)
    loss.backward()
    torch.testing.assert_close(g.grad, coef.detach(), rtol=1e-6, atol=1e-9)


def test_adjacent_halves_get_one_finite_check_that_still_names_the_bad_half():
    layer = FFLinear(4, 3, backend="cpu")
    x = torch.rand(6, 4)
    layer.ff_step(x[:2], x[2:], lr=0.1)  # adjacent halves
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match="x_neg contains NaN or Inf"):
        layer.ff_step(x[:2], x[2:], lr=0.1)
    with pytest.raises(ValueError, match="x_pos contains NaN or Inf"):
        layer.ff_step(x[2:], x[:2], lr=0.1)  # not adjacent: each checked on its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.0, 0.5), (0.9, 0.0), (0.9, 0.5)])  # decay large enough to show in bf16
def test_sgd_update_with_a_gradient_tensor_is_torch_sgd(dtype, momentum, weight_decay):
    """cpu_linear.sgd_update_with (torch's fused SGD kernel for float32 with a momentum buffer,
    else the GEMM-target form) takes the same three steps as torch.optim.SGD."""
    from ff_kernels.ops.cpu_linear import sgd_update_with

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(7, 5, generator=generator).to(dtype)
    grads = [torch.randn(7, 5, generator=generator) for _ in range(3)]  # float32, as a bias's row sum is
    param = start.clone()
    buf = torch.zeros_like(param) if momentum else None
    expected = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.SGD([expected], lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for grad in grads:
        sgd_update_with(param, buf, grad, 0.1, momentum, weight_decay)
        expected.grad = grad.to(dtype)
        optimizer.step()
    # float32: the same operations up to rounding; bfloat16: the parameter and (torch) the gradient
    # rounded to 8 bits, a few units of 2^-8 on values of order 1
    tolerance = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(param, expected.detach(), **tolerance)
