"""ff_kernels.paper.cifar_iterations: the goodness test by layer and iteration range of a trained run."""

import pytest
import torch
from test_cifar_recipes import SMALL_FF, class_coded_data

from ff_kernels import functional
from ff_kernels.paper import cifar_iterations
from ff_kernels.paper.recipes import cifar_ff
from ff_kernels.paper.recipes.cifar_common import standardize
from ff_kernels.paper.recipes.cifar_ff import CifarFF, CifarFFConfig
from ff_kernels.paper.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-epoch min-ssq run of depth 2 on the class-coded images, and its data."""
    data = class_coded_data(40)
    run_dir = tmp_path_factory.mktemp("run")
    train(CifarFF(CifarFFConfig(depth=2, goodness="neg_ssq", epochs=2, **SMALL_FF), data=data), run_dir, progress=False)
    return run_dir, data


def loaded(run_dir, data, monkeypatch):
    monkeypatch.setattr(cifar_ff, "load_data", lambda config, device: data)
    return cifar_iterations.load_recipe(run_dir, eval_subset=20)


def goodness_of_run(recipe, images, iterations):
    """Every layer's goodness (t, image, label, layer) float64 from net.run with each label clamped."""
    net, x = recipe.model.net, standardize(images)
    good = torch.zeros(iterations, len(images), 10, len(net.layers), dtype=torch.float64)
    for label in range(10):
        code = recipe.model.code(torch.full((len(images),), label))
        for t, states in enumerate(net.run(x, code, iterations)[1:]):
            for k, state in enumerate(states):
                good[t, :, label, k] = functional.goodness(state.flatten(1), net.goodness_kind).double()
    return good


def test_the_recipes_range_over_all_layers_is_its_test_procedure(trained_run, monkeypatch):
    run_dir, data = trained_run
    recipe = loaded(run_dir, data, monkeypatch)
    images, labels = data.eval_sets["test"]
    c = recipe.config
    table, softmax = cifar_iterations.iteration_errors(recipe, images, labels, 4, [(c.score_from, c.score_to), (1, 1)])
    metrics = recipe.evaluate()
    assert table[(c.score_from, c.score_to)][-1] == metrics["test_error"]
    assert softmax == metrics["test_error_softmax"]
    assert len(table[(1, 1)]) == 3  # layer 1, layer 2, all layers


def test_one_layer_at_one_iteration_matches_the_states_of_run(trained_run, monkeypatch):
    run_dir, data = trained_run
    recipe = loaded(run_dir, data, monkeypatch)
    images, labels = data.eval_sets["test"]
    table, _ = cifar_iterations.iteration_errors(recipe, images, labels, 3, [(2, 2), (1, 3)])
    good = -goodness_of_run(recipe, images, 3)  # min ssq: low goodness means positive

    def error(scores):
        return float((scores.argmax(1) != labels).float().mean())

    assert table[(2, 2)] == pytest.approx([error(good[1, ..., 0]), error(good[1, ..., 1]), error(good[1].sum(2))])
    assert table[(1, 3)][-1] == pytest.approx(error(good.sum((0, 3))))


def test_main_prints_the_table_and_names_bad_input(trained_run, monkeypatch, capsys):
    run_dir, data = trained_run
    monkeypatch.setattr(cifar_ff, "load_data", lambda config, device: data)
    assert cifar_iterations.main([str(run_dir), "--images", "20", "--iterations", "4", "--ranges", "1-2,2-3"]) == 0
    out = capsys.readouterr().out
    assert "| iterations | layer 1 | layer 2 | all layers |" in out and "trained on iterations 1-2" in out
    assert "| 2-3 (the recipe's test) |" in out and "one-pass softmax:" in out
    assert cifar_iterations.main([str(run_dir), "--iterations", "4", "--ranges", "3-5"]) == 1
    assert "1 <= FIRST <= LAST <= 4" in capsys.readouterr().err
    assert cifar_iterations.main([str(run_dir), "--set", "test_exact"]) == 1
    assert "no 'test_exact' set" in capsys.readouterr().err
    assert cifar_iterations.main([str(run_dir.parent / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["4-2", "1-", "a-b", "0-1", "1-11"])
def test_bad_ranges_are_refused(text):
    with pytest.raises(ValueError, match="ranges must be FIRST-LAST"):
        cifar_iterations.parse_ranges(text, 10)


def logits_of_run(trained_run, monkeypatch):
    """The trained run's recipe, test images and labels, and the logit of p(positive) at
    iterations 1-2 computed from its goodness: (t, image, label, layer); min ssq at
    temperature 1, so positive when G < N."""
    run_dir, data = trained_run
    recipe = loaded(run_dir, data, monkeypatch)
    images, labels = data.eval_sets["test"]
    return recipe, images, labels, recipe.model.net.threshold - goodness_of_run(recipe, images, 2)


def test_logit_levels_match_the_goodness_of_run(trained_run, monkeypatch):
    recipe, images, labels, logit = logits_of_run(trained_run, monkeypatch)
    levels = cifar_iterations.logit_levels(recipe, images, labels, 2)
    true = torch.nn.functional.one_hot(labels, 10).bool()
    pos, neg = logit[:, true], logit[:, ~true]  # (t, N, layer), (t, 9N, layer)
    assert levels.shape == (2, 2, 4)
    assert levels[..., 0] == pytest.approx(pos.mean(1), rel=1e-5, abs=1e-3)
    assert levels[..., 1] == pytest.approx(neg.mean(1), rel=1e-5, abs=1e-3)
    assert levels[..., 2] == pytest.approx((pos > 0).double().mean(1))
    assert levels[..., 3] == pytest.approx((neg < 0).double().mean(1))
    with pytest.raises(ValueError, match=r"labels must be int64 \(20,\), one per image, got"):
        cifar_iterations.logit_levels(recipe, images, labels[:19], 2)
    with pytest.raises(ValueError, match=r"labels must be int64 \(20,\), one per image, got"):
        cifar_iterations.iteration_errors(recipe, images, labels.int(), 2, [(1, 2)])


def test_main_prints_the_logit_levels(trained_run, monkeypatch, capsys):
    run_dir, data = trained_run
    monkeypatch.setattr(cifar_ff, "load_data", lambda config, device: data)
    assert cifar_iterations.main([str(run_dir), "--images", "20", "--iterations", "3", "--ranges", "1-3", "--logits"]) == 0
    out = capsys.readouterr().out
    assert "| iteration | layer | mean logit, true label |" in out
    assert out.count("\n| 3 | ") == 4  # iteration 3, layers 1 and 2, in the levels and the spread tables


def test_logit_spread_matches_the_goodness_of_run(trained_run, monkeypatch):
    recipe, images, labels, logit = logits_of_run(trained_run, monkeypatch)
    spread = cifar_iterations.logit_spread(recipe, images, labels, 2)
    assert spread.shape == (2, 2, 4)
    assert spread[..., 0] == pytest.approx(logit.mean(2).std(1), rel=1e-5, abs=1e-3)
    assert spread[..., 1] == pytest.approx(logit.std(2).mean(1), rel=1e-5, abs=1e-3)
    assert spread[..., 2] == pytest.approx((logit.abs() > cifar_iterations.SATURATED).double().mean((1, 2)))
    same = torch.zeros(2, 2, dtype=torch.float64)  # share of (true, wrong) pairs of an image on one side
    for i, y in enumerate(labels.tolist()):
        for wrong in range(10):
            if wrong != y:
                same += ((logit[:, i, y] > 0) == (logit[:, i, wrong] > 0)).double()
    assert spread[..., 3] == pytest.approx(same / (9 * len(labels)))
    with pytest.raises(ValueError, match=r"labels must be int64 \(20,\), one per image, got"):
        cifar_iterations.logit_spread(recipe, images, labels[:19], 2)


def test_main_reads_the_validation_set_and_prints_the_spread(trained_run, monkeypatch, capsys):
    run_dir, data = trained_run
    images, labels = data.eval_sets["test"]
    held_out = type(data)(data.train_images, data.train_labels,
                          {"train": data.eval_sets["train"], "validation": (images, labels)})
    monkeypatch.setattr(cifar_ff, "load_data", lambda config, device: held_out)
    assert cifar_iterations.main([str(run_dir), "--set", "validation", "--images", "20", "--iterations", "3",
                                  "--ranges", "1-3", "--logits"]) == 0
    out = capsys.readouterr().out
    assert "validation, first 20 images" in out
    assert "| iteration | layer | std across images |" in out
    assert out.count("\n| 3 | ") == 4  # iteration 3, layers 1 and 2, in both tables
    monkeypatch.setattr(cifar_ff, "load_data", lambda config, device: data)
    assert cifar_iterations.main([str(run_dir), "--set", "validation"]) == 1
    assert "no 'validation' set" in capsys.readouterr().err
