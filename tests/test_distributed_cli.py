"""``ff-train supervised --nproc 2`` in both parallel modes against the single-process run.

Each run is a small supervised recipe (2 x 64 units, 1,000 training images, 2 epochs) started
through the command's ``main``; the two processes use gloo on the CPU.

- Data parallel follows the single-process run up to float32 summation order (the shards'
  weight gradients are summed by the all_reduce instead of inside one GEMM; see
  ``ff_kernels.distributed.data_parallel``). 40 SGD steps with momentum let those ~1e-7
  relative differences grow; we allow 1e-4 of each tensor's largest entry (measured: about
  1e-6). A wrong shard, a wrong average or negatives drawn differently on two ranks changes
  the weights by O(1) of that scale.
- The pipeline with ``--sync-every 1`` refreshes rank 0's copy of the net after every batch,
  which is the single-process schedule; its only difference is that the peer-normalization
  and SGD arithmetic run in other processes, so the same bound applies.
- A parallel run resumed after its first epoch ends where the uninterrupted one does.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from ff_kernels.paper.cli import main
from ff_kernels.paper.recipes import BackpropMNIST
from ff_kernels.paper.train import CHECKPOINT, CONFIG, METRICS, SUMMARY, load_checkpoint

from _paths import require_mnist
from reference_tools import max_err, scale_of

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
REL = 1e-4
SMALL = ["supervised", "--width", "64", "--depth", "2", "--train-subset", "1000", "--eval-subset", "500",
         "--batch-size", "50", "--no-progress"]


def run(run_dir, *extra: str, epochs: int = 2) -> dict:
    """Train SMALL (+ ``extra``) into ``run_dir``; returns the checkpoint."""
    args = SMALL + ["--epochs", str(epochs), "--data-dir", str(require_mnist()), "--run-dir", str(run_dir), *extra]
    assert main(args) == 0
    return load_checkpoint(run_dir / CHECKPOINT)


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        bound = REL * max(scale_of(value), 1e-12)
        assert max_err(got[key], value) <= bound, f"{key}: error {max_err(got[key], value):.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("single") / "run")


def assert_same_metrics(run_dir, single: dict) -> None:
    """Rank 0 alone wrote ``run_dir`` (no stray temporary files), one metrics line per epoch, and
    the epoch-2 error rates (all ranks' counts summed) are the single-process run's, up to 2 of
    the 500 test images flipping under the rounding differences."""
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([CHECKPOINT, CONFIG, METRICS, SUMMARY])
    lines = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for key in ("train_error_softmax", "test_error", "test_error_softmax"):
        assert abs(lines[-1][key] - single["history"][-1][key]) <= 0.004, key


def test_data_parallel_equals_the_single_process_run(single, tmp_path):
    got = run(tmp_path / "run", "--nproc", "2", "--parallel", "data")
    assert_close(got["model"], single["model"])
    assert_same_metrics(tmp_path / "run", single)


def test_pipeline_with_a_refresh_every_batch_equals_the_single_process_run(single, tmp_path):
    got = run(tmp_path / "run", "--nproc", "2", "--parallel", "pipeline", "--sync-every", "1")
    assert_close(got["model"], single["model"])
    assert_same_metrics(tmp_path / "run", single)


def test_a_resumed_data_parallel_run_ends_where_the_uninterrupted_one_does(single, tmp_path):
    run(tmp_path / "run", "--nproc", "2", epochs=1)
    got = run(tmp_path / "run", "--nproc", "2", "--resume", epochs=2)
    assert_close(got["model"], single["model"])
    assert [m["epoch"] for m in got["history"]] == [1, 2]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--parallel", "data"], "needs --nproc N"),
        (["--nproc", "0"], "nproc must be an int >= 1, got 0"),
        (["--nproc", "2", "--sync-every", "0"], "sync_every must be an int >= 1, got 0"),
    ],
)
def test_bad_parallel_options_are_refused(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        main(SMALL + ["--run-dir", str(tmp_path / "run"), *extra])
    assert message in capsys.readouterr().err


def test_a_recipe_without_parallel_support_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(BackpropMNIST, "enable_parallel")  # the MNIST recipes all support it
    with pytest.raises(SystemExit):
        main(["backprop", "--nproc", "2", "--run-dir", str(tmp_path / "run")])
    assert "does not support --parallel" in capsys.readouterr().err


@pytest.mark.slow
def test_an_uneven_batch_is_refused_with_the_sizes(tmp_path, capsys):
    assert main(SMALL[:-1] + ["--batch-size", "25", "--epochs", "1", "--no-progress", "--data-dir", str(require_mnist()),
                              "--run-dir", str(tmp_path / "run"), "--nproc", "2"]) == 1
    assert "batch size (25) must be a multiple of the number of processes (2)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_checkpoint_of_a_parallel_run_loads_into_a_single_process_run(single, tmp_path):
    run(tmp_path / "run", "--nproc", "2", "--parallel", "pipeline", epochs=1)
    got = run(tmp_path / "run", "--resume", epochs=2)  # one process continues the pipeline's run
    assert [m["epoch"] for m in got["history"]] == [1, 2]
    assert torch.isfinite(torch.stack([v.float().abs().max() for v in got["model"].values()])).all()


@pytest.mark.slow
def test_a_last_batch_of_fewer_rows_than_processes_is_skipped(tmp_path):
    got = run(tmp_path / "run", "--nproc", "2", "--train-subset", "1001", epochs=1)  # 20 batches of 50, then 1 row
    assert [m["epoch"] for m in got["history"]] == [1]
