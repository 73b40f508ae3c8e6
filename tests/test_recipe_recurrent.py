"""The recurrent MNIST recipe (section 3.4): test procedure, hard negatives, config, learning, resume.

What a training step feeds the FF layers is checked in test_recipe_negatives.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ff_kernels.paper.data import MnistSplits, mnist_splits
from ff_kernels.paper.recipes.recurrent_mnist import RecurrentLabelNet, RecurrentMNIST, RecurrentMNISTConfig
from ff_kernels.paper.train import CHECKPOINT, train

from _paths import require_mnist
from recurrent_reference import naive_run

TINY = {"width": 6, "depth": 2, "batch_size": 10, "train_subset": 40, "eval_subset": 12}


def fake_data(n_train=40, n_eval=12, seed=0) -> MnistSplits:
    g = torch.Generator().manual_seed(seed)
    return MnistSplits(torch.rand(n_train, 784, generator=g), torch.randint(0, 10, (n_train,), generator=g),
                       torch.rand(n_eval, 784, generator=g), torch.randint(0, 10, (n_eval,), generator=g), "test")


def naive_scores(model: RecurrentLabelNet, images: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """(B, 10): for each label, the goodness summed over the hidden layers and averaged over
    iterations first..last (1-based), from the naive loop; image and label at unit mean square."""
    bottom = images / images.square().mean(1, keepdim=True).sqrt()
    columns = []
    for label in range(10):
        top = F.one_hot(torch.full((images.shape[0],), label), 10).float() * math.sqrt(10)
        _, goodness = naive_run(model.net, bottom, top, last)  # (last, B, K)
        columns.append(goodness[first - 1:last].sum(2).mean(0))
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("goodness,sign", [("ssq", 1.0), ("neg_ssq", -1.0)])
def test_test_procedure_is_argmax_of_goodness_over_iterations_3_to_5(goodness, sign):
    """The label with the highest goodness averaged over iterations 3-5 (min ssq: the lowest), from
    the naive loop of recurrent_reference.py; evaluate() counts an error wherever it is not the label."""
    recipe = RecurrentMNIST(RecurrentMNISTConfig(goodness=goodness, **TINY), fake_data())
    model = recipe.model
    with torch.no_grad():  # a strong top-down label input, so that labels get clearly different scores
        top_layer = model.net.layers[-1]
        top_layer.weight[:, -10:].normal_(0.0, 1.0)
    images = recipe.eval_images
    expected = sign * naive_scores(model, images, 3, 5)
    torch.testing.assert_close(model.label_scores(images), expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(sign * naive_scores(model, images, 1, 8), expected, rtol=1e-3)
    best = expected.argmax(1)
    assert (expected.topk(2, dim=1).values.diff(dim=1).abs() > 1e-2).all()  # no near-ties
    recipe.eval_labels = best
    assert recipe.evaluate()["test_error"] == 0.0
    recipe.eval_labels = (best + 1) % 10
    assert recipe.evaluate()["test_error"] == 1.0


def test_hard_negatives_never_pick_the_true_label_and_follow_the_probabilities():
    recipe = RecurrentMNIST(RecurrentMNISTConfig(**TINY), fake_data())
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    labels = torch.full((n,), 3)
    wrong_probs = torch.tensor([0.0, 0.05, 0.1, 0.0, 0.15, 0.2, 0.0, 0.0, 0.3, 0.2])  # over the wrong classes
    probs = (0.5 * wrong_probs + 0.5 * F.one_hot(torch.tensor(3), 10)).expand(n, 10).contiguous()
    wrong = recipe.negative_labels(probs, labels, generator)
    assert not (wrong == labels).any()
    frequencies = torch.bincount(wrong, minlength=10).float() / n
    torch.testing.assert_close(frequencies, wrong_probs, atol=0.01, rtol=0)
    certain = F.one_hot(labels, 10).float()  # all mass on the true label: uniform among the wrong ones
    assert not (recipe.negative_labels(certain, labels, generator) == labels).any()


def test_softmax_reads_every_hidden_layer_at_unit_mean_square():
    """head_logits(states) = W [s_1 / rms(s_1), s_2 / rms(s_2)]: the bottom-up pass's states of both hidden
    layers, each scaled to unit mean square (rms written out here), in order."""
    recipe = RecurrentMNIST(RecurrentMNISTConfig(**TINY), fake_data())
    g = torch.Generator().manual_seed(1)
    states = [torch.rand(3, 6, generator=g) + 0.1, torch.rand(3, 6, generator=g) * 5 + 0.1]
    with torch.no_grad():
        recipe.model.head.weight.copy_(torch.randn(10, 12, generator=g))
    features = torch.cat([s / s.square().mean(1, keepdim=True).sqrt() for s in states], dim=1)
    torch.testing.assert_close(recipe.model.head_logits(states), features @ recipe.model.head.weight.t(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field,value,message", [
    ("score_to", 9, r"1 <= score_from <= score_to <= iterations, got score_from 3, score_to 9, iterations 8"),
    ("score_from", 0, "score_from must be an int >= 1, got 0"),
    ("damping", 1.0, "damping must be a number >= 0 and < 1, got 1.0"),
    ("depth", 0, "depth must be an int >= 1, got 0"),
    ("negatives", "easy", r"negatives must be one of \('hard', 'random'\), got 'easy'"),
    ("init", "uniform", r"init must be one of \('balanced', 'normal'\), got 'uniform'"),
    ("temperature", 0.0, "temperature must be a number > 0, got 0.0"),
    ("goodness", "max", "goodness must be one of"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        RecurrentMNISTConfig(**{field: value})


def test_resume_equals_an_uninterrupted_run(tmp_path):
    config = dict(TINY, lr_schedule="constant")
    straight = RecurrentMNIST(RecurrentMNISTConfig(epochs=2, **config), fake_data())
    train(straight, tmp_path / "straight", progress=False)
    first = RecurrentMNIST(RecurrentMNISTConfig(epochs=1, **config), fake_data())
    train(first, tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / CHECKPOINT).is_file()
    resumed = RecurrentMNIST(RecurrentMNISTConfig(epochs=2, **config), fake_data())
    train(resumed, tmp_path / "resumed", resume=True, progress=False)
    for (name, want), got in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)


# Observed with seeds 0-4: 34.2, 31.6, 30.6, 34.8, 26.8% test error, 3-4 s each (2-core CPU, one
# thread, under load). The bar is 9 points (about 4 binomial standard errors of the 500 test
# images) above the worst seed. Chance is 90%; with the FF updates off the same net stays at
# 89-96% (test_recipes_smoke.py), and a net scored on the wrong iterations or by the wrong sign
# falls far short of 44%.
MAX_TEST_ERROR = 0.44


@pytest.fixture
def one_thread():
    """Run on one torch thread: the small GEMMs gain nothing from two, and on a busy CPU the
    second thread made this test four times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_learns_mnist_subset(tmp_path, one_thread):
    """2 x 64 units, 3 epochs on 4,000 training images, 500 test images, by the paper's test procedure."""
    config = RecurrentMNISTConfig(epochs=3, width=64, depth=2, train_subset=4000, eval_subset=500,
                                  lr_schedule="constant")
    recipe = RecurrentMNIST(config, mnist_splits(require_mnist(), validation=False))
    summary = train(recipe, tmp_path, progress=False)
    assert summary["test_error"] <= MAX_TEST_ERROR, summary
