"""ff_kernels.paper.table1: the paper's Table 1 read from CIFAR-10 run directories."""

import dataclasses
import json
from pathlib import Path

import pytest
from test_cifar_recipes import SMALL_FF, class_coded_data

from ff_kernels.paper import table1
from ff_kernels.paper.recipes.cifar_backprop import CifarBackprop, CifarBackpropConfig
from ff_kernels.paper.recipes.cifar_ff import CifarFF, CifarFFConfig
from ff_kernels.paper.recipes.supervised_mnist import SupervisedMNISTConfig
from ff_kernels.paper.train import CONFIG, METRICS, train


def fake_run(path, config, metrics):
    """A run directory with ``config`` (a dataclass) and the metric lines ``metrics``."""
    path.mkdir()
    (path / CONFIG).write_text(json.dumps(dataclasses.asdict(config)))
    (path / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return path


def ff_metrics(epoch, train, test, exact):
    """Evaluated FF metrics: goodness errors as given, softmax errors 0.01 higher."""
    m = {"epoch": epoch, "train_error": train, "test_error": test, "test_exact_error": exact}
    return m | {f"{k}_softmax": v + 0.01 for k, v in list(m.items()) if k != "epoch"}


def row(text, learning, testing):
    """Our cells of the procedure (learning, testing): [depth 2 train, depth 2 test, depth 3 train,
    depth 3 test], read from its two rows (one per depth, the paper's numbers before ours)."""
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [learning, testing]:
            found[cells[2]] = cells[5:7]
    if set(found) != {"2", "3"}:
        raise AssertionError(f"rows of {learning!r} / {testing!r} at depths 2 and 3 not in\n{text}")
    return found["2"] + found["3"]


def with_known_errors(run_dir, values):
    """Replace the error rates of the run's last metrics line by ``values`` (by key); every error the
    run logged must get one, so the keys checked are the ones the recipe really writes."""
    lines = (run_dir / METRICS).read_text().splitlines()
    last = json.loads(lines[-1])
    assert {k for k in last if "error" in k} == set(values), last
    lines[-1] = json.dumps(last | values)
    (run_dir / METRICS).write_text("\n".join(lines) + "\n")


def test_real_runs_fill_their_cells_from_the_last_evaluation(tmp_path):
    """Run directories written by real one-epoch runs, their error rates then set to known values,
    so each cell's expected text is written out here rather than computed like the table does."""
    data = class_coded_data(10)
    ff = CifarFF(CifarFFConfig(depth=2, goodness="neg_ssq", epochs=1, **SMALL_FF), data=data)
    train(ff, tmp_path / "ff", progress=False)
    bp = CifarBackprop(CifarBackpropConfig(depth=3, epochs=1, receptive_field=3), data=data)
    train(bp, tmp_path / "bp", progress=False)
    with_known_errors(tmp_path / "ff", {"train_error": 0.123, "test_error": 0.4567, "train_error_softmax": 0.25,
                                        "test_error_softmax": 0.0049, "running_error_softmax": 0.9})
    with_known_errors(tmp_path / "bp", {"train_error": 0.0, "test_error": 0.365, "running_error": 0.5})

    text = table1.table1([table1.load_run(tmp_path / "ff"), table1.load_run(tmp_path / "bp")])

    # The synthetic data has no exact test set, so a test cell holds one number.
    assert row(text, "FF min ssq", "compute goodness for every label") == ["12.3", "45.7", "—", "—"]
    assert row(text, "FF min ssq", "one-pass softmax") == ["25.0", "0.5", "—", "—"]
    assert row(text, "BP", "softmax") == ["—", "—", "0.0", "36.5"]
    assert row(text, "FF max ssq", "compute goodness for every label") == ["—"] * 4
    assert "(epoch" not in text  # both runs are finished


def test_exact_test_set_and_unfinished_runs(tmp_path):
    ssq = fake_run(tmp_path / "ssq3", CifarFFConfig(depth=3, goodness="ssq", epochs=10),
                   [ff_metrics(5, 0.3, 0.5, 0.45), {"epoch": 6, "train_loss": 1.0}])
    text = table1.table1([table1.load_run(ssq)])
    assert row(text, "FF max ssq", "compute goodness for every label") == ["—", "—", "30.0", "50.0 / 45.0"]
    assert row(text, "FF max ssq", "one-pass softmax") == ["—", "—", "31.0", "51.0 / 46.0"]
    assert f"`{ssq}`: cifar, depth 3, goodness ssq, 10 epochs, FF losses at iterations 1-6 (epoch 5 of 10)" in text


def test_runs_not_yet_evaluated_show_running(tmp_path):
    fresh = fake_run(tmp_path / "fresh", CifarFFConfig(depth=2, goodness="neg_ssq", epochs=6, train_iterations=3,
                                                       train_from=2),
                     [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5}])
    started = fake_run(tmp_path / "started", CifarBackpropConfig(depth=3, epochs=20), [])
    text = table1.table1([table1.load_run(fresh), table1.load_run(started)])
    assert row(text, "FF min ssq", "compute goodness for every label") == ["running", "running", "—", "—"]
    assert row(text, "FF min ssq", "one-pass softmax") == ["running", "running", "—", "—"]
    assert row(text, "BP", "softmax") == ["—", "—", "running", "running"]
    assert (f"`{fresh}`: cifar, depth 2, goodness neg_ssq, 6 epochs, FF losses at iterations 2-3 "
            f"(running: epoch 2 of 6, not evaluated yet)") in text
    assert f"`{started}`: cifar-backprop, depth 3, 20 epochs (running: epoch 0 of 20, not evaluated yet)" in text


def test_two_runs_for_one_cell_are_refused_naming_both(tmp_path):
    a = fake_run(tmp_path / "a", CifarBackpropConfig(depth=2), [{"epoch": 1, "train_error": 0.1, "test_error": 0.4}])
    b = fake_run(tmp_path / "b", CifarBackpropConfig(depth=2, lr=1e-2),
                 [{"epoch": 1, "train_error": 0.1, "test_error": 0.4}])
    with pytest.raises(ValueError, match=r"same cell.*cifar-backprop.*depth 2.*/a and .*/b"):
        table1.table1([table1.load_run(a), table1.load_run(b)])


def test_other_recipes_and_validation_runs_are_refused(tmp_path):
    mnist = fake_run(tmp_path / "mnist", SupervisedMNISTConfig(), [{"epoch": 1, "test_error": 0.1}])
    with pytest.raises(ValueError, match="not the config of an ff-train cifar or cifar-backprop run"):
        table1.load_run(mnist)
    validation = fake_run(tmp_path / "val", CifarFFConfig(validation=True),
                          [{"epoch": 1, "train_error": 0.5, "validation_error": 0.6}])
    with pytest.raises(ValueError, match=r"config.json is a --validation run: it has no test error"):
        table1.load_run(validation)


def test_main_prints_the_table_or_the_error(tmp_path, capsys):
    run = fake_run(tmp_path / "bp", CifarBackpropConfig(depth=2), [{"epoch": 20, "train_error": 0.12,
                                                                     "test_error": 0.38, "test_exact_error": 0.37}])
    assert table1.main([str(run)]) == 0
    assert row(capsys.readouterr().out, "BP", "softmax") == ["12.0", "38.0 / 37.0", "—", "—"]
    assert table1.main([str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_the_run_list_names_a_loss_other_than_the_papers(tmp_path):
    pair = fake_run(tmp_path / "pair", CifarFFConfig(depth=2, goodness="neg_ssq", epochs=8, train_from=3,
                                                     loss="pairwise"), [ff_metrics(8, 0.3, 0.4, 0.41)])
    paper = fake_run(tmp_path / "paper", CifarFFConfig(depth=3, goodness="neg_ssq", epochs=8),
                     [ff_metrics(8, 0.3, 0.4, 0.41)])
    text = table1.table1([table1.load_run(pair), table1.load_run(paper)])
    assert f"`{pair}`: cifar, depth 2, goodness neg_ssq, 8 epochs, FF losses at iterations 3-6, pairwise loss" in text
    assert f"`{paper}`: cifar, depth 3, goodness neg_ssq, 8 epochs, FF losses at iterations 1-6\n" in text + "\n"


def test_a_run_saved_before_train_from_and_loss_existed_trained_from_iteration_1(tmp_path):
    old = fake_run(tmp_path / "old", CifarFFConfig(depth=2, goodness="ssq", epochs=4), [ff_metrics(4, 0.2, 0.4, 0.41)])
    config = json.loads((old / CONFIG).read_text())
    del config["train_from"], config["loss"]
    (old / CONFIG).write_text(json.dumps(config))
    assert table1.load_run(old).trained_iterations == (1, 6)
    assert table1.load_run(old).ff_loss == "threshold"
    assert row(table1.table1([table1.load_run(old)]), "FF max ssq", "compute goodness for every label")[:2] == [
        "20.0", "40.0 / 41.0"]


def test_the_papers_numbers_stand_beside_ours_as_the_paper_prints_them():
    """Every row's paper cells equal Table 1 in the paper's text (../shared/paper), read here
    line by line: procedure, testing procedure, hidden layers, train %, test %."""
    paper = Path(__file__).resolve().parents[2] / "shared" / "paper" / "forward-forward-hinton-2022.txt"
    if not paper.exists():
        pytest.skip(f"the paper's text is not at {paper}")
    printed = {}
    for line in paper.read_text().splitlines():
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) == 5 and fields[0] in ("BP", "FF min ssq", "FF max ssq") and fields[2] in ("2", "3"):
            printed[(fields[0], fields[1] or "softmax", int(fields[2]))] = (int(fields[3]), int(fields[4]))
    assert printed == table1.PAPER
    text = table1.table1([])
    for (learning, testing, depth), (train_pct, test_pct) in printed.items():
        assert f"| {learning} | {testing} | {depth} | {train_pct} | {test_pct} | — | — |" in text
