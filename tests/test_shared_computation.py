"""Work shared between rows, checked against the plain computation.

- ``preact``: FFLinear / FFSequential take the first layer's pre-activations from the caller.
- ``label_columns``: positive and negative rows that differ only in their label columns; the
  weight gradient reads the shared columns once.
- The supervised recipe's shared first layer (``LabelInInputNet.share_first_layer``): the
  image part of layer 1's GEMM once per image, the label part and the row scale per row.
- FFRecurrent's shared bottom-up term (``share_bottom_up``): layer 1's bottom-up term once per
  image, reused by every iteration and every row of the image (tiled bottom inputs).
- The CIFAR-10 net's shared bottom-up pass (``FFRecurrentLocal.share_bottom_up``): the pass
  without the label once per image, layer 0's bottom-up term reused at every iteration.

Tolerances: the shared computations add the same products in another order (and scale a row
after the sum instead of before it), so they differ from the plain ones by float32 rounding:
a few ulps of the sum of the absolute products, about 1e-6 of the values here. Training steps
are compared after a few updates, where the rounding differences have passed through the
nonlinearities and the optimizer a few times (rtol 1e-5 / atol 1e-6 relative to the values).
"""

import pytest
import torch
import torch.nn.functional as F

from ff_kernels.nn import FFLinear, FFLocal2d, FFSequential, PeerNormalization
from ff_kernels.nn.recurrent import BottomUp, FFRecurrent
from ff_kernels.ops import ext_local2d
from ff_kernels.ops.cpu_linear import rows_together
from ff_kernels.paper.data import MnistSplits
from ff_kernels.paper.recipes.recurrent_mnist import RecurrentMNIST, RecurrentMNISTConfig
from ff_kernels.paper.recipes.supervised_mnist import SupervisedMNIST, SupervisedMNISTConfig

SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}


def close(got, want, scale=None, rtol=1e-5, msg=None):
    """Equal up to float32 rounding of sums whose terms are up to ``scale`` (default: ``want``'s size)."""
    scale = float(want.detach().abs().max()) if scale is None else float(torch.as_tensor(scale).detach())
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-6), msg=msg)


def assert_states_close(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-5) -> None:
    for (name, got), want in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if not want.is_floating_point():  # a mask
            assert torch.equal(got, want), name
            continue
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(float(want.abs().max()), 1e-6), msg=name)


# ----------------------------------------------------------------------------- the library's preact


def test_rows_together_is_a_view_of_adjacent_halves_and_a_copy_otherwise():
    x = torch.randn(7, 5)
    joined = rows_together(x[:3], x[3:])
    assert joined.data_ptr() == x.data_ptr() and torch.equal(joined, x)
    one = rows_together(x[:1], x[1:])
    assert one.data_ptr() == x.data_ptr() and torch.equal(one, x)
    apart = rows_together(x[:3], x[4:])  # not adjacent
    assert apart.data_ptr() != x.data_ptr() and torch.equal(apart, torch.cat([x[:3], x[4:]]))
    swapped = rows_together(x[3:], x[:3])
    assert torch.equal(swapped, torch.cat([x[3:], x[:3]]))
    assert torch.equal(rows_together(x[:0], x), x) and torch.equal(rows_together(x, x[:0]), x)
    columns = rows_together(x[:3, 1:], x[3:, 1:])  # not contiguous
    assert torch.equal(columns, x[:, 1:])


def make_linear(d_in, d_out, backend="cpu", seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = FFLinear(d_in, d_out, backend=backend, **kwargs)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_(0.0, 0.3)
    return layer


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
def test_forward_from_preact_equals_forward(backend, batch, kind):
    layer = make_linear(13, 7, backend, goodness=kind, rms_norm=True)
    x = torch.randn(batch, 13)
    preact = torch.addmm(layer.bias, x, layer.weight.t())
    out, g = layer.forward_with_goodness(x)
    kept = preact.clone()
    for given in (x, None):
        got_out, got_g = layer.forward_with_goodness(given, preact)
        close(got_out, out)
        close(got_g, g)
    close(layer.goodness(None, preact), g)
    assert torch.equal(preact, kept)  # the caller's pre-activations are read, never written
    strided = torch.empty(7, batch).t().copy_(preact)  # the same values, column-major
    close(layer.forward_with_goodness(None, strided)[0], out)


@pytest.mark.parametrize("mode", ["sgd", "grad"])
@pytest.mark.parametrize("n_pos,n_neg", [(1, 0), (0, 1), (1, 1), (4, 3)])
def test_step_with_preact_equals_the_step_without(mode, n_pos, n_neg):
    plain, shared = make_linear(11, 6, peer_norm=None), make_linear(11, 6)
    x = torch.randn(n_pos + n_neg, 11)
    x_pos, x_neg = x[:n_pos], x[n_pos:]
    for _ in range(2):  # the second step also sees the momentum buffers
        preact = torch.addmm(shared.bias, x, shared.weight.t())  # what the layer computes: the same bits
        if mode == "sgd":
            want = plain.ff_step(x_pos, x_neg, **SGD, return_step=True)
            got = shared.ff_step(x_pos, x_neg, **SGD, return_step=True, preact=preact)
        else:
            want = plain.ff_backward(x_pos, x_neg, return_step=True)
            got = shared.ff_backward(x_pos, x_neg, return_step=True, preact=preact)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_states_close(shared, plain, rtol=0)
    if mode == "grad":
        torch.testing.assert_close(shared.weight.grad, plain.weight.grad, rtol=0, atol=0)


def test_step_with_a_preact_summed_in_parts_agrees_up_to_rounding():
    """The supervised recipe's case: the preact of [label, image] rows from the image columns and
    the label columns separately; the weight gradient still uses the whole rows."""
    plain, shared = make_linear(30, 9), make_linear(30, 9)
    x = torch.rand(8, 30)
    preact = (x[:, 3:] @ shared.weight[:, 3:].t() + x[:, :3] @ shared.weight[:, :3].t()) + shared.bias
    want = plain.ff_step(x[:4], x[4:], **SGD)
    got = shared.ff_step(x[:4], x[4:], **SGD, preact=preact)
    close(got, want)
    assert_states_close(shared, plain)


@pytest.mark.parametrize("layers", [None, [0], [1], [0, 2]])
def test_sequential_passes_preact_to_the_first_layer(layers):
    def net():
        torch.manual_seed(3)
        return FFSequential(FFLinear(12, 8, backend="cpu"), FFLinear(8, 6, backend="cpu"), FFLinear(6, 5, backend="cpu"))

    plain, shared = net(), net()
    x = torch.randn(6, 12)
    preact = torch.addmm(shared[0].bias, x, shared[0].weight.t())
    torch.testing.assert_close(shared.goodness(None, preact), plain.goodness(x), rtol=0, atol=0)
    for got, want in zip(shared.activations(None, preact), plain.activations(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    want = plain.ff_step(x[:3], x[3:], **SGD, layers=layers)
    got = shared.ff_step(x[:3], x[3:], **SGD, layers=layers, preact=preact)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_states_close(shared, plain, rtol=0)
    preact = torch.addmm(shared[0].bias, x, shared[0].weight.t())
    close(torch.stack(shared.ff_backward(x[:3], x[3:], layers=layers, preact=preact)),
          torch.stack(plain.ff_backward(x[:3], x[3:], layers=layers)))


def test_preact_is_checked_and_refused_by_layers_without_it():
    layer = make_linear(5, 4)
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"preact must have shape \(batch, 4\)"):
        layer.forward_with_goodness(x, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="preact must have one row per input row"):
        layer.forward_with_goodness(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="preact must have one row per input row"):
        layer.ff_step(x[:1], x[1:], lr=0.1, preact=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="x may be None only when preact is given"):
        layer.forward_with_goodness(None)
    with pytest.raises(ValueError, match="preact contains NaN"):
        layer.forward_with_goodness(x, torch.full((3, 4), float("nan")))
    local = FFLocal2d(1, 6, 2, kernel=3)
    with pytest.raises(TypeError, match="does not take precomputed pre-activations"):
        local.forward_with_goodness(torch.zeros(2, 1, 6, 6), torch.zeros(2, 32))


# ----------------------------------------------------------------------------- label_columns


def paired_rows(n, d_in, k, seed=0):
    """n positive rows and n negative rows equal to them past their first k columns (a label)."""
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(n, d_in, generator=gen)
    x_neg = x_pos.clone()
    x_neg[:, :k] = torch.rand(n, k, generator=gen)
    return x_pos, x_neg


LABEL_CASES = {
    "plain": {}, "masked": {"mask": "random"}, "peer": {"peer_norm": "yes"}, "no-bias": {"bias": False},
    "blocks": {"blocks": 3}, "sum": {"goodness": "sum"},
}


@pytest.mark.parametrize("mode", ["sgd", "grad"])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_step_with_label_columns_equals_the_step_without(case, n, mode):
    """The paired weight gradient, (delta_pos + delta_neg).T @ x_pos plus the label columns'
    correction, adds the same products in another order: float32 rounding apart."""
    kwargs = dict(LABEL_CASES[case])
    if kwargs.get("mask") == "random":
        kwargs["mask"] = torch.rand(9, 30, generator=torch.Generator().manual_seed(1)) < 0.6
    if kwargs.pop("peer_norm", None):
        kwargs["peer_norm"] = PeerNormalization(9, strength=0.5)
    plain, paired = make_linear(30, 9, **kwargs), make_linear(30, 9, **kwargs)
    if "peer_norm" in kwargs:
        paired.peer_norm = PeerNormalization(9, strength=0.5)
    for step in range(2):  # the second step also sees the momentum buffers
        x_pos, x_neg = paired_rows(n, 30, 4, seed=step)
        if mode == "sgd":
            want = plain.ff_step(x_pos, x_neg, **SGD, return_step=True)
            got = paired.ff_step(x_pos, x_neg, **SGD, return_step=True, label_columns=4)
        else:
            want = plain.ff_backward(x_pos, x_neg, return_step=True)
            got = paired.ff_backward(x_pos, x_neg, return_step=True, label_columns=4)
        for a, b in zip(got, want):  # the same forward pass; after a step, on weights a rounding apart
            close(a, b, rtol=0 if step == 0 else 1e-5)
    assert_states_close(paired, plain)
    if mode == "grad":
        scale = plain.weight.grad.abs().max()
        close(paired.weight.grad, plain.weight.grad, scale=scale)
        assert float(scale) > 0, "degenerate case: no gradient"


@pytest.mark.filterwarnings("ignore:compute_dtype=torch.bfloat16 on a CPU without")
def test_step_with_label_columns_in_bf16_compute_agrees_to_bf16_rounding():
    """bf16 GEMMs: delta_pos + delta_neg is rounded to bf16 once more (relative 2^-8)."""
    plain, paired = (make_linear(30, 9, compute_dtype=torch.bfloat16) for _ in range(2))
    x_pos, x_neg = paired_rows(6, 30, 4)
    plain.ff_backward(x_pos, x_neg)
    paired.ff_backward(x_pos, x_neg, label_columns=4)
    close(paired.weight.grad, plain.weight.grad, rtol=2e-2)


@pytest.mark.parametrize("layers", [None, [0], [1]])
def test_sequential_passes_label_columns_to_the_first_layer_only(layers):
    """Layer 2's inputs are layer 1's outputs, not pairs: it must not get label_columns (its
    check would refuse them)."""
    def net():
        torch.manual_seed(3)
        return FFSequential(FFLinear(12, 8, backend="cpu"), FFLinear(8, 6, backend="cpu"))

    plain, paired = net(), net()
    x_pos, x_neg = paired_rows(3, 12, 2)
    want = plain.ff_step(x_pos, x_neg, **SGD, layers=layers)
    got = paired.ff_step(x_pos, x_neg, **SGD, layers=layers, label_columns=2)
    close(torch.stack(got), torch.stack(want))
    assert_states_close(paired, plain)
    close(torch.stack(paired.ff_backward(x_pos, x_neg, layers=layers, label_columns=2)),
          torch.stack(plain.ff_backward(x_pos, x_neg, layers=layers)))


def test_label_columns_are_checked_and_refused_by_layers_without_them():
    layer = make_linear(6, 4)
    x_pos, x_neg = paired_rows(3, 6, 2)
    with pytest.raises(ValueError, match=r"x_neg must equal x_pos past the first 1 columns \(label_columns\)"):
        layer.ff_step(x_pos, x_neg, lr=0.1, label_columns=1)
    with pytest.raises(ValueError, match="label_columns needs as many negative rows as positive ones"):
        layer.ff_step(x_pos, x_neg[:2], lr=0.1, label_columns=2)
    with pytest.raises(ValueError, match=r"label_columns must be in \[0, 6\] \(the row width\), got 7"):
        layer.ff_backward(x_pos, x_neg, label_columns=7)
    with pytest.raises(TypeError, match="label_columns must be an int or None, got bool"):
        layer.ff_backward(x_pos, x_neg, label_columns=True)
    before = layer.weight.detach().clone()
    assert torch.equal(layer.weight, before)  # nothing moved on a refused step
    local = FFLocal2d(1, (4, 4), 2, kernel=3, backend="reference")
    images = torch.rand(2, 1, 4, 4)
    with pytest.raises(TypeError, match=r"FFLocal2d.*does not take label_columns"):
        local.ff_step(images, images, lr=0.1, label_columns=1)


# ----------------------------------------------------------------------------- the supervised recipe


def mnist_like(n_train=120, n_eval=30, seed=0) -> MnistSplits:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.rand(n, 784, generator=g) * (torch.rand(n, 784, generator=g) < 0.3)

    return MnistSplits(images(n_train), torch.randint(0, 10, (n_train,), generator=g), images(n_eval),
                       torch.randint(0, 10, (n_eval,), generator=g), "test")


def supervised_pair(**config):
    """Two identical recipes with non-zero biases, the second without the shared first layer."""
    config = SupervisedMNISTConfig(**{"width": 40, "depth": 3, "batch_size": 20, **config})
    data = mnist_like()
    shared, plain = SupervisedMNIST(config, data), SupervisedMNIST(config, data)
    with torch.no_grad():
        for a, b in zip(shared.model.net, plain.model.net):
            a.bias.normal_(0.0, 0.1)
            b.bias.copy_(a.bias)
    plain.model.share_first_layer = False
    return shared, plain


@pytest.mark.parametrize("input_norm", [True, False])
@pytest.mark.parametrize("batch", [1, 7])
def test_first_preacts_equal_the_gemm_of_the_input_rows(input_norm, batch):
    shared, _ = supervised_pair(input_norm=input_norm)
    model = shared.model
    layer = model.net[0]
    images = mnist_like().train_images[:batch]
    part = model.image_part(images)
    labels = torch.randint(0, 10, (3, batch))
    neutral = torch.full((1, 1, 10), 0.1)
    codes = torch.rand(2, batch, 10)
    expected_codes = {
        "classes": (labels, [labels[r] for r in range(3)]),
        "one class per set": (torch.arange(10)[:, None], [torch.full((batch,), k) for k in range(10)]),
        "neutral": (neutral, [neutral[0].expand(batch, 10)]),
        "float codes": (codes, [codes[r] for r in range(2)]),
    }
    for name, (given, per_set) in expected_codes.items():
        rows = torch.cat([model.inputs(images, lab) for lab in per_set])
        want = torch.addmm(layer.bias, rows, layer.weight.t()).detach()
        close(model.first_preacts(part, given), want, scale=(rows.abs() @ layer.weight.abs().t()).max(), msg=name)
    wrong = (labels[0] + 1) % 10
    x, preact = model.training_rows(images, labels[0], wrong, part)
    close(x, torch.cat([model.inputs(images, labels[0]), model.inputs(images, wrong)]))
    close(preact, torch.addmm(layer.bias, x, layer.weight.t()), scale=(x.abs() @ layer.weight.abs().t()).max())


@pytest.mark.parametrize("config", [{}, {"optimizer": "adam"}, {"depth": 1}, {"input_norm": False},
                                    {"goodness": "neg_ssq"}, {"negatives": "random"}])
def test_supervised_training_with_the_shared_first_layer_follows_the_plain_one(config):
    shared, plain = supervised_pair(**config)
    g_shared, g_plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(4):
        batch = torch.arange(step * 20, step * 20 + 20 - step)  # ragged: 20, 19, 18, 17 rows
        got, want = shared.train_step(batch, g_shared), plain.train_step(batch, g_plain)
        assert int(got[1]) == int(want[1]) and got[2] == want[2]
        close(got[0], want[0])
    assert_states_close(shared.model, plain.model)
    for n in (1, 30):
        images = shared.eval_images[:n]
        close(shared.model.label_scores(images), plain.model.label_scores(images))
        close(shared.model.head_logits(images), plain.model.head_logits(images))
    assert shared.evaluate() == plain.evaluate()


@pytest.mark.filterwarnings("ignore:compute_dtype=torch.bfloat16 on a CPU without")  # expected on such CPUs
def test_supervised_bf16_shared_first_layer_runs_its_gemm_in_bf16():
    shared, plain = supervised_pair(compute_dtype="bfloat16")
    images = shared.eval_images[:5]
    part = shared.model.image_part(images)
    assert part.preact.dtype == torch.float32
    close(shared.model.label_scores(images), plain.model.label_scores(images), rtol=3e-2)
    g_shared, g_plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    batch = torch.arange(20)
    got, want = shared.train_step(batch, g_shared), plain.train_step(batch, g_plain)  # bf16 GEMMs: loose
    close(got[0], want[0], rtol=3e-2)
    assert_states_close(shared.model, plain.model, rtol=3e-2)


# ----------------------------------------------------------------------------- the recurrent net


def recurrent_pair(hidden=(9, 7), seed=0, **kwargs):
    torch.manual_seed(seed)
    shared = FFRecurrent(11, hidden, 4, temperature=2.0, **kwargs)
    with torch.no_grad():
        for layer in shared.layers:
            layer.bias.normal_(0.0, 0.3)
    plain = FFRecurrent(11, hidden, 4, temperature=2.0, share_bottom_up=False, **kwargs)
    plain.load_state_dict(shared.state_dict())
    return shared, plain


def clamped(images: int, tiles: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    bottom = torch.rand(images, 11, generator=g)
    bottom = bottom / bottom.square().mean(1, keepdim=True).sqrt()
    top = F.one_hot(torch.randint(0, 4, (images * tiles,), generator=g), 4).float() * 2.0
    return bottom, top


@pytest.mark.parametrize("hidden", [(9,), (9, 7), (9, 7, 8)])
@pytest.mark.parametrize("images,tiles", [(1, 1), (1, 10), (3, 2), (4, 1)])
def test_recurrent_goodness_with_the_shared_bottom_up_term(hidden, images, tiles):
    shared, plain = recurrent_pair(hidden)
    bottom, top = clamped(images, tiles)
    want = plain.goodness(bottom.repeat(tiles, 1), top, 6)
    close(shared.goodness(bottom, top, 6), want)
    close(shared.goodness(bottom, top, 6, shared.bottom_up(bottom)), want)
    close(shared.goodness(bottom.repeat(tiles, 1), top, 6), want)  # untiled rows share nothing, same result
    close(plain.goodness(bottom, top, 6), want)  # the plain net takes tiled rows too
    start = shared.bottom_up(bottom)
    assert isinstance(start, BottomUp) and start.up.shape == (images, hidden[0])
    for got, state in zip(start.states, plain.initial_states(bottom)):
        torch.testing.assert_close(got, state, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ssq", "neg_ssq", "sum"])
@pytest.mark.parametrize("hidden", [(9,), (9, 7), (9, 7, 8)])
@pytest.mark.parametrize("images,tiles,n_pos", [(1, 1, 1), (1, 1, 0), (3, 2, 3), (3, 2, 6), (2, 3, 1), (5, 1, 2)])
def test_recurrent_ff_step_with_the_shared_bottom_up_term(kind, hidden, images, tiles, n_pos):
    shared, plain = recurrent_pair(hidden, goodness=kind, peer_norm=0.2)
    bottom, top = clamped(images, tiles)
    for momentum in (0.9, 0.0):
        for _ in range(2):
            want = plain.ff_step(bottom.repeat(tiles, 1), top, n_pos, 4, lr=0.05, momentum=momentum,
                                 weight_decay=0.01)
            got = shared.ff_step(bottom, top, n_pos, 4, lr=0.05, momentum=momentum, weight_decay=0.01,
                                 states=shared.bottom_up(bottom))
            close(torch.stack(got), torch.stack(want))
        assert_states_close(shared, plain)


def test_recurrent_ff_step_takes_states_of_every_form():
    """None, a BottomUp, a list of states per image or per row: the same step."""
    _, plain = recurrent_pair()
    bottom, top = clamped(3, 2)
    want = torch.stack(plain.ff_step(bottom.repeat(2, 1), top, 3, 3, lr=0.1, momentum=0.9))
    for form in ("none", "bottom_up", "per image", "per row"):
        net, _ = recurrent_pair()
        start = net.initial_states(bottom)
        states = {"none": None, "bottom_up": net.bottom_up(bottom), "per image": start,
                  "per row": [s.repeat(2, 1) for s in start]}[form]
        close(torch.stack(net.ff_step(bottom, top, 3, 3, lr=0.1, momentum=0.9, states=states)), want)
        assert_states_close(net, plain)


def test_recurrent_tiling_is_checked():
    shared, _ = recurrent_pair()
    bottom, top = clamped(3, 2)
    with pytest.raises(ValueError, match="bottom and top must have the same rows, or top a multiple"):
        shared.goodness(bottom, top[:5], 2)
    with pytest.raises(ValueError, match=r"states\[0\] has 4 rows, bottom has 3 and top 6"):
        shared.goodness(bottom, top, 2, [torch.zeros(4, 9), torch.zeros(4, 7)])
    with pytest.raises(ValueError, match="states.up has 2 rows, bottom has 3"):
        shared.goodness(bottom, top, 2, shared.bottom_up(bottom[:2]))
    with pytest.raises(ValueError, match="n_pos must be in 0..6"):
        shared.ff_step(bottom, top, 7, 2, lr=0.1)


def test_recurrent_recipe_with_the_shared_bottom_up_term_follows_the_plain_one():
    config = RecurrentMNISTConfig(width=24, depth=2, batch_size=15, iterations=4, score_to=4)
    data = mnist_like()
    shared, plain = RecurrentMNIST(config, data), RecurrentMNIST(config, data)
    plain.model.net.share_bottom_up = False
    g_shared, g_plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(3):
        batch = torch.arange(step * 15, step * 15 + 15 - step)
        got, want = shared.train_step(batch, g_shared), plain.train_step(batch, g_plain)
        assert int(got[1]) == int(want[1])
        close(got[0], want[0])
    assert_states_close(shared.model, plain.model)
    for n in (1, 30):
        images = shared.eval_images[:n]
        close(shared.model.label_scores(images), plain.model.label_scores(images))
    assert shared.evaluate() == plain.evaluate()


# ----------------------------------------------------------------------------- the CIFAR-10 net


def local_pair(depth, backend, loss="threshold", goodness="ssq"):
    """Two identical small recurrent local nets (3x8x8 images, 2 units per location, 3x3 windows),
    the second without the shared work; non-zero biases."""
    from ff_kernels.paper.recipes.cifar_ff_net import FFRecurrentLocal

    nets = []
    for share in (True, False):
        torch.manual_seed(0)
        net = FFRecurrentLocal((3, 8, 8), channels=2, depth=depth, kernel=3, num_labels=4, goodness=goodness,
                               temperature=20.0, backend=backend, loss=loss, share_bottom_up=share)
        with torch.no_grad():
            for layer in net.layers:
                layer.bias.normal_(0.0, 0.2)
        nets.append(net)
    return nets


def local_case(images, tiles, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(images, 3, 8, 8, generator=g),
            F.one_hot(torch.randint(0, 4, (images * tiles,), generator=g), 4).float())


LOCAL_BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not ext_local2d.available(torch.device("cpu")), reason="ff_kernels._C not built"))]


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("images,tiles", [(1, 1), (3, 2), (2, 10)])
def test_cifar_net_goodness_with_the_shared_bottom_up_pass(backend, depth, images, tiles):
    shared, plain = local_pair(depth, backend)
    x, labels = local_case(images, tiles)
    want = plain.goodness(x.repeat(tiles, 1, 1, 1), labels, 5)
    close(shared.goodness(x, labels, 5), want)
    close(shared.goodness(x, labels, 5, shared.bottom_up(x)), want)
    close(plain.goodness(x, labels, 5), want)  # the plain net takes tiled images too
    for got, state in zip(shared.states_from(shared.bottom_up(x), labels),
                          plain.initial_states(x.repeat(tiles, 1, 1, 1), labels)):
        close(got, state)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("loss,first", [("threshold", 1), ("threshold", 3), ("pairwise", 2)])
def test_cifar_net_ff_backward_with_the_shared_bottom_up_pass(backend, depth, loss, first):
    shared, plain = local_pair(depth, backend, loss)
    x, labels = local_case(3, 2)
    want = plain.ff_backward(x.repeat(2, 1, 1, 1), labels, 3, 4, first)
    got = shared.ff_backward(x, labels, 3, 4, first, start=shared.bottom_up(x))
    close(torch.stack(got), torch.stack(want))
    for (name, a), b in zip(shared.named_parameters(), plain.parameters(), strict=True):
        close(a.grad, b.grad, msg=name)
    got = shared.ff_backward(x.repeat(2, 1, 1, 1), labels, 3, 4, first)  # untiled images: the same again
    want = plain.ff_backward(x.repeat(2, 1, 1, 1), labels, 3, 4, first)
    for (name, a), b in zip(shared.named_parameters(), plain.parameters(), strict=True):
        close(a.grad, b.grad, msg=name)


def test_cifar_recipe_with_the_shared_bottom_up_pass_follows_the_plain_one():
    from ff_kernels.paper.recipes.cifar_common import CifarData
    from ff_kernels.paper.recipes.cifar_ff import CifarFF, CifarFFConfig

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,), generator=g)
    data = CifarData(images, labels, {"test": (images[:12], labels[:12])})
    config = CifarFFConfig(channels=2, receptive_field=3, train_iterations=3, score_from=2, score_to=3,
                           batch_size=10, backend="reference")
    shared, plain = CifarFF(config, data), CifarFF(config, data)
    plain.model.net.share_bottom_up = False
    g_shared, g_plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(3):
        batch = torch.arange(step * 10, step * 10 + 10 - step)
        got, want = shared.train_step(batch, g_shared), plain.train_step(batch, g_plain)
        assert int(got[1]) == int(want[1])
        close(got[0], want[0])
    assert_states_close(shared.model, plain.model)
    assert shared.evaluate() == plain.evaluate()
