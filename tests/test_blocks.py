"""Block-wise goodness (Hinton 2022, section 5.3) in FFLinear, its backends, FFSequential and the supervised recipe.

A layer with ``blocks=k`` splits its D units into k contiguous blocks of D/k; each block has its
own goodness (B, k), FF loss (the layer's loss is their sum) and length normalization.

Tolerances: the "cpu" backend and the reference compute the same float32 quantities in a
different order (a fused norm, one GEMM for both halves, addmm-accumulated gradients), so they
agree to float32 rounding, a few ulps of each value's scale; rtol 1e-5 / atol 1e-6 (values of
order 1) holds with room, as in test_nn_linear.py. Over several SGD steps rounding compounds a
little: rtol 1e-4 / atol 1e-5, as in test_ops_linear.py. bf16 GEMMs round every product to 8
bits of mantissa: 3e-2 relative.
"""

import copy
import math
import warnings

import pytest
import torch

import ff_kernels
from ff_kernels import functional as FF
from ff_kernels.paper.data import MnistSplits, mnist_splits
from ff_kernels.paper.recipes import SupervisedMNIST, SupervisedMNISTConfig

from _paths import require_mnist
from untrained_control import freeze

TIGHT = {"rtol": 1e-5, "atol": 1e-6}
STEPS = {"rtol": 1e-4, "atol": 1e-5}
# (n_pos, n_neg, in_features, out_features, blocks): batch 1 (one side empty), ragged sizes, many blocks
CASES = [(1, 0, 7, 6, 3), (0, 1, 7, 6, 2), (1, 1, 5, 6, 3), (5, 3, 30, 12, 4), (4, 4, 17, 2000, 20), (3, 2, 9, 10, 10)]


def rows(n, n_in, seed):
    return torch.rand(n, n_in, generator=torch.Generator().manual_seed(seed))


def pair(backend, n_in, n_out, blocks, seed=0, **kwargs):
    """Two equal layers (the same parameters), on ``backend`` and on "reference"."""
    torch.manual_seed(seed)
    fast = ff_kernels.FFLinear(n_in, n_out, backend=backend, blocks=blocks, **kwargs)
    return fast, twin(fast, backend="reference")


def twin(layer, **changes):
    """A layer with ``layer``'s parameters and settings, but for ``changes`` (FFLinear arguments)."""
    settings = {"goodness": layer.goodness_kind, "temperature": layer.temperature, "rms_norm": layer.rms_norm,
                "mask": layer.mask, "backend": layer.backend, "compute_dtype": layer.compute_dtype,
                "blocks": layer.blocks, "threshold": layer.threshold, "peer_norm": copy.deepcopy(layer.peer_norm)} | changes
    other = ff_kernels.FFLinear(layer.in_features, layer.out_features, device=layer.weight.device, **settings)
    other.load_state_dict(layer.state_dict())
    return other


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize("blocks", [0, -2, 5, True, 2.0, "2"])
def test_bad_blocks_are_refused_naming_what_was_expected_and_what_came(blocks):
    with pytest.raises(ValueError, match=rf"FFLinear\(3, 12\): blocks must be None or a positive int that divides "
                                         rf"the layer's 12 units, got {blocks!r}"):
        ff_kernels.FFLinear(3, 12, blocks=blocks)


def test_triton_backend_refuses_blocks():
    with pytest.raises(ValueError, match="blocks= is supported on the 'reference' and 'cpu' backends"):
        ff_kernels.FFLinear(3, 12, blocks=3, backend="triton")


def test_threshold_defaults_to_the_units_of_a_block_and_repr_shows_blocks():
    layer = ff_kernels.FFLinear(3, 12, blocks=4)
    assert layer.blocks == 4 and layer.threshold == 3.0
    assert ff_kernels.FFLinear(3, 12, blocks=4, threshold=7.5).threshold == 7.5
    assert ff_kernels.FFLinear(3, 12).threshold == 12.0 and ff_kernels.FFLinear(3, 12).blocks is None
    assert "threshold=3, temperature=1, blocks=4" in repr(layer)
    assert "blocks" not in repr(ff_kernels.FFLinear(3, 12))


# ------------------------------------------------------------------ a hand-computed example


def test_hand_computed_two_blocks_of_two_units():
    """W copies x_0 into unit 0 and x_1 into units 2 and 3 (unit 1 stays 0), bias 0, threshold 2 (4 units / 2 blocks).

    positive x = (1, 2): h = (1, 0 | 2, 2), G = (1, 8), logits s = G - 2 = (-1, 6)
    negative x = (0, 1): h = (0, 0 | 1, 1), G = (0, 2), s = (-2, 0)
    loss = softplus(1) + softplus(-6) + softplus(-2) + softplus(0)
    dL/dG: positive -sigmoid(-s) = (-sigmoid(1), -sigmoid(-6)); negative sigmoid(s) = (sigmoid(-2), 1/2)
    db = sum over rows of 2 h dL/dG = (-2 sigmoid(1), 0, -4 sigmoid(-6) + 1, -4 sigmoid(-6) + 1)
    output of the positive row: (1, 0 | 1/sqrt(2), 1/sqrt(2)) (each block divided by its length)
    """
    def softplus(v):
        return math.log1p(math.exp(v))

    def sigmoid(v):
        return 1.0 / (1.0 + math.exp(-v))

    expected_loss = softplus(1) + softplus(-6) + softplus(-2) + softplus(0)
    expected_db = [-2 * sigmoid(1), 0.0, -4 * sigmoid(-6) + 1, -4 * sigmoid(-6) + 1]
    x_pos, x_neg = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])
    for backend in ("reference", "cpu"):
        layer = ff_kernels.FFLinear(2, 4, blocks=2, backend=backend)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
            layer.bias.zero_()
        assert layer.threshold == 2.0
        output, g = layer.forward_with_goodness(x_pos)
        torch.testing.assert_close(g, torch.tensor([[1.0, 8.0]]))
        torch.testing.assert_close(output, torch.tensor([[1.0, 0.0, 2**-0.5, 2**-0.5]]), **TIGHT)
        loss = layer.ff_backward(x_pos, x_neg)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
        torch.testing.assert_close(layer.bias.grad, torch.tensor(expected_db), **TIGHT)


# ------------------------------------------------------------------ the cpu backend against the reference


@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("n_pos, n_neg, n_in, n_out, blocks", CASES)
def test_cpu_forward_and_ff_backward_match_the_reference(kind, rms, n_pos, n_neg, n_in, n_out, blocks):
    fast, ref = pair("cpu", n_in, n_out, blocks, goodness=kind, rms_norm=rms, temperature=0.7)
    x_pos, x_neg = rows(n_pos, n_in, 1), rows(n_neg, n_in, 2)
    x = torch.cat([x_pos, x_neg])
    (out, g), (ref_out, ref_g) = fast.forward_with_goodness(x), ref.forward_with_goodness(x)
    assert g.shape == (n_pos + n_neg, blocks)
    torch.testing.assert_close(g, ref_g, **TIGHT)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    step, ref_step = fast.ff_backward(x_pos, x_neg, return_step=True), ref.ff_backward(x_pos, x_neg, return_step=True)
    torch.testing.assert_close(step.loss, ref_step.loss, **TIGHT)
    torch.testing.assert_close(step.goodness, ref_step.goodness, **TIGHT)
    torch.testing.assert_close(step.output, ref_step.output, **TIGHT)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, **TIGHT)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, **TIGHT)
    # and both equal the explicit gradients of functional.ff_linear_grads
    loss, dw, db = FF.ff_linear_grads(x_pos, x_neg, ref.weight.detach(), ref.bias.detach(), kind, fast.threshold, 0.7,
                                      blocks=blocks)
    torch.testing.assert_close(step.loss, loss, **TIGHT)
    torch.testing.assert_close(fast.weight.grad, dw, **TIGHT)
    torch.testing.assert_close(fast.bias.grad, db, **TIGHT)


@pytest.mark.parametrize("n_pos, n_neg, n_in, n_out, blocks", CASES[2:])
def test_cpu_ff_step_matches_the_reference_over_steps(n_pos, n_neg, n_in, n_out, blocks):
    fast, ref = pair("cpu", n_in, n_out, blocks, threshold=0.5)
    for seed in range(4):
        x_pos, x_neg = rows(n_pos, n_in, 10 + seed), rows(n_neg, n_in, 20 + seed)
        loss = fast.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9, weight_decay=1e-3)
        torch.testing.assert_close(loss, ref.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9, weight_decay=1e-3), **STEPS)
    for name in ("weight", "bias", "weight_momentum", "bias_momentum"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), **STEPS)
    assert not torch.equal(fast.weight, pair("cpu", n_in, n_out, blocks)[0].weight)  # the steps moved it


def test_ff_step_equals_ff_backward_plus_torch_sgd():
    fused = pair("cpu", 20, 12, 3)[0]
    plain = twin(fused)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for seed in range(3):
        x_pos, x_neg = rows(6, 20, seed), rows(4, 20, 50 + seed)
        fused.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9, weight_decay=1e-3)
        opt.zero_grad()
        plain.ff_backward(x_pos, x_neg)
        opt.step()
    torch.testing.assert_close(fused.weight, plain.weight, **STEPS)
    torch.testing.assert_close(fused.bias, plain.bias, **STEPS)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["ssq", "sum"])
def test_one_block_is_the_plain_layer(backend, kind):
    one = pair(backend, 9, 8, 1, goodness=kind)[0]
    plain = twin(one, blocks=None)
    assert one.threshold == plain.threshold == 8.0
    x_pos, x_neg = rows(5, 9, 3), rows(4, 9, 4)
    step, plain_step = one.ff_backward(x_pos, x_neg, return_step=True), plain.ff_backward(x_pos, x_neg, return_step=True)
    assert step.goodness.shape == (9, 1) and plain_step.goodness.shape == (9,)
    torch.testing.assert_close(step.goodness[:, 0], plain_step.goodness, **TIGHT)
    torch.testing.assert_close(step.loss, plain_step.loss, **TIGHT)
    torch.testing.assert_close(step.output, plain_step.output, **TIGHT)
    torch.testing.assert_close(one.weight.grad, plain.weight.grad, **TIGHT)
    torch.testing.assert_close(one.bias.grad, plain.bias.grad, **TIGHT)


def test_blocks_differ_from_the_plain_layer():
    """Two blocks change the loss (threshold and logits per block), not only the goodness's shape."""
    blocked = pair("cpu", 9, 8, 2)[0]
    plain = twin(blocked, blocks=None, threshold=None)
    x_pos, x_neg = rows(5, 9, 3), rows(4, 9, 4)
    assert not torch.allclose(blocked.ff_backward(x_pos, x_neg), plain.ff_backward(x_pos, x_neg))
    torch.testing.assert_close(blocked.goodness(x_pos).sum(1), plain.goodness(x_pos), **TIGHT)


# ------------------------------------------------------------------ the layer's other features with blocks


def test_mask_and_frozen_bias_with_blocks():
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(12, 10, generator=gen) < 0.5
    fast, ref = pair("cpu", 10, 12, 3, mask=mask)
    for layer in (fast, ref):
        layer.bias.requires_grad_(False)
    bias = fast.bias.detach().clone()
    x_pos, x_neg = rows(4, 10, 6), rows(4, 10, 7)
    for layer in (fast, ref):
        layer.ff_step(x_pos, x_neg, lr=0.1, momentum=0.9)
    torch.testing.assert_close(fast.weight, ref.weight, **STEPS)
    assert torch.equal(fast.bias, bias) and torch.equal(ref.bias, bias)
    assert not fast.weight[~mask].any()
    frozen = twin(fast).requires_grad_(False)  # all frozen: a forward pass gives the loss, summed over blocks
    weight = frozen.weight.detach().clone()
    step = frozen.ff_step(x_pos, x_neg, lr=0.1, return_step=True)
    assert step.goodness.shape == (8, 3) and torch.equal(frozen.weight, weight)
    torch.testing.assert_close(step.loss, twin(fast, backend="reference").ff_backward(x_pos, x_neg), **TIGHT)


def test_peer_norm_inside_the_cpu_step_matches_the_reference_after_it():
    """The cpu step folds peer normalization in; the reference adds it afterwards from the layer's output and
    per-block goodness (``mean_activity`` undoes each block's normalization)."""
    fast, ref = pair("cpu", 10, 12, 4, rms_norm=True, threshold=0.5, peer_norm=ff_kernels.PeerNormalization(12, 0.5))
    for seed in range(3):
        x_pos, x_neg = rows(5, 10, 30 + seed), rows(3, 10, 40 + seed)
        for layer in (fast, ref):
            layer.ff_step(x_pos, x_neg, lr=0.1, momentum=0.9)
    torch.testing.assert_close(fast.peer_norm.running_mean, ref.peer_norm.running_mean, **STEPS)
    torch.testing.assert_close(fast.weight, ref.weight, **STEPS)
    torch.testing.assert_close(fast.bias, ref.bias, **STEPS)


def test_bf16_compute_with_blocks():
    fast, ref = pair("cpu", 30, 12, 3, compute_dtype=torch.bfloat16)
    ref = twin(fast, backend="reference", compute_dtype=None)
    x_pos, x_neg = rows(6, 30, 8), rows(6, 30, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether this CPU emulates bf16 (a warning) is not this test's concern
        step = fast.ff_backward(x_pos, x_neg, return_step=True)
    ref_step = ref.ff_backward(x_pos, x_neg, return_step=True)
    torch.testing.assert_close(step.goodness, ref_step.goodness, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=3e-2, atol=3e-2)


def test_preact_gives_the_same_forward_and_step():
    layer = pair("cpu", 10, 12, 3)[0]
    other = twin(layer)
    x_pos, x_neg = rows(4, 10, 11), rows(4, 10, 12)
    x = torch.cat([x_pos, x_neg])
    preact = torch.nn.functional.linear(x, layer.weight, layer.bias).detach()
    (out, g), (want_out, want_g) = layer.forward_with_goodness(None, preact), layer.forward_with_goodness(x)
    torch.testing.assert_close(g, want_g, **TIGHT)
    torch.testing.assert_close(out, want_out, **TIGHT)
    loss = layer.ff_backward(x_pos, x_neg, preact=preact)
    torch.testing.assert_close(loss, other.ff_backward(x_pos, x_neg), **TIGHT)
    torch.testing.assert_close(layer.weight.grad, other.weight.grad, **TIGHT)


def test_state_dict_round_trip_keeps_blocks_behaviour():
    layer = ff_kernels.FFLinear(10, 12, blocks=3)
    copy = ff_kernels.FFLinear(10, 12, blocks=3)
    copy.load_state_dict(layer.state_dict())
    x = rows(4, 10, 13)
    assert torch.equal(copy.goodness(x), layer.goodness(x))


# ------------------------------------------------------------------ FFSequential


def test_sequential_goodness_sums_each_layers_blocks():
    torch.manual_seed(0)
    net = ff_kernels.FFSequential(ff_kernels.FFLinear(10, 12, blocks=3), ff_kernels.FFLinear(12, 8),
                                  ff_kernels.FFLinear(8, 8, blocks=4))
    x = rows(5, 10, 14)
    g = net.goodness(x)
    assert g.shape == (5, 3)
    h1, g1 = net[0].forward_with_goodness(x)
    h2, g2 = net[1].forward_with_goodness(h1)
    g3 = net[2].goodness(h2)
    assert torch.equal(g[:, 0], g1.sum(1)) and torch.equal(g[:, 1], g2) and torch.equal(g[:, 2], g3.sum(1))
    losses = net.ff_step(rows(4, 10, 15), rows(4, 10, 16), lr=0.1)
    assert len(losses) == 3 and all(torch.isfinite(loss) for loss in losses)


# ------------------------------------------------------------------ the supervised recipe


def test_recipe_refuses_blocks_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match=r"goodness_blocks must divide width \(12\), got 5"):
        SupervisedMNISTConfig(width=12, goodness_blocks=5)
    with pytest.raises(ValueError, match="goodness_blocks needs backend auto, cpu or reference"):
        SupervisedMNISTConfig(width=12, goodness_blocks=3, backend="triton")


def test_recipe_builds_block_wise_layers_and_scores_labels_by_the_sum_of_all_blocks():
    config = SupervisedMNISTConfig(width=12, depth=3, goodness_blocks=4, peer_norm=0.0)
    images = torch.rand(6, 784, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6) % 10
    recipe = SupervisedMNIST(config, MnistSplits(images, labels, images, labels, "test"))
    model = recipe.model
    assert all(layer.blocks == 4 and layer.threshold == 3.0 and layer.temperature == 1.0 for layer in model.net)
    scores = model.label_scores(images)
    # by hand: label y's score is the goodness of every block of layers 2 and 3, from the plain (unshared) rows
    for y in range(10):
        x = model.inputs(images, torch.full((6,), y))
        h1 = model.net[0](x)
        h2, g2 = model.net[1].forward_with_goodness(h1)
        g3 = model.net[2].goodness(h2)
        torch.testing.assert_close(scores[:, y], g2.sum(1) + g3.sum(1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_block_wise_supervised_run_learns_beyond_its_untrained_control(monkeypatch):
    """MNIST, 2 x 256 ReLUs in 4 blocks of 64 per layer, 3 epochs on 3,000 training images (the smoke test's
    supervised run, test_recipes_smoke.py), procedure (i) on 500 test images. Seeds 0-4 on the 2-core machine,
    one thread: trained 43.4, 28.8, 39.6, 35.0, 39.6%; FF updates off 91.2, 90.4, 93.6, 88.8, 94.6%. The bars:
    8.6 points above the worst seed (4 binomial SE of 500 images), and 30 of the worst seed's 47.8 points of margin.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = mnist_splits(require_mnist(), validation=False)
    config = SupervisedMNISTConfig(width=256, depth=2, goodness_blocks=4, epochs=3, batch_size=50, train_subset=3000,
                                   eval_subset=500, lr_schedule="constant", seed=0)

    def test_error() -> float:
        recipe = SupervisedMNIST(config, splits)
        generator = torch.Generator().manual_seed(config.seed)
        for _ in range(config.epochs):
            for batch in recipe.epoch_batches(generator):
                recipe.train_step(batch, generator)
        return recipe.evaluate()["test_error"]

    try:
        trained = test_error()
        freeze(monkeypatch, SupervisedMNIST)
        control = test_error()
    finally:
        torch.set_num_threads(threads)
    assert trained <= 0.52 and control - trained >= 0.30, (trained, control)


# ------------------------------------------------------------------ backend "auto" on CUDA


def test_auto_on_cuda_runs_blocks_in_torch_ops_not_the_fused_kernels(monkeypatch):
    """Where "auto" resolves to "triton" (CUDA tensors), a block-wise layer runs in the cpu backend's torch ops.
    Simulated on the CPU: the resolution is forced to "triton" and the fused kernels fail if called."""
    from ff_kernels.ops import linear, triton_linear

    def fused(*args, **kwargs):
        raise AssertionError("the fused Triton kernels ran a block-wise layer")

    layer = pair("cpu", 10, 12, 3, peer_norm=ff_kernels.PeerNormalization(12, 0.5))[0]
    auto, plain = twin(layer, backend="auto"), twin(layer, backend="auto", blocks=None, threshold=None)
    x_pos, x_neg = rows(4, 10, 17), rows(4, 10, 18)
    monkeypatch.setattr(linear, "resolve_backend", lambda backend, device, layer="FFLinear": "triton")
    monkeypatch.setattr(triton_linear, "forward", fused)
    monkeypatch.setattr(triton_linear, "train_step", fused)
    assert auto._step_takes_peer()  # peer normalization joins the torch-ops step, as on "cpu"
    torch.testing.assert_close(auto.goodness(x_pos), layer.goodness(x_pos), **TIGHT)
    torch.testing.assert_close(auto.ff_step(x_pos, x_neg, lr=0.1), layer.ff_step(x_pos, x_neg, lr=0.1), **TIGHT)
    torch.testing.assert_close(auto.weight, layer.weight, **TIGHT)
    with pytest.raises(AssertionError, match="fused Triton kernels ran"):
        plain.goodness(x_pos)  # without blocks "auto" on CUDA is the fused kernels


@pytest.mark.gpu
def test_block_wise_layer_on_cuda_matches_the_reference():
    fast, ref = pair("auto", 30, 40, 4, device="cuda")
    x_pos, x_neg = rows(6, 30, 19).cuda(), rows(5, 30, 20).cuda()
    for _ in range(3):
        torch.testing.assert_close(fast.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9),
                                   ref.ff_step(x_pos, x_neg, lr=0.05, momentum=0.9), **STEPS)
    torch.testing.assert_close(fast.weight, ref.weight, **STEPS)
    torch.testing.assert_close(fast.goodness(x_pos), ref.goodness(x_pos), **STEPS)
