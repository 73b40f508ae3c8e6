"""What each FF recipe's training step feeds its FF layers as positive and negative data.

One step of every FF recipe runs with a spy on the call that trains the FF layers; the test
reads the rows back and checks them against the paper's description of the recipe:

- supervised (section 3.3): positives carry the true label in the first 10 pixels, negatives
  the same image with a wrong label drawn from the neutral-label softmax's predictions;
- recurrent (section 3.4): the clamped top layer holds the true label for positives and a wrong
  label drawn from the bottom-up softmax for negatives, over the same image;
- CIFAR-10 (section 4): the same, with the one-pass softmax;
- unsupervised (section 3.2): negatives are hybrids, each pixel from the image itself or from
  one other image of the batch;
- Aesop (section 4.1, teacher forcing): a negative is its positive window with the last
  character replaced by a wrong one drawn from the softmax's prediction.

To know which wrong label "drawn from the softmax" must give, each softmax is set by hand to
put almost all its mass on one class (``FAVOURITE``): every row whose true label is another
one must get the favourite as its negative label, and the step's count of softmax errors is
the number of rows whose label is not the favourite.
"""

import math

import pytest
import torch

from ff_kernels.nn.recurrent import BottomUp
from ff_kernels.paper.data import MnistSplits
from ff_kernels.paper.recipes import SupervisedMNIST, SupervisedMNISTConfig, UnsupervisedMNIST, UnsupervisedMNISTConfig
from ff_kernels.paper.recipes.aesop import AesopConfig, AesopFF
from ff_kernels.paper.recipes.cifar_common import MEAN, STD, CifarData
from ff_kernels.paper.recipes.cifar_ff import CifarFF, CifarFFConfig
from ff_kernels.paper.recipes.recurrent_mnist import RecurrentMNIST, RecurrentMNISTConfig

FAVOURITE = 7
BATCH = 20
LABELS = torch.arange(BATCH) % 10  # every class twice, the favourite among them


def fake_mnist(seed: int = 0) -> MnistSplits:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 784, generator=g) * 0.9 + 0.1  # no zero pixel: every pixel tells its image
    return MnistSplits(images, LABELS.clone(), images[:4], LABELS[:4].clone(), "test")


class Spy:
    """Stands in for a method: records its arguments, then calls the real one."""

    def __init__(self, target, name):
        self.real = getattr(target, name)
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.real(*args, **kwargs)


def spy_on(monkeypatch, target, name) -> Spy:
    spy = Spy(target, name)
    monkeypatch.setattr(target, name, spy)
    return spy


def favour(head_weight: torch.Tensor) -> None:
    """A bias-free softmax over non-negative normalized activities that predicts FAVOURITE by a
    logit of at least 50 x (sum of the features) over every other class."""
    with torch.no_grad():
        head_weight.zero_()
        head_weight[FAVOURITE] = 50.0


def check_wrong_labels(wrong: torch.Tensor, labels: torch.Tensor) -> None:
    assert not bool((wrong == labels).any()), "a negative carries its true label"
    others = labels != FAVOURITE
    assert bool((wrong[others] == FAVOURITE).all()), f"negatives not drawn from the softmax: {wrong.tolist()}"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_supervised_negatives_are_the_images_with_a_wrong_label_from_the_softmax(monkeypatch, optimizer):
    recipe = SupervisedMNIST(SupervisedMNISTConfig(width=8, depth=2, input_norm=False, optimizer=optimizer,
                                                   batch_size=BATCH), fake_mnist())
    favour(recipe.model.head.weight)
    spy = spy_on(monkeypatch, recipe.model.net, "ff_step" if optimizer == "sgd" else "ff_backward")
    before = [p.detach().clone() for p in recipe.model.net.parameters()]
    loss, errors, n = recipe.train_step(torch.arange(BATCH), torch.Generator().manual_seed(0))
    (x_pos, x_neg), _ = spy.calls[0]
    images = recipe.train_images
    assert torch.equal(x_pos[:, 10:], images[:, 10:]) and torch.equal(x_neg[:, 10:], images[:, 10:])
    assert torch.equal(x_pos[:, :10], torch.nn.functional.one_hot(LABELS, 10).float())
    wrong = x_neg[:, :10].argmax(1)
    assert torch.equal(x_neg[:, :10], torch.nn.functional.one_hot(wrong, 10).float())
    check_wrong_labels(wrong, LABELS)
    assert n == BATCH and int(errors) == int((LABELS != FAVOURITE).sum()) and math.isfinite(float(loss))
    assert all(not torch.equal(p, q) for p, q in zip(recipe.model.net.parameters(), before))


def test_recurrent_negatives_clamp_a_wrong_label_from_the_bottom_up_softmax(monkeypatch):
    recipe = RecurrentMNIST(RecurrentMNISTConfig(width=6, depth=2, batch_size=BATCH), fake_mnist())
    favour(recipe.model.head.weight)
    spy = spy_on(monkeypatch, recipe.model.net, "ff_step")
    _, errors, n = recipe.train_step(torch.arange(BATCH), torch.Generator().manual_seed(0))
    (bottom, top, n_pos, iterations), kwargs = spy.calls[0]
    assert n_pos == BATCH and iterations == recipe.config.iterations and n == BATCH
    images = recipe.train_images
    unit = images / images.square().mean(1, keepdim=True).sqrt()  # the image at unit mean square
    # each image once, tiled over its positive and its negative row (FFRecurrent's module docstring)
    torch.testing.assert_close(untile(bottom, 2 * BATCH), torch.cat([unit, unit]), rtol=1e-5, atol=1e-6)
    code = torch.nn.functional.one_hot(LABELS, 10).float() * math.sqrt(10)  # the label at unit mean square
    torch.testing.assert_close(top[:BATCH], code, rtol=1e-5, atol=1e-6)
    wrong = top[BATCH:].argmax(1)
    torch.testing.assert_close(top[BATCH:], torch.nn.functional.one_hot(wrong, 10).float() * math.sqrt(10),
                               rtol=1e-5, atol=1e-6)
    check_wrong_labels(wrong, LABELS)
    assert int(errors) == int((LABELS != FAVOURITE).sum())
    start = kwargs["states"]  # one bottom-up pass per image, shared by its positive and negative row
    states = start.states if isinstance(start, BottomUp) else start
    for state in states:
        assert torch.equal(untile(state, 2 * BATCH)[:BATCH], untile(state, 2 * BATCH)[BATCH:])


def untile(x: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``rows`` rows that ``x`` (N rows, N dividing ``rows``) stands for: row b is ``x[b % N]``."""
    assert rows % x.shape[0] == 0, (x.shape, rows)
    return x.repeat(rows // x.shape[0], *[1] * (x.dim() - 1))


def random_cifar(n: int = BATCH) -> CifarData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return CifarData(images, LABELS[:n].clone(), {"train": (images, LABELS[:n].clone())})


@pytest.mark.parametrize("loss", ["threshold", "pairwise"])
def test_cifar_negatives_carry_a_wrong_label_from_the_one_pass_softmax(monkeypatch, loss):
    config = CifarFFConfig(depth=2, receptive_field=3, train_iterations=2, score_from=1, score_to=2,
                           batch_size=BATCH, loss=loss)
    recipe = CifarFF(config, data=random_cifar())
    favour(recipe.model.head.weight)
    spy = spy_on(monkeypatch, recipe.model.net, "ff_backward")
    _, errors, n = recipe.train_step(torch.arange(BATCH), torch.Generator().manual_seed(0))
    (images, codes, n_pos, iterations, first), _ = spy.calls[0]
    assert (n_pos, iterations, first, n) == (BATCH, 2, 1, BATCH)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    standardized = (recipe.data.train_images.float() / 255 - mean) / std
    # each image once, tiled over its positive and its negative row (cifar_ff_net's module docstring)
    torch.testing.assert_close(untile(images, 2 * BATCH), torch.cat([standardized, standardized]), rtol=1e-5, atol=1e-5)
    assert torch.equal(codes[:BATCH], torch.nn.functional.one_hot(LABELS, 10).float())
    wrong = codes[BATCH:].argmax(1)
    assert torch.equal(codes[BATCH:], torch.nn.functional.one_hot(wrong, 10).float())
    check_wrong_labels(wrong, LABELS)
    assert int(errors) == int((LABELS != FAVOURITE).sum())


def test_unsupervised_negatives_are_hybrids_of_two_images_of_the_batch(monkeypatch):
    recipe = UnsupervisedMNIST(UnsupervisedMNISTConfig(width=8, depth=2, input_norm=False, batch_size=BATCH),
                               fake_mnist())
    spy = spy_on(monkeypatch, recipe, "_ff_update")
    recipe.train_step(torch.arange(BATCH), torch.Generator().manual_seed(0))
    (x_pos, x_neg), _ = spy.calls[0]
    images = recipe.train_images
    assert torch.equal(x_pos, images)
    partners = []
    for i in range(BATCH):
        own = x_neg[i] == images[i]
        # the other pixels all come from a single other image of the batch
        others = [j for j in range(BATCH) if j != i and bool(((x_neg[i] == images[j]) | own).all())]
        assert len(others) == 1, f"row {i}: its other pixels are not from exactly one other image"
        from_other = int((~own).sum())
        assert 0 < from_other < 784, f"row {i}: {784 - from_other} of 784 pixels are its own"
        partners.append(others[0])
    assert sorted(partners) == list(range(BATCH))  # every image is used once as the other image


def test_aesop_teacher_forcing_negatives_replace_the_last_character(monkeypatch):
    g = torch.Generator().manual_seed(0)
    strings = (torch.randint(0, 30, (4, 16), generator=g), torch.randint(0, 30, (2, 16), generator=g))
    config = AesopConfig(regime="teacher", width=16, depth=2, window=3, context=4, string_length=16, num_strings=4,
                         test_strings=2, batch_size=48)
    recipe = AesopFF(config, strings)
    with torch.no_grad():  # the softmax predicts character FAVOURITE whatever the window
        recipe.model.head.bias[FAVOURITE] = 50.0
    spy = spy_on(monkeypatch, recipe, "_ff_update")
    batch = recipe.epoch_batches(torch.Generator().manual_seed(0))[0]
    recipe.train_step(batch, torch.Generator().manual_seed(1))
    (x_pos, x_neg), _ = spy.calls[0]
    positives = x_pos.view(-1, 3, 30).argmax(-1)
    negatives = x_neg.view(-1, 3, 30).argmax(-1)
    assert torch.equal(positives, recipe.positives[batch.rows])
    assert torch.equal(x_neg, torch.nn.functional.one_hot(negatives, 30).float().flatten(1) * math.sqrt(30))
    assert torch.equal(negatives[:, :2], positives[:, :2])  # the context characters are kept
    last, true_last = negatives[:, 2], positives[:, 2]
    assert not bool((last == true_last).any())
    assert bool((last[true_last != FAVOURITE] == FAVOURITE).all())
