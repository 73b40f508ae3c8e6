"""The CIFAR-10 recipes of section 4: test procedures, evaluation bookkeeping, config checks, learning.

Synthetic 32x32 data (given to the recipes as a CifarData), small receptive fields and few
iterations keep every test to a few seconds; the real-data run is the smoke test in
test_recipes_smoke.py, the recipe's learning against its untrained control is in
test_cifar_learning.py and what a training step feeds the FF layers in test_recipe_negatives.py.
"""

import json

import pytest
import torch

from ff_kernels import functional as FF
from ff_kernels.paper.data.cifar10 import Cifar10
from ff_kernels.paper.recipes import cifar_common
from ff_kernels.paper.recipes.cifar_backprop import CifarBackprop, CifarBackpropConfig
from ff_kernels.paper.recipes.cifar_common import MEAN, STD, VALIDATION_IMAGES, CifarData, load_data, standardize
from ff_kernels.paper.recipes.cifar_ff import CifarFF, CifarFFConfig
from ff_kernels.paper.recipes.cifar_ff_net import FFRecurrentLocal
from ff_kernels.paper.train import METRICS, evaluation_due, train

SMALL_FF = {"receptive_field": 3, "train_iterations": 2, "score_from": 2, "score_to": 3, "batch_size": 20}


def class_coded_data(n: int, seed: int = 0) -> CifarData:
    """Images whose class is a coloured vertical bar at a class-specific column, on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 80, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, label % 3, :, 3 * label:3 * label + 3] = 255
    return CifarData(images, labels, {"train": (images, labels), "test": (images[: n // 2], labels[: n // 2])})


def test_standardize_uses_the_channel_constants():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = standardize(images)
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((2, 2), -MEAN[c] / STD[c]))
        assert torch.allclose(out[1, c], torch.full((2, 2), (1 - MEAN[c]) / STD[c]))


# ---------------------------------------------------------------- FF test procedures


@pytest.fixture(scope="module")
def ff_recipe():
    recipe = CifarFF(CifarFFConfig(depth=2, **SMALL_FF), data=class_coded_data(10))
    with torch.no_grad():
        recipe.model.head.weight.normal_(0.0, 0.01)
    return recipe


@pytest.mark.parametrize("goodness", ["ssq", "neg_ssq"])
def test_label_scores_match_one_run_per_label(ff_recipe, goodness):
    model, c = ff_recipe.model, ff_recipe.config
    model.config.goodness = model.net.goodness_kind = goodness
    images = standardize(ff_recipe.data.train_images[:3])
    got = model.label_scores(images)
    assert got.shape == (3, 10)
    sign = -1.0 if goodness == "neg_ssq" else 1.0
    for label in range(10):
        code = torch.nn.functional.one_hot(torch.full((3,), label), 10).float()
        history = model.net.run(images, code, c.score_to)  # states at t = 0..score_to
        expected = sum(FF.goodness(s.flatten(1)) for states in history[c.score_from:c.score_to + 1] for s in states)
        torch.testing.assert_close(got[:, label], sign * expected, rtol=1e-5, atol=1e-3)
    model.config.goodness = model.net.goodness_kind = "ssq"


def test_head_logits_read_the_last_layers_after_a_neutral_label_pass():
    """A hand-built net: every local weight and bias 0, so the first layer stays silent and the last
    one's activity is the label's drive alone. Unit u's label weights are w_u * (k + 1) / 5.5 for
    label k, so the neutral label (0.1 each) drives it by exactly w_u (0.1 * 55 / 5.5 = 1); a
    one-hot or an all-zero label would not. The one-pass softmax reads both layers' normalized
    (unit mean square) bottom-up states: [0, ..., 0, w / rms(w)]."""
    recipe = CifarFF(CifarFFConfig(depth=2, **SMALL_FF), data=class_coded_data(10))
    net, head = recipe.model.net, recipe.model.head
    units = net.units
    g = torch.Generator().manual_seed(3)
    w = torch.rand(units, generator=g) + 0.5
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        net.label_weight.copy_(w[:, None] * (torch.arange(10.0) + 1) / 5.5)
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    assert head.weight.shape == (10, 2 * units)  # depth 2 < head_layers 3: the softmax reads both layers
    features = torch.cat([torch.zeros(units), w / w.square().mean().sqrt()])
    expected = (head.weight @ features).expand(4, 10)
    images = standardize(recipe.data.train_images[:4])
    torch.testing.assert_close(recipe.model.head_logits(images), expected, rtol=1e-4, atol=1e-3)


def test_each_update_keeps_0_3_of_the_previous_state():
    """Section 3.4's damping, on a hand-built net: the last layer sees only the label (weight 0.5 from
    every label entry: its state is 0.5 everywhere at every t, goodness 3072 x 0.25 = 768); the first
    layer sees only the last one, top-down, so it is 0 at t = 0 and then approaches its undamped
    state a as h_t = 0.3 h_(t-1) + 0.7 a = (1 - 0.3^t) a: its goodness at t = 1, 2, 3 is in the
    ratio 0.7^2 : 0.91^2 : 0.973^2."""
    recipe = CifarFF(CifarFFConfig(depth=2, **SMALL_FF), data=class_coded_data(10))
    net = recipe.model.net
    assert net.damping == 0.3
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        first = net.layers[0]
        first.weight[:, :, first.below_channels * 9:] = 0.1  # top-down part of 3x3 windows
        net.label_weight.fill_(0.5)
    images = standardize(recipe.data.train_images[:2])
    g = net.goodness(images, torch.nn.functional.one_hot(torch.tensor([0, 3]), 10).float(), 3)  # (t, B, layer)
    torch.testing.assert_close(g[:, :, 1], torch.full((3, 2), 768.0), rtol=1e-5, atol=0)
    ratios = g[:, :, 0] / g[0, :, 0]
    torch.testing.assert_close(ratios, torch.tensor([1.0, (0.91 / 0.7) ** 2, (0.973 / 0.7) ** 2])[:, None].expand(3, 2),
                               rtol=1e-5, atol=0)


def test_evaluate_counts_the_errors_of_each_procedure(ff_recipe, monkeypatch):
    """With scores set by hand: per row, the goodness test prefers [0, 2, 2, 4, 4, 6, 6, 8, 8, 0][row]
    (its scores fall with the distance to that label, so its argmin is another label) and the softmax
    always prefers 3. The sets are the 10 training images (labels 0-9) and the first 5 (labels 0-4):
    the goodness test is right on the even rows, the softmax on the row labelled 3."""
    preferred = torch.tensor([0, 2, 2, 4, 4, 6, 6, 8, 8, 0])

    def label_scores(images, start=None):
        return -(torch.arange(10.0)[None, :] - preferred[: images.shape[0], None]).abs()

    def head_logits(images, start=None):
        return torch.nn.functional.one_hot(torch.full((images.shape[0],), 3), 10).float()

    monkeypatch.setattr(ff_recipe.model, "label_scores", label_scores)
    monkeypatch.setattr(ff_recipe.model, "head_logits", head_logits)
    assert ff_recipe.evaluate() == {"train_error": 0.5, "train_error_softmax": 0.9,
                                    "test_error": 0.4, "test_error_softmax": 0.8}


@pytest.fixture
def numbered_cifar(monkeypatch):
    """load_cifar10 replaced by 5,300 training and 50 test images whose first pixel is their index mod 256."""
    def images(n):
        x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
        x[:, 0, 0, 0] = (torch.arange(n) % 256).to(torch.uint8)
        return x
    fake = Cifar10(images(5300), torch.arange(5300) % 10, {"test": (images(50), torch.zeros(50, dtype=torch.int64))},
                   "numbered images")
    monkeypatch.setattr(cifar_common, "load_cifar10", lambda data_dir, **subsets: fake.head(
        subsets.get("train_subset"), subsets.get("eval_subset")))
    return fake


def test_validation_holds_out_the_last_training_images(numbered_cifar):
    data = load_data(CifarBackpropConfig(validation=True, train_subset=200, eval_subset=100), torch.device("cpu"))
    assert set(data.eval_sets) == {"train", "validation"}
    assert torch.equal(data.train_images, numbered_cifar.train_images[:200])
    held_images, held_labels = data.eval_sets["validation"]
    first_held = 5300 - VALIDATION_IMAGES
    assert torch.equal(held_images, numbered_cifar.train_images[first_held:first_held + 100])
    assert torch.equal(held_labels, numbered_cifar.train_labels[first_held:first_held + 100])
    plain = load_data(CifarBackpropConfig(train_subset=200, eval_subset=40), torch.device("cpu"))
    assert set(plain.eval_sets) == {"train", "test"} and len(plain.eval_sets["test"][1]) == 40


def test_validation_refuses_a_training_subset_that_reaches_the_held_out_images(numbered_cifar):
    with pytest.raises(ValueError, match=r"n_train must be in 1\.\.300, got 400"):
        load_data(CifarBackpropConfig(validation=True, train_subset=400), torch.device("cpu"))
    with pytest.raises(ValueError, match="validation must be True or False, got 1"):
        CifarFFConfig(validation=1)


def test_evaluation_runs_every_nth_epoch_and_after_the_last(tmp_path):
    config = CifarBackpropConfig(epochs=5, eval_every=2)
    assert [evaluation_due(e, config) for e in range(1, 6)] == [False, True, False, True, True]
    recipe = CifarBackprop(CifarBackpropConfig(epochs=3, eval_every=2, receptive_field=3), data=class_coded_data(10))
    train(recipe, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert ["test_error" in m for m in lines] == [False, True, True]
    assert set(recipe.evaluate()) == {"train_error", "test_error"}


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("loss", ["threshold", "pairwise"])
def test_recurrent_local_net_learns_labels_on_tiny_maps(loss):
    """FF alone (no softmax) learns which label goes with which image: goodness error from chance to ~0."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, classes = 16, 4
    labels = torch.arange(n) % classes
    images = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    for i, y in enumerate(labels.tolist()):
        images[i, y % 3, :, 2 * y:2 * y + 2] += 2.0
    net = FFRecurrentLocal((3, 8, 8), channels=2, depth=2, kernel=3, num_labels=classes, temperature=10.0,
                           backend="reference", loss=loss)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def error() -> float:
        scores = [net.goodness(images, torch.nn.functional.one_hot(torch.full((n,), c), classes).float(), 3)[1:]
                  .sum((0, 2)) for c in range(classes)]
        return float((torch.stack(scores, 1).argmax(1) != labels).float().mean())

    before, losses = error(), []
    for _ in range(20):
        wrong = (labels + torch.randint(1, classes, (n,), generator=g)) % classes
        optimizer.zero_grad()
        codes = torch.nn.functional.one_hot(torch.cat([labels, wrong]), classes).float()
        losses.append(sum(net.ff_backward(torch.cat([images, images]), codes, n, 3)))
        optimizer.step()
    assert before >= 0.5 and error() <= 0.1 and losses[-1] < 0.5 * losses[0], (before, error(), losses)


def test_backprop_recipe_learns_class_coded_images():
    recipe = CifarBackprop(CifarBackpropConfig(receptive_field=3, batch_size=20, lr=3e-3), data=class_coded_data(40))
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for batch in recipe.epoch_batches(g):
            recipe.train_step(batch, g)
    assert recipe.evaluate()["train_error"] < 0.2


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("config_cls", [CifarFFConfig, CifarBackpropConfig])
def test_configs_reject_bad_values(config_cls):
    with pytest.raises(ValueError, match="receptive_field must be an odd int in 1..63"):
        config_cls(receptive_field=4)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        config_cls(depth=0)
    with pytest.raises(ValueError, match="train_eval_subset must be an int >= 1, got 0"):
        config_cls(train_eval_subset=0)


def test_ff_config_checks_the_scored_iterations_and_choices():
    with pytest.raises(ValueError, match="score_from <= score_to"):
        CifarFFConfig(score_from=5, score_to=4)
    with pytest.raises(ValueError, match="train_from <= train_iterations, got 4, 3"):
        CifarFFConfig(train_from=4, train_iterations=3)
    with pytest.raises(ValueError, match="goodness must be one of"):
        CifarFFConfig(goodness="max")
    with pytest.raises(ValueError, match="damping must be a number >= 0 and < 1, got 1.0"):
        CifarFFConfig(damping=1.0)
    with pytest.raises(ValueError, match=r"loss must be one of \('threshold', 'pairwise'\), got 'rank'"):
        CifarFFConfig(loss="rank")


def test_ff_recipe_builds_its_net_with_the_configured_loss():
    recipe = CifarFF(CifarFFConfig(depth=2, loss="pairwise", **SMALL_FF), data=class_coded_data(10))
    assert recipe.model.net.loss == "pairwise"
    loss, _, n = recipe.train_step(torch.arange(4), torch.Generator().manual_seed(0))
    assert n == 4 and torch.isfinite(loss)


def test_input_norm_scales_each_image_to_unit_mean_square_in_training_and_evaluation(monkeypatch):
    data = class_coded_data(10)
    plain = CifarFF(CifarFFConfig(depth=2, **SMALL_FF), data=data)
    scaled = CifarFF(CifarFFConfig(depth=2, input_norm=True, **SMALL_FF), data=data)
    images = data.train_images[:4]
    torch.testing.assert_close(plain.inputs(images), standardize(images))
    x = standardize(images)
    expected = x / x.square().mean((1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(scaled.inputs(images), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.inputs(images).square().mean((1, 2, 3)), torch.ones(4), rtol=1e-5, atol=0)
    seen = []  # what the net gets in a training step and in evaluation
    bottom_up = scaled.model.net.bottom_up
    monkeypatch.setattr(scaled.model.net, "bottom_up", lambda images: seen.append(images) or bottom_up(images))
    scaled.train_step(torch.arange(4), torch.Generator().manual_seed(0))
    scaled.evaluate()
    assert len(seen) >= 2
    for batch in seen:
        torch.testing.assert_close(batch.square().mean((1, 2, 3)), torch.ones(len(batch)), rtol=1e-5, atol=0)


def test_label_scale_multiplies_the_label_drive_and_nothing_else():
    """The label reaches the net only through ``label @ label_weight.T``, which is linear: a net
    with the label vectors times g must give what a plain net gives with its label weights
    times g, in the goodness of every label and in the softmax's neutral-label pass."""
    data = class_coded_data(10)
    scale = 3.0
    scaled = CifarFF(CifarFFConfig(depth=2, label_scale=scale, **SMALL_FF), data=data)
    plain = CifarFF(CifarFFConfig(depth=2, **SMALL_FF), data=data)
    plain.model.load_state_dict(scaled.model.state_dict())
    with torch.no_grad():
        plain.model.net.label_weight.mul_(scale)
        plain.model.head.weight.normal_()  # a head that is not zero, so that its logits compare
        scaled.model.head.weight.copy_(plain.model.head.weight)
    images = scaled.inputs(data.train_images[:5])
    labels = torch.tensor([0, 3, 9, 1, 3])
    torch.testing.assert_close(scaled.model.code(labels), scale * plain.model.code(labels), rtol=0, atol=0)
    torch.testing.assert_close(scaled.model.label_goodness(images, 6), plain.model.label_goodness(images, 6),
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(scaled.model.head_logits(images), plain.model.head_logits(images), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and the scale does change the net's answer when the weights are the same
        plain.model.net.label_weight.div_(scale)
    assert not torch.allclose(scaled.model.label_goodness(images, 6), plain.model.label_goodness(images, 6),
                              rtol=1e-3, atol=1e-2)
