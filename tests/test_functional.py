"""The reference math itself: closed-form gradients vs autograd, normalization, SGD semantics."""

import pytest
import torch

from ff_kernels import functional as FF

from reference_tools import random_mask

GOODNESS = ["ssq", "neg_ssq", "sum"]


@pytest.mark.parametrize("kind", GOODNESS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n_pos,n_neg", [(1, 1), (7, 3), (4, 0), (0, 5)])
def test_explicit_grads_equal_autograd(kind, masked, n_pos, n_neg):
    gen = torch.Generator().manual_seed(0)
    n_in, n_out = 23, 19
    x_pos = torch.randn(n_pos, n_in, generator=gen, dtype=torch.float64)
    x_neg = torch.randn(n_neg, n_in, generator=gen, dtype=torch.float64)
    w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * 0.4
    b = torch.randn(n_out, generator=gen, dtype=torch.float64) * 0.1
    mask = random_mask(n_out, n_in, gen).double() if masked else None
    threshold = 2.0 if kind == "sum" else 4.0
    w_, b_ = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = FF.ff_linear_loss(x_pos, x_neg, w_, b_, kind, threshold, 1.7, mask)
    loss.backward()
    loss2, dw, db = FF.ff_linear_grads(x_pos, x_neg, w, b, kind, threshold, 1.7, mask)
    torch.testing.assert_close(loss2, loss.detach(), rtol=1e-12, atol=1e-12)
    # torch's softplus is linear above 20, so autograd's dsoftplus/dv there is exactly 1 while
    # the closed form uses sigmoid(v) >= 1 - 2.1e-9: a relative difference of up to ~2e-9.
    torch.testing.assert_close(dw, w_.grad, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(db, b_.grad, rtol=1e-8, atol=1e-8)
    assert dw.abs().sum() > 0  # the comparison above is not between two zero tensors
    if masked:
        assert (dw[mask == 0] == 0).all()


@pytest.mark.parametrize("kind", GOODNESS)
def test_loss_goodness_grad_equals_autograd(kind):
    g = (torch.rand(9, dtype=torch.float64) * 8).requires_grad_()
    FF.ff_loss(g[:4], g[4:], kind, 3.0, 0.5).backward()
    torch.testing.assert_close(FF.loss_goodness_grad(g.detach(), 4, kind, 3.0, 0.5), g.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
def test_pairwise_loss_goodness_grad_equals_autograd(kind):
    g = (torch.rand(10, dtype=torch.float64) * 8).requires_grad_()
    FF.pairwise_loss(g[:5], g[5:], kind, 0.7).backward()
    torch.testing.assert_close(FF.pairwise_loss_goodness_grad(g.detach(), 5, kind, 0.7), g.grad, rtol=1e-12,
                               atol=1e-14)


def test_pairwise_loss_sees_only_the_difference_within_a_pair():
    g_pos, g_neg = torch.tensor([5.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 4.0], dtype=torch.float64)
    expected = (torch.log1p(torch.exp(torch.tensor(-3.0 / 2))) + torch.log1p(torch.exp(torch.tensor(3.0 / 2)))) / 2
    torch.testing.assert_close(FF.pairwise_loss(g_pos, g_neg, "ssq", 2.0), expected.double())
    shift = torch.tensor([100.0, -0.5], dtype=torch.float64)  # a level per input leaves the loss as it is
    torch.testing.assert_close(FF.pairwise_loss(g_pos + shift, g_neg + shift, "ssq", 2.0), expected.double())
    # min ssq prefers the positive row LOW: swapping the pair's roles gives the same loss
    torch.testing.assert_close(FF.pairwise_loss(g_neg, g_pos, "neg_ssq", 2.0), expected.double())
    assert FF.pairwise_loss(g_pos[:0], g_neg[:0], "ssq") == 0


def test_pairwise_loss_rejects_unpaired_rows():
    with pytest.raises(ValueError, match=r"g_pos and g_neg must both be \(P,\), got \(2,\) and \(3,\)"):
        FF.pairwise_loss(torch.zeros(2), torch.zeros(3), "ssq")
    with pytest.raises(ValueError, match=r"g must be \(2 \* n_pos,\) = \(4,\) .*got \(5,\)"):
        FF.pairwise_loss_goodness_grad(torch.zeros(5), 2, "ssq")


def test_goodness_direction():
    g = torch.tensor([1.0, 5.0])
    assert FF.positive_probability(g, "ssq", 3.0)[1] > 0.5 > FF.positive_probability(g, "ssq", 3.0)[0]
    assert FF.positive_probability(g, "neg_ssq", 3.0)[0] > 0.5 > FF.positive_probability(g, "neg_ssq", 3.0)[1]


def test_loss_is_softplus_of_logits():
    g_pos, g_neg = torch.tensor([3.0, 0.0]), torch.tensor([1.0])
    expected = (torch.log1p(torch.exp(-torch.tensor(1.0))) + torch.log1p(torch.exp(torch.tensor(2.0)))) / 2
    expected = expected + torch.log1p(torch.exp(torch.tensor(-1.0)))
    torch.testing.assert_close(FF.ff_loss(g_pos, g_neg, "ssq", 2.0, 1.0), expected)


def test_normalize_length_rms_and_sum():
    gen = torch.Generator().manual_seed(2)
    # rows of norm >= 0.5, so eps = 1e-6 moves the normalized length by at most 2e-6 (< rtol)
    h = torch.relu(torch.randn(6, 10, generator=gen, dtype=torch.float64)) + 0.5
    torch.testing.assert_close(FF.normalize(h, "ssq").norm(dim=1), torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(FF.normalize(h, "ssq", rms=True).square().mean(1), torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(FF.normalize(h, "sum").sum(1), torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(FF.normalize(h, "sum", rms=True).mean(1), torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=0)
    # orientation is kept, no mean is subtracted
    cos = torch.nn.functional.cosine_similarity(FF.normalize(h, "ssq"), h, dim=1)
    torch.testing.assert_close(cos, torch.ones(6, dtype=torch.float64))
    assert (FF.normalize(torch.zeros(2, 4)) == 0).all()


def test_sgd_momentum_matches_torch_optim():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    p_torch = p.clone().requires_grad_()
    opt = torch.optim.SGD([p_torch], lr=0.1, momentum=0.9, weight_decay=0.01)
    buf = torch.zeros_like(p)
    for _ in range(4):
        grad = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        p_torch.grad = grad.clone()
        opt.step()
        FF.sgd_momentum_(p, grad, buf, lr=0.1, momentum=0.9, weight_decay=0.01)
    torch.testing.assert_close(p, p_torch.detach(), rtol=1e-12, atol=1e-12)


def test_unknown_goodness_rejected():
    with pytest.raises(ValueError, match="goodness must be one of"):
        FF.goodness(torch.ones(2, 2), "cube")
