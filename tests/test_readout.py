"""ff-readout: the softmax refit on the frozen features of a finished hybrid-negative run."""

import json

import pytest
import torch

from ff_kernels.paper.readout import READOUT, ReadoutSettings, choose_softmax, error_rate, fit_softmax, main
from ff_kernels.paper.recipes import LocalMNIST, LocalMNISTConfig, UnsupervisedMNIST, UnsupervisedMNISTConfig
from ff_kernels.paper.train import METRICS, train

from _paths import require_mnist

TINY = {"batch_size": 50, "train_subset": 300, "eval_subset": 100, "epochs": 1}


def blobs(n: int, generator: torch.Generator, dim: int = 20, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of ``classes`` Gaussian blobs (unit noise) around fixed centres 6 apart in ``dim`` dims."""
    centres = 6.0 * torch.eye(classes, dim)
    labels = torch.randint(classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def test_fit_softmax_separates_blobs_it_has_not_seen():
    generator = torch.Generator().manual_seed(0)
    x, y = blobs(600, generator)
    fresh_x, fresh_y = blobs(2000, generator)
    fit = fit_softmax(x, y, 4, ReadoutSettings(epochs=5, lr=1e-2, batch_size=50, holdout=200), 0.0)
    # Centres 6 apart with unit noise: the Bayes error is about 0.1%; chance is 75%.
    assert error_rate(fit.head, fresh_x, fresh_y) < 0.02


def test_fit_softmax_keeps_the_epoch_with_the_lowest_holdout_error():
    generator = torch.Generator().manual_seed(1)
    x, y = blobs(400, generator, classes=10)
    x = x + 3.0 * torch.randn(x.shape, generator=generator)  # overlapping classes: the held-out error wanders
    settings = ReadoutSettings(epochs=8, lr=0.05, batch_size=20, holdout=150)
    fit = fit_softmax(x, y, 10, settings, 0.0)
    assert len(fit.holdout_errors) == settings.epochs
    assert fit.best_epoch < settings.epochs  # on this data an early epoch wins, so the kept head is not the last
    assert fit.best_epoch == 1 + fit.holdout_errors.index(min(fit.holdout_errors))
    assert error_rate(fit.head, x[-150:], y[-150:]) == fit.holdout_errors[fit.best_epoch - 1]


def test_fit_softmax_is_reproducible_from_its_seed():
    generator = torch.Generator().manual_seed(2)
    x, y = blobs(300, generator)
    a, b, c = (fit_softmax(x, y, 4, ReadoutSettings(epochs=2, holdout=50, seed=s), 0.0) for s in (0, 0, 1))
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_fit_softmax_refuses_bad_shapes_and_holdouts():
    x, y = torch.randn(10, 3), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(N, F\) and labels \(N,\), got \(10, 3\) and \(9,\)"):
        fit_softmax(x, y[:9], 2, ReadoutSettings(holdout=2), 0.0)
    with pytest.raises(ValueError, match="float features and int64 labels on one device, got torch.float32 on cpu and "
                                         "torch.int32 on cpu"):
        fit_softmax(x, y.int(), 2, ReadoutSettings(holdout=2), 0.0)
    with pytest.raises(ValueError, match=r"holdout \(10\) must leave training rows: there are 10"):
        fit_softmax(x, y, 2, ReadoutSettings(holdout=10), 0.0)
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        ReadoutSettings(epochs=0)
    with pytest.raises(ValueError, match="lr must be a number > 0, got 0.0"):
        ReadoutSettings(lr=0.0)
    with pytest.raises(ValueError, match=r"weight_decays must be one or more values, each a number >= 0, got \(0.0, -1.0\)"):
        ReadoutSettings(weight_decays=(0.0, -1.0))


def test_choose_softmax_keeps_the_weight_decay_with_the_lowest_holdout_error():
    generator = torch.Generator().manual_seed(3)
    x, y = blobs(300, generator, classes=10)
    x = x + 3.0 * torch.randn(x.shape, generator=generator)
    settings = ReadoutSettings(epochs=3, lr=0.05, batch_size=20, holdout=100, weight_decays=(0.0, 0.3, 1e-3))
    best, fits = choose_softmax(x, y, 10, settings)
    assert [f.weight_decay for f in fits] == [0.0, 0.3, 1e-3]
    assert best.holdout_error == min(f.holdout_error for f in fits)
    assert best is next(f for f in fits if f.holdout_error == best.holdout_error)  # the first on a tie
    assert len({f.holdout_error for f in fits}) > 1  # the weight decays made a difference here


@pytest.mark.parametrize("recipe_cls, config_cls, size", [
    (UnsupervisedMNIST, UnsupervisedMNISTConfig, {"width": 32, "depth": 2}),
    (LocalMNIST, LocalMNISTConfig, {"channels": (8, 8, 8)}),
])
def test_readout_of_a_finished_run(tmp_path, capsys, recipe_cls, config_cls, size):
    mnist = str(require_mnist())
    recipe = recipe_cls(config_cls(**TINY, **size, data_dir=mnist))
    train(recipe, tmp_path, progress=False)
    capsys.readouterr()
    assert main([recipe_cls.name, str(tmp_path), "--holdout", "100", "--epochs", "3"]) == 0
    assert capsys.readouterr().out.startswith("readout: recipe " + recipe_cls.name)
    record = json.loads((tmp_path / READOUT).read_text())
    last = json.loads((tmp_path / METRICS).read_text().splitlines()[-1])
    # The reloaded net and its running head reproduce the run's own evaluation exactly.
    assert record["running_head_test_error"] == last["test_error"]
    assert record["checkpoint_epoch"] == 1 and 1 <= record["best_epoch"] <= 3
    assert set(record["holdout_errors"]) == {"0.0", "0.0001", "0.001"}
    assert all(len(errors) == 3 for errors in record["holdout_errors"].values())
    assert record["holdout_error"] == min(min(errors) for errors in record["holdout_errors"].values())
    assert 0.0 <= record["test_error"] <= 1.0
    assert record["settings"]["holdout"] == 100


def test_readout_errors_name_what_was_expected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["supervised", str(tmp_path)])
    assert "argument recipe: invalid choice: 'supervised'" in capsys.readouterr().err
    assert main(["unsupervised", str(tmp_path / "nowhere")]) == 1
    assert "no config.json in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["unsupervised", str(tmp_path), "--holdout", "0"])
    assert "holdout must be an int >= 1, got 0" in capsys.readouterr().err
