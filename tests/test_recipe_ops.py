"""The recipes' compiled CPU ops (csrc/bindings_recipe_ops.cpp) against torch references: the
hybrid images of section 3.2 (``hybrid_mix``) and the softmax head's pieces
(``head_weight_grad_add_``, ``cross_entropy_logit_grad``, and the whole compiled head step of
``softmax_head`` against its torch-op step), and the supervised recipe's layer-1 pre-activations
of label sets (``label_preacts``, against the torch ops of ``first_preacts``: the same float32
operations in the same order, so the same bits).

Tolerances: a hybrid pixel is copied, so it equals its source image's pixel exactly; the mask's
blurred value is a float32 sum in another order than torch's GEMMs, so a pixel may only differ
from the reference where the exact (float64) blurred value lies within 1e-5 of the 0.5
threshold (float32 rounding of sums of 28 to 40 terms of size <= 1 is below 1e-5). The head's
GEMM results are float32 sums of up to a few hundred products in another order: 1e-5 relative
to the sum of the products' magnitudes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ff_kernels.ops import ext_local2d
from ff_kernels.paper.data import hybrid
from ff_kernels.paper.data.hybrid import blur_matrix, random_bit_words, random_partners, unpack_bits
from ff_kernels.paper.recipes import SupervisedMNISTConfig, softmax_head, supervised_mnist
from ff_kernels.paper.recipes.supervised_mnist import LabelInInputNet

pytestmark = pytest.mark.skipif(not ext_local2d.available(torch.device("cpu")),
                                reason=f"ff_kernels._C not built: {ext_local2d.load_error()}")
THRESHOLD_BAND = 1e-5


def blur_pair(height, width, steps):
    return [blur_matrix(n, steps) if steps else torch.eye(n) for n in (height, width)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 40), st.integers(0, 12), st.integers(0, 2**16))
def test_hybrid_mix_matches_the_mask_products(batch, height, width, steps, seed):
    if steps and min(height, width) < 2:
        steps = 0  # blurring needs 2 x 2 pixels (hybrid_mask refuses it)
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, height, width, generator=gen)
    partners = random_partners(batch, gen)
    words = random_bit_words(batch * height * width, gen)
    rows, cols = blur_pair(height, width, steps)
    out = torch.full_like(images, float("nan"))
    torch.ops.ff_kernels.hybrid_mix(images, partners, words, rows, cols, out)

    bits = unpack_bits(words, batch * height * width).view(batch, height, width).double()
    blurred = rows.double() @ bits @ cols.double().t()
    want = torch.where(blurred > 0.5, images, images[partners])
    clear = (blurred - 0.5).abs() > THRESHOLD_BAND
    assert torch.equal(out[clear], want[clear])
    assert bool(((out == images) | (out == images[partners])).all())  # every pixel copied from one of the two


def test_hybrid_negatives_take_the_compiled_pass_and_agree_with_the_torch_ops(monkeypatch):
    images = torch.rand(50, 784, generator=torch.Generator().manual_seed(3))
    calls = []
    real = torch.ops.ff_kernels.hybrid_mix
    monkeypatch.setattr(hybrid.torch.ops.ff_kernels, "hybrid_mix", lambda *a: calls.append(1) or real(*a))
    fast = hybrid.hybrid_negatives(images, torch.Generator().manual_seed(4))
    monkeypatch.setattr(hybrid, "cpu_ops_take", lambda *tensors: False)
    reference = hybrid.hybrid_negatives(images, torch.Generator().manual_seed(4))
    assert calls == [1]
    assert (fast != reference).float().mean() < 1e-3  # only pixels at the threshold may flip


def test_hybrid_mix_refuses_bad_arguments():
    images, out = torch.rand(2, 4, 4), torch.empty(2, 4, 4)
    words, eye = random_bit_words(32), torch.eye(4)
    mix = torch.ops.ff_kernels.hybrid_mix
    with pytest.raises(RuntimeError, match=r"partners entries must lie in \[0, 1\], got 2 at 1"):
        mix(images, torch.tensor([1, 2]), words, eye, eye, out)
    with pytest.raises(RuntimeError, match=r"words must hold the 32 bits 32 to an entry, \(1,\), got \[2\]"):
        mix(images, torch.tensor([1, 0]), random_bit_words(64), eye, eye, out)
    with pytest.raises(RuntimeError, match=r"rows must have shape \[4, 4\], got \[3, 3\]"):
        mix(images, torch.tensor([1, 0]), words, torch.eye(3), eye, out)
    with pytest.raises(RuntimeError, match="out must not be images"):
        mix(images, torch.tensor([1, 0]), words, eye, eye, images)
    with pytest.raises(RuntimeError, match="images must be float32, got Double"):
        mix(images.double(), torch.tensor([1, 0]), words, eye, eye, out)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 300), st.integers(1, 14), st.booleans(), st.integers(0, 2**16))
def test_head_weight_grad_add_matches_index_add(batch, features, classes, scattered, seed):
    gen = torch.Generator().manual_seed(seed)
    dz, x = torch.randn(batch, classes, generator=gen), torch.randn(batch, features, generator=gen)
    width = features + 5 if scattered else features
    columns = torch.randperm(width, generator=gen)[:features] if scattered else None
    grad = torch.randn(classes, width, generator=gen)
    want = grad.clone()
    want.index_add_(1, columns if scattered else torch.arange(features), dz.t() @ x)
    torch.ops.ff_kernels.head_weight_grad_add_(dz, x, columns, grad)
    magnitude = torch.zeros_like(grad).index_add_(1, columns if scattered else torch.arange(features),
                                                  dz.abs().t() @ x.abs())
    assert bool(((grad - want).abs() <= 1e-5 * magnitude + 1e-6).all())


def test_head_weight_grad_add_refuses_repeated_or_outside_columns():
    dz, x, grad = torch.randn(2, 3), torch.randn(2, 4), torch.zeros(3, 6)
    with pytest.raises(RuntimeError, match="columns must be distinct, got 1 twice"):
        torch.ops.ff_kernels.head_weight_grad_add_(dz, x, torch.tensor([0, 1, 1, 2]), grad)
    with pytest.raises(RuntimeError, match=r"columns entries must lie in \[0, 5\], got 6 at 3"):
        torch.ops.ff_kernels.head_weight_grad_add_(dz, x, torch.tensor([0, 1, 2, 6]), grad)
    with pytest.raises(RuntimeError, match=r"without columns grad must be \(K, F\) = \(3, 4\)"):
        torch.ops.ff_kernels.head_weight_grad_add_(dz, x, None, grad)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_cross_entropy_logit_grad_matches_torch(batch):
    gen = torch.Generator().manual_seed(batch)
    z, labels = torch.randn(batch, 10, generator=gen) * 30, torch.randint(0, 10, (batch,), generator=gen)
    want = torch.softmax(z, dim=1)
    want[torch.arange(batch), labels] -= 1.0
    torch.testing.assert_close(torch.ops.ff_kernels.cross_entropy_logit_grad(z, labels), want / batch,
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"labels entries must lie in \[0, 9\], got 10 at 0"):
        torch.ops.ff_kernels.cross_entropy_logit_grad(z[:1], torch.tensor([10]))


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_the_compiled_head_step_matches_its_torch_step(batch, bias):
    gen = torch.Generator().manual_seed(batch)
    blocks = [(torch.randn(batch, 24, generator=gen), torch.randperm(41, generator=gen)[:24]),
              (torch.randn(batch, 17, generator=gen), None)]
    blocks[1] = (blocks[1][0], torch.tensor(sorted(set(range(41)) - set(blocks[0][1].tolist()))))
    labels = torch.randint(0, 10, (batch,), generator=gen)
    fast, slow = nn.Linear(41, 10, bias=bias), nn.Linear(41, 10, bias=bias)
    slow.load_state_dict(fast.state_dict())
    for head in (fast, slow):
        head.weight.grad = torch.ones_like(head.weight)
    logits_fast, dz_fast = softmax_head._compiled_step(fast, blocks, labels)
    logits_slow, dz_slow = softmax_head._torch_step(slow, blocks, labels)
    torch.testing.assert_close(logits_fast, logits_slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz_fast, dz_slow, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.weight.grad, slow.weight.grad, rtol=1e-5, atol=1e-6)


def test_bit_words_check_their_arguments():
    words = random_bit_words(40, torch.Generator().manual_seed(0))
    assert words.shape == (2,) and bool(((words >= 0) & (words < 2**32)).all())
    assert unpack_bits(words, 40).shape == (40,)
    with pytest.raises(ValueError, match="bits must be a non-negative int, got -1"):
        random_bit_words(-1)
    with pytest.raises(ValueError, match=r"bits must be an int in \[0, 64\] \(32 per word\), got 65"):
        unpack_bits(words, 65)
    with pytest.raises(ValueError, match=r"words must be an int64 \(N,\) tensor, got shape \(2,\), dtype torch.float32"):
        unpack_bits(words.float(), 8)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 3), st.sampled_from(["classes", "one class per set", "codes", "one code"]),
       st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_label_preacts_equal_the_torch_ops_bit_for_bit(batch, sets, kind, input_norm, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = LabelInInputNet(SupervisedMNISTConfig(width=24, depth=2, input_norm=input_norm))
    if not bias:
        net.net[0].bias = None
    images = torch.rand(batch, 784, generator=gen)
    columns = batch if kind in ("classes", "codes") else 1
    if kind in ("classes", "one class per set"):
        labels = torch.randint(0, 10, (sets, columns), generator=gen)
    else:
        labels = torch.rand(sets, columns, 10, generator=gen)
    part = net.image_part(images)
    fast = net.first_preacts(part, labels)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(supervised_mnist, "cpu_ops_take", lambda *tensors: False)
        torch_ops = net.first_preacts(part, labels)
    assert torch.equal(fast, torch_ops)
    # and both are the unshared rows' pre-activations up to rounding
    rows = labels.expand(sets, batch) if labels.dim() == 2 else labels.expand(sets, batch, 10)
    x = torch.cat([net.inputs(images, rows[r]) for r in range(sets)])
    want = x @ net.net[0].weight.detach().t() + (0 if net.net[0].bias is None else net.net[0].bias.detach())
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(3, 4, 5), torch.zeros(10, 5), torch.zeros(1, 3, dtype=torch.long), None, None),
     "preact must be a 2-D CPU tensor"),
    ((torch.zeros(3, 5), torch.zeros(10, 4), torch.zeros(1, 3, dtype=torch.long), None, None),
     r"rows must have shape \[10, 5\]"),
    ((torch.zeros(3, 5), torch.zeros(10, 5), torch.zeros(1, 2, dtype=torch.long), None, None),
     r"index must be \(R, B = 3\)"),
    ((torch.zeros(3, 5), torch.zeros(10, 5), torch.full((1, 3), 10, dtype=torch.long), None, None),
     r"index entries must lie in \[0, 9\], got 10 at 0"),
    ((torch.zeros(3, 5), torch.zeros(10, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(1, 3), None),
     r"divisor must have shape \[2, 3\]"),
    ((torch.zeros(3, 5), torch.zeros(10, 5), torch.zeros(1, 3, dtype=torch.long), None, torch.zeros(4)),
     r"bias must have shape \[5\]"),
    ((torch.zeros(3, 5), torch.zeros(10, 5), torch.zeros(1, 3, dtype=torch.int32), None, None),
     "index must be a contiguous 2-D int64 CPU tensor"),
])
def test_label_preacts_say_which_argument_is_wrong(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ff_kernels.label_preacts(*args)
