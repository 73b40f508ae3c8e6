"""``ff-train unsupervised|local|backprop --nproc 2 --parallel data`` against the single-process run.

Each recipe trains a tiny net for 2 epochs once in one process and once in 2 processes (gloo on
the CPU), both started through the command's ``main``. Data parallel follows the single-process
run up to float32 summation order (see ``ff_kernels.distributed.data_parallel``), so every
tensor of the final checkpoint's model must agree within 1e-4 of its largest entry (measured,
worst tensor: local 3e-7, unsupervised 1e-6, backprop 6e-6). Hybrids drawn per slice, an
unaveraged softmax gradient or per-slice dropout masks move some tensor by 9-60% of its scale
(measured). The metrics (all ranks' train counts summed; the evaluation made by each rank on
the whole set) may differ by the few evaluation images that float rounding can flip.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from ff_kernels.distributed import shard_batch
from ff_kernels.paper.cli import main
from ff_kernels.paper.data import MnistSplits, hybrid_negatives
from ff_kernels.paper.figures import HYBRID_FIGURE, RECEPTIVE_FIELDS_FIGURE
from ff_kernels.paper.recipes import BackpropMNIST, BackpropMNISTConfig, UnsupervisedMNIST, UnsupervisedMNISTConfig
from ff_kernels.paper.recipes.backprop_mnist import STEP_KEY, mlp
from ff_kernels.paper.recipes.backprop_parallel import sharded_forward
from ff_kernels.paper.train import CHECKPOINT, METRICS, load_checkpoint

from _paths import require_mnist
from reference_tools import max_err, scale_of

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
REL = 1e-4
EVAL_IMAGES = 200
SUBSETS = ["--train-subset", "400", "--eval-subset", str(EVAL_IMAGES), "--batch-size", "50", "--epochs", "2"]
UNSUPERVISED = ["unsupervised", "--width", "32", "--depth", "2", *SUBSETS]
# Adam: the FF layers' ff_backward path (the other two runs use the fused SGD step of unsupervised
# and backprop's own optimizer).
LOCAL = ["local", "--channels", "4", "4", "4", "--optimizer", "adam", *SUBSETS]
BACKPROP = ["backprop", "--width", "32", "--depth", "2", "--dropout", "0.2", *SUBSETS]


def run(run_dir, args: list[str], *extra: str) -> dict:
    """Train ``args`` (+ ``extra``) into ``run_dir``; returns the checkpoint."""
    assert main([*args, "--no-progress", "--data-dir", str(require_mnist()), "--run-dir", str(run_dir), *extra]) == 0
    return load_checkpoint(run_dir / CHECKPOINT)


def assert_same_run(tmp_path, args: list[str], *extra: str) -> None:
    """The 2-process data-parallel run of ``args`` ends where the single-process run does."""
    want = run(tmp_path / "single", args)
    got = run(tmp_path / "parallel", args, "--nproc", "2", "--parallel", "data", *extra)
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        error, bound = max_err(got["model"][key], value), REL * scale_of(value)
        assert error <= bound, f"{key}: error {error:.3g} > {bound:.3g}"
    lines = [json.loads(line) for line in (tmp_path / "parallel" / METRICS).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    error_keys = [key for key in want["history"][-1] if "_error" in key]
    assert len(error_keys) >= 2 and set(error_keys) <= lines[-1].keys()
    for key in error_keys:  # up to 2 evaluation images (or their share of the training rows) flipped
        assert abs(lines[-1][key] - want["history"][-1][key]) <= 2 / EVAL_IMAGES, key


@needs_gloo
def test_unsupervised_data_parallel_equals_the_single_process_run(tmp_path):
    assert_same_run(tmp_path, UNSUPERVISED, "--figures")
    assert (tmp_path / "parallel" / RECEPTIVE_FIELDS_FIGURE).is_file()  # rank 0 writes them after training
    assert (tmp_path / "parallel" / HYBRID_FIGURE).is_file()


@needs_gloo
def test_local_data_parallel_equals_the_single_process_run(tmp_path):
    assert_same_run(tmp_path, LOCAL)


@needs_gloo
def test_backprop_data_parallel_equals_the_single_process_run(tmp_path):
    assert_same_run(tmp_path, BACKPROP)


def test_the_sharded_forward_draws_the_whole_batchs_dropout_masks():
    """Each rank's slice of the logits, from its rows only, is that slice of one process's forward
    pass from the same global generator state: the same dropout masks."""
    model = mlp(BackpropMNISTConfig(width=16, depth=2, dropout=0.5)).train()
    images = torch.rand(12, 28 * 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(1)
        whole = model(images)
        for rank in range(3):
            torch.manual_seed(1)
            part = sharded_forward(model, shard_batch(images, rank, 3), rank, 3)
            assert max_err(part, shard_batch(whole, rank, 3)) <= 1e-6 * scale_of(whole)
        assert not torch.equal(model(images), whole)  # the masks do differ between draws


def test_the_pipeline_is_refused_for_a_data_parallel_only_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*UNSUPERVISED, "--nproc", "2", "--parallel", "pipeline", "--run-dir", str(tmp_path / "run")])
    assert "supports --parallel data only" in capsys.readouterr().err


def tiny_data() -> MnistSplits:
    g = torch.Generator().manual_seed(0)
    return MnistSplits(torch.rand(8, 784, generator=g), torch.randint(0, 10, (8,), generator=g),
                       torch.rand(4, 784, generator=g), torch.randint(0, 10, (4,), generator=g), "test")


def test_a_batch_of_fewer_rows_than_processes_is_skipped_in_step_with_one_process():
    """No update and nothing counted (no collective is reached, so a stand-in context will do);
    the generator and the backprop schedule advance as in one process."""
    data = tiny_data()
    backprop = BackpropMNIST(BackpropMNISTConfig(width=8, depth=1, batch_size=2), data)
    backprop.parallel = SimpleNamespace(rank=0, world_size=2)
    before = {k: v.clone() for k, v in backprop.model.state_dict().items()}
    assert backprop.train_step(torch.tensor([5]), torch.Generator()) == (None, 0, 0)
    assert all(torch.equal(v, before[k]) for k, v in backprop.model.state_dict().items())
    assert backprop.optimizer.param_groups[0][STEP_KEY] == 1

    unsupervised = UnsupervisedMNIST(UnsupervisedMNISTConfig(width=8, depth=1, batch_size=3), data)
    unsupervised.parallel = SimpleNamespace(rank=0, world_size=3)
    before = {k: v.clone() for k, v in unsupervised.model.state_dict().items()}
    generator, one_process = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert unsupervised.train_step(torch.tensor([2, 6]), generator) == (None, 0, 0)
    assert all(torch.equal(v, before[k]) for k, v in unsupervised.model.state_dict().items())
    hybrid_negatives(data.train_images[[2, 6]], one_process, unsupervised.config.blur_steps)
    assert torch.equal(generator.get_state(), one_process.get_state())
