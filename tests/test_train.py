"""The training loop: exact resume, atomic and verified checkpoints, the ff-train command."""

import json
import subprocess
import sys

import pytest
import torch

from ff_kernels.paper.cli import main
from ff_kernels.paper.data import mnist_splits
from ff_kernels.paper.recipes import RECIPES, SupervisedMNIST, SupervisedMNISTConfig
from ff_kernels.paper.train import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_trained,
    train,
)

from _paths import REPO_ROOT, require_mnist

TINY = {"width": 32, "depth": 2, "batch_size": 50, "train_subset": 300, "eval_subset": 100, "lr": 1e-2}


@pytest.fixture(scope="module")
def mnist_dir():
    return require_mnist()


@pytest.fixture(scope="module")
def data(mnist_dir):
    return mnist_splits(mnist_dir, validation=False)


def tiny_recipe(data, **overrides):
    return SupervisedMNIST(SupervisedMNISTConfig(**{**TINY, **overrides}), data)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def without_times(history):
    return [{k: v for k, v in m.items() if not k.endswith("_s")} for m in history]


@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(data, tmp_path, negatives):
    straight = tiny_recipe(data, epochs=2, negatives=negatives)
    train(straight, tmp_path / "straight", progress=False)

    interrupted = tiny_recipe(data, epochs=1, negatives=negatives)
    train(interrupted, tmp_path / "resumed", progress=False)
    resumed = tiny_recipe(data, epochs=2, negatives=negatives)  # a fresh process would rebuild it
    train(resumed, tmp_path / "resumed", resume=True, progress=False)

    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    straight_lines, resumed_lines = (read_metrics(tmp_path / d) for d in ("straight", "resumed"))
    assert len(straight_lines) == 2 and without_times(straight_lines) == without_times(resumed_lines)


def test_checkpoint_holds_everything_and_loads_weights_only(data, tmp_path):
    train(tiny_recipe(data, epochs=1), tmp_path, progress=False)
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["epoch"] == 1 and state["config"]["width"] == 32
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python", "generator"}
    assert state["optimizer"]["state"]  # Adam moments are saved
    torch.load(tmp_path / CHECKPOINT, weights_only=True)  # plain tensors and Python values only
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert summary["epoch"] == 1 and 0 <= summary["test_error"] <= 1 and summary["wall_s"] > 0


def test_load_trained_rebuilds_the_run_with_overrides(data, mnist_dir, tmp_path):
    trained = tiny_recipe(data, epochs=1)
    train(trained, tmp_path, progress=False)
    loaded, epochs = load_trained(SupervisedMNIST, tmp_path, data_dir=str(mnist_dir), eval_subset=50, lr=None)
    assert epochs == 1 and loaded.config.eval_subset == 50 and loaded.config.lr == TINY["lr"]
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key


def test_load_trained_refuses_a_run_of_another_recipe(data, tmp_path):
    train(tiny_recipe(data, epochs=1), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"not the config of an ff-train cifar run: missing \[\], "
                                              r"unexpected \[.*'width'.*\]"):
        load_trained(RECIPES["cifar"], tmp_path)
    with pytest.raises(CheckpointError, match="no config.json in"):
        load_trained(SupervisedMNIST, tmp_path / "absent")


def forget_field(run_dir, name):
    """Make ``run_dir`` look like a run saved before config field ``name`` existed."""
    config = json.loads((run_dir / "config.json").read_text())
    del config[name]
    (run_dir / "config.json").write_text(json.dumps(config))
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    del state["config"][name]
    torch.save(state, run_dir / CHECKPOINT)


def test_a_run_saved_before_a_field_existed_loads_and_resumes_with_its_default(data, mnist_dir, tmp_path):
    train(tiny_recipe(data, epochs=1), tmp_path, progress=False)
    forget_field(tmp_path, "lr_schedule")  # a field with a default
    loaded, _ = load_trained(SupervisedMNIST, tmp_path, data_dir=str(mnist_dir))
    assert loaded.config.lr_schedule == SupervisedMNISTConfig.lr_schedule
    train(tiny_recipe(data, epochs=2), tmp_path, resume=True, progress=False)
    forget_field(tmp_path, "lr_schedule")
    with pytest.raises(CheckpointError, match="lr_schedule: saved 'half_linear', given 'constant'"):
        train(tiny_recipe(data, epochs=3, lr_schedule="constant"), tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_gives_a_clear_error(data, tmp_path, damage):
    train(tiny_recipe(data, epochs=1), tmp_path, progress=False)
    path = tmp_path / CHECKPOINT
    raw = path.read_bytes()
    damaged = {"truncated": raw[: len(raw) // 2], "garbage": b"\x80\x02not a checkpoint" * 50, "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(tiny_recipe(data, epochs=2), tmp_path, resume=True, progress=False)


def test_checkpoint_that_is_not_ours_or_absent(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ff_kernels checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail_halfway(f):
        f.write(b"new, but only half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_resume_refuses_a_changed_config_and_fresh_runs_refuse_a_used_dir(data, tmp_path):
    train(tiny_recipe(data, epochs=1), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="width: saved 32, given 16"):
        train(tiny_recipe(data, epochs=2, width=16), tmp_path, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(tiny_recipe(data, epochs=2), tmp_path, progress=False)


def test_evaluating_every_nth_epoch_changes_only_the_metrics(data, tmp_path):
    every_epoch = tiny_recipe(data, epochs=3)
    train(every_epoch, tmp_path / "every", progress=False)
    sparse = tiny_recipe(data, epochs=3, eval_every=2)
    train(sparse, tmp_path / "sparse", progress=False)

    for key, value in every_epoch.model.state_dict().items():
        assert torch.equal(value, sparse.model.state_dict()[key]), key
    every_lines, sparse_lines = (without_times(read_metrics(tmp_path / d)) for d in ("every", "sparse"))
    assert ["test_error" in m for m in sparse_lines] == [False, True, True]
    assert sparse_lines[1:] == every_lines[1:]
    assert sparse_lines[0] == {k: v for k, v in every_lines[0].items() if not k.startswith("test_")}


def test_resume_may_change_how_often_it_evaluates(data, tmp_path):
    train(tiny_recipe(data, epochs=1), tmp_path, progress=False)
    train(tiny_recipe(data, epochs=2, eval_every=5), tmp_path, resume=True, progress=False)
    assert [m["epoch"] for m in read_metrics(tmp_path) if "test_error" in m] == [1, 2]  # the last epoch is evaluated


def test_cli_trains_and_resumes(mnist_dir, tmp_path, capsys):
    args = ["supervised", "--width", "32", "--depth", "2", "--train-subset", "200", "--eval-subset", "100",
            "--batch-size", "50", "--data-dir", str(mnist_dir), "--run-dir", str(tmp_path), "--no-progress"]
    assert main(args + ["--epochs", "1"]) == 0
    assert "done after 1 epochs" in capsys.readouterr().out
    assert main(args + ["--epochs", "2", "--resume"]) == 0
    assert "test_error" in capsys.readouterr().out
    lines = read_metrics(tmp_path)
    assert [m["epoch"] for m in lines] == [1, 2] and {"train_loss", "train_error_softmax", "test_error"} <= lines[1].keys()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["epochs"] == 2 and config["width"] == 32 and config["train_subset"] == 200


def test_cli_errors(mnist_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["supervised", "--resume"])  # needs --run-dir
    assert "--resume needs --run-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["supervised", "--optimizer", "rmsprop"])
    with pytest.raises(SystemExit):
        main(["supervised", "--width", "0", "--run-dir", str(tmp_path)])
    assert "width must be an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["unsupervised", "--eval-every", "0", "--run-dir", str(tmp_path)])
    assert "eval_every must be an int >= 1, got 0" in capsys.readouterr().err
    assert main(["supervised", "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")]) == 1
    assert "not found in" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    env = {"PYTHONPATH": str(REPO_ROOT / "python"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "ff_kernels", "supervised", "--help"], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and "--train-subset" in result.stdout and "ff-train supervised" in result.stdout
