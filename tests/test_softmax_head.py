"""The head's closed-form cross-entropy gradient (paper/recipes/softmax_head.py) against autograd."""

import pytest
import torch
from torch import nn

from ff_kernels.paper.recipes.softmax_head import cross_entropy_grad_


@pytest.mark.parametrize("batch", [1, 7, 100])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad_before", [False, True])
def test_closed_form_gradient_matches_autograd(batch, bias, grad_before):
    torch.manual_seed(batch)
    features, labels = torch.randn(batch, 37), torch.randint(0, 10, (batch,))
    fast, slow = nn.Linear(37, 10, bias=bias), nn.Linear(37, 10, bias=bias)
    slow.load_state_dict(fast.state_dict())
    if grad_before:
        for a, b in zip(fast.parameters(), slow.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
    logits = cross_entropy_grad_(fast, features, labels)
    want = slow(features)
    nn.functional.cross_entropy(want, labels).backward()
    torch.testing.assert_close(logits, want.detach(), rtol=1e-6, atol=1e-6)
    assert not logits.requires_grad
    for a, b in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_bad_inputs_are_named():
    head = nn.Linear(5, 3)
    with pytest.raises(ValueError, match=r"labels must be int64 \(B,\), got shape \(2,\), dtype torch.float32"):
        cross_entropy_grad_(head, torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="features must not require grad"):
        cross_entropy_grad_(head, torch.randn(2, 5, requires_grad=True), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features must be \(2, 5\) \(labels give B = 2\), got \(2, 4\)"):
        cross_entropy_grad_(head, torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features must be \(3, 5\) \(labels give B = 3\), got \(2, 5\)"):
        cross_entropy_grad_(head, torch.randn(2, 5), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("batch", [1, 5])
def test_blocks_in_memory_order_give_the_gradient_of_the_flattened_features(batch):
    """A channels-last map and a plain block, as HybridFFNet.head_blocks gives them, against
    autograd on the concatenated ``.flatten(1)`` features."""
    from ff_kernels.paper.recipes.unsupervised_mnist import _head_columns

    torch.manual_seed(batch)
    maps = torch.randn(batch, 6, 3, 2).contiguous(memory_format=torch.channels_last)
    plain = torch.randn(batch, 7)
    labels = torch.randint(0, 4, (batch,))
    fast, slow = nn.Linear(43, 4), nn.Linear(43, 4)
    slow.load_state_dict(fast.state_dict())
    blocks = [(maps.permute(0, 2, 3, 1).reshape(batch, -1), _head_columns((6, 3, 2), True, 0, maps.device)),
              (plain, _head_columns((7,), False, 36, plain.device))]
    assert blocks[0][0].data_ptr() == maps.data_ptr()  # rows read in place
    logits = cross_entropy_grad_(fast, blocks, labels)
    want = slow(torch.cat([maps.flatten(1), plain], dim=1))
    nn.functional.cross_entropy(want, labels).backward()
    torch.testing.assert_close(logits, want.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_blocks_that_do_not_cover_the_head_are_refused():
    head = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="the blocks have 4 columns, the head 5 inputs"):
        cross_entropy_grad_(head, [(torch.randn(2, 4), torch.arange(4))], torch.zeros(2, dtype=torch.long))
