"""The backprop baseline recipe (section 3.1): the net, the learning-rate schedule, exact resume."""

import pytest
import torch
from torch import nn

from ff_kernels.paper.data import MnistSplits
from ff_kernels.paper.recipes import RECIPES, BackpropMNIST, BackpropMNISTConfig
from ff_kernels.paper.recipes.backprop_mnist import STEP_KEY, mlp
from ff_kernels.paper.train import train


def synthetic_splits(n_train=120, n_eval=40):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_train + n_eval, 784, generator=g)
    labels = torch.randint(0, 10, (n_train + n_eval,), generator=g)
    return MnistSplits(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], "test")


SMALL = {"width": 16, "depth": 2, "batch_size": 25}


def test_the_papers_net_by_default():
    config = BackpropMNISTConfig()
    assert RECIPES["backprop"] is BackpropMNIST and (config.epochs, config.width, config.depth) == (20, 2000, 4)
    net = mlp(config)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 2000)] + [(2000, 2000)] * 3 + [(2000, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in net) == 4 and not any(isinstance(m, nn.Dropout) for m in net)
    assert len([m for m in mlp(BackpropMNISTConfig(dropout=0.2)) if isinstance(m, nn.Dropout)]) == 4


@pytest.mark.parametrize(
    "field, value", [("lr", 0.0), ("lr_decay", 0.0), ("lr_decay", 1.5), ("optimizer", "rmsprop"), ("width", 0),
                     ("dropout", 1.0), ("weight_decay", -1.0)]
)
def test_bad_settings_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        BackpropMNISTConfig(**{field: value})


def test_learning_rate_decays_per_step_by_lr_decay_per_epoch():
    recipe = BackpropMNIST(BackpropMNISTConfig(lr=1e-2, lr_decay=0.5, **SMALL), synthetic_splits())
    assert recipe.steps_per_epoch == 120 // 25 + 1
    assert recipe.learning_rate(0) == 1e-2
    assert recipe.learning_rate(recipe.steps_per_epoch) == pytest.approx(5e-3)
    assert recipe.learning_rate(2 * recipe.steps_per_epoch) == pytest.approx(2.5e-3)
    generator = torch.Generator().manual_seed(0)
    for batch in recipe.epoch_batches(generator):
        recipe.train_step(batch, generator)
    group = recipe.optimizer.param_groups[0]
    assert group[STEP_KEY] == recipe.steps_per_epoch
    assert group["lr"] == pytest.approx(recipe.learning_rate(recipe.steps_per_epoch - 1))


@pytest.mark.parametrize("settings", [{"optimizer": "adam"}, {"optimizer": "sgd", "lr": 0.05, "dropout": 0.3}])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, settings):
    data = synthetic_splits()
    straight = BackpropMNIST(BackpropMNISTConfig(epochs=3, **SMALL, **settings), data)
    train(straight, tmp_path / "straight", progress=False)
    train(BackpropMNIST(BackpropMNISTConfig(epochs=1, **SMALL, **settings), data), tmp_path / "resumed",
          progress=False)
    resumed = BackpropMNIST(BackpropMNISTConfig(epochs=3, **SMALL, **settings), data)
    train(resumed, tmp_path / "resumed", resume=True, progress=False)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.optimizer.param_groups[0][STEP_KEY] == 3 * straight.steps_per_epoch
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_learns_a_separable_problem(tmp_path):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (600,), generator=g)
    images = 0.05 * torch.rand(600, 784, generator=g)
    images[torch.arange(600), 100 + 10 * labels] = 1.0  # the class is one bright pixel
    data = MnistSplits(images[:500], labels[:500], images[500:], labels[500:], "test")
    recipe = BackpropMNIST(BackpropMNISTConfig(epochs=20, width=32, depth=2, batch_size=50, lr_decay=1.0), data)
    assert recipe.evaluate()["test_error"] > 0.5
    summary = train(recipe, tmp_path, progress=False)
    assert summary["test_error"] < 0.05
