"""ff_kernels used as a careless or hostile user would: every case gives one clear line or the right behaviour.

Each test runs one case through ``ff-train`` (``cli.main`` in this process, or a subprocess
where a second process is the point) or through the API, and checks the outcome: the message,
the exit status, and that nothing in the run directory was lost or made invalid. The cases
follow the reliability issue: divergence (1), two writers (2), fresh runs over old files (3),
frozen layers (4), library edges (5), ordinary errors without tracebacks (6), the CIFAR-10
cache (7).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ff_kernels
from ff_kernels.nn import FFLinear, FFLocal2d, FFRecurrent, FFSequential, GoodnessOverflowError
from ff_kernels.paper import guard, run_dir, table1
from ff_kernels.paper import train as train_module
from ff_kernels.paper.cli import main
from ff_kernels.paper.data import cifar10 as C
from ff_kernels.paper.data import mnist_splits
from ff_kernels.paper.guard import TrainingDiverged
from ff_kernels.paper.readout import READOUT, ReadoutSettings, readout_run
from ff_kernels.paper.recipes import RECIPES, mnist_recipe
from ff_kernels.paper.train import CHECKPOINT, CONFIG, METRICS, SUMMARY, CheckpointError, atomic_write, train

from _paths import REPO_ROOT, require_mnist


@pytest.fixture(scope="module")
def mnist_dir():
    return require_mnist()


@pytest.fixture(scope="module")
def data(mnist_dir):
    return mnist_splits(mnist_dir, validation=False)


@pytest.fixture(autouse=True)
def read_mnist_once(monkeypatch, request):
    """The MNIST recipes run by ``main`` get the data read once per module (the loading is
    tested elsewhere; here it would only add a second per run)."""
    if "mnist_dir" not in request.fixturenames:
        return
    data = request.getfixturevalue("data")
    real = mnist_recipe.mnist_splits
    mnist = str(request.getfixturevalue("mnist_dir"))

    def splits(data_dir, validation=False, **kwargs):
        if str(data_dir) == mnist and not validation and kwargs.get("dataset") in (None, data.dataset):
            return data
        return real(data_dir, validation, **kwargs)

    monkeypatch.setattr(mnist_recipe, "mnist_splits", splits)


def tiny(mnist_dir, *extra: str, subset: int = 200) -> list[str]:
    """The options of a run of a second or so."""
    return ["--width", "16", "--depth", "2", "--train-subset", str(subset), "--eval-subset", "100",
            "--batch-size", "50", "--epochs", "1", "--no-progress", "--data-dir", str(mnist_dir), *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, *expected: str) -> str:
    """stderr is exactly one line ``ff-train: error: ...`` holding every ``expected`` text."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ff-train: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def strict_json_lines(path: Path) -> list[dict]:
    return [guard.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ 1. divergence


def test_backprop_divergence_stops_with_one_line_and_writes_no_nan(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    status = main(["backprop", "--lr", "1e10", "--optimizer", "sgd", *tiny(mnist_dir, subset=2000),
                   "--batch-size", "500", "--width", "64", "--run-dir", str(run)])
    assert status == guard.EXIT_DIVERGED
    line = one_error_line(capsys, "training diverged: backprop in epoch 1 at step", "the training loss is nan",
                          "no checkpoint was written", "--lr is 1e+10")
    assert "lower the learning rate" in line
    assert not run.exists()  # a fresh run stopped before its first checkpoint leaves nothing behind


def test_divergence_of_a_head_found_before_the_checkpoint(mnist_dir, tmp_path, capsys):
    """unsupervised --head-lr 1e30: the FF loss stays finite, the softmax head does not."""
    run = tmp_path / "run"
    assert main(["unsupervised", "--head-lr", "1e30", *tiny(mnist_dir, subset=500), "--run-dir", str(run)]) == 3
    one_error_line(capsys, "training diverged: unsupervised in epoch 1", "head.weight", "--head-lr is 1e+30")
    assert not run.exists()


def test_a_step_failing_on_nan_state_is_a_divergence_not_a_traceback(mnist_dir, tmp_path, capsys):
    """supervised --head-lr 1e30 used to die inside torch.multinomial (hard negatives from NaN)."""
    assert main(["supervised", "--head-lr", "1e30", *tiny(mnist_dir, subset=500), "--run-dir", str(tmp_path / "r")]) == 3
    one_error_line(capsys, "training diverged: supervised in epoch 1 at step", "head.weight", "made the step fail")


def test_ff_divergence_says_diverged_not_x_contains_nan(mnist_dir, tmp_path, capsys):
    assert main(["supervised", "--lr", "1e10", *tiny(mnist_dir, subset=500), "--run-dir", str(tmp_path / "r")]) == 3
    line = one_error_line(capsys, "training diverged: supervised in epoch 1 at step", "--lr is 1e+10")
    assert "contains NaN" not in line


def _nan_at(recipe, call: int):
    """Make ``recipe``'s ``call``-th training step (counted from 1) fill a layer with NaN and return a NaN loss."""
    original, calls = recipe.train_step, {"n": 0}

    def train_step(batch, generator):
        loss, errors, n = original(batch, generator)
        calls["n"] += 1
        if calls["n"] == call:
            with torch.no_grad():
                recipe.model.net[0].weight.fill_(float("nan"))
            return loss * float("nan"), errors, n
        return loss, errors, n

    recipe.train_step = train_step


def test_the_last_good_checkpoint_and_metrics_stay_after_a_divergence(data, tmp_path):
    config = {"width": 16, "depth": 2, "batch_size": 50, "train_subset": 200, "eval_subset": 100}
    cls = RECIPES["supervised"]
    train(cls(cls.Config(**config, epochs=1), data), tmp_path, progress=False)
    before = snapshot(tmp_path)
    recipe = cls(cls.Config(**config, epochs=3), data)
    _nan_at(recipe, call=3)  # epoch 2, the first of the resumed run, at its step 3
    with pytest.raises(TrainingDiverged, match=r"epoch 2 at step 3: the training loss is nan; .*epoch 1"):
        train(recipe, tmp_path, resume=True, progress=False)
    after = snapshot(tmp_path)
    assert after[CHECKPOINT] == before[CHECKPOINT] and after[METRICS] == before[METRICS]
    assert not (tmp_path / run_dir.LOCK_FILE).exists()
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert guard.nonfinite_names(state["model"].items()) == []


def test_on_a_gpu_the_loss_is_checked_every_20_steps_and_named_by_range(monkeypatch):
    """No wait for the device per step: the running sum is read every ``every`` steps."""
    check = guard.LossCheck(every=20)
    monkeypatch.setattr(guard, "_read_at_once", lambda loss: False)
    total = torch.zeros(())
    for step in range(1, 20):
        total = total + (float("nan") if step == 7 else 1.0)
        check.add(torch.tensor(1.0), total)  # nothing read yet
    with pytest.raises(guard.NonFinite) as caught:
        check.add(torch.tensor(1.0), total)
    assert caught.value.steps == (1, 20)
    finishing = guard.LossCheck(every=20)
    monkeypatch.setattr(guard, "_read_at_once", lambda loss: False)
    finishing.add(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(guard.NonFinite, match="inf"):
        finishing.add(torch.tensor(1.0), torch.tensor(float("inf")))
        finishing.finish(torch.tensor(float("inf")))


def test_json_files_are_strict_and_readers_refuse_nan(tmp_path):
    with pytest.raises(ValueError):
        guard.dumps({"train_loss": float("nan")})
    with pytest.raises(ValueError, match="NaN"):
        guard.loads('{"train_loss": NaN}')
    # table1 does not list a diverged run as a normal row
    run = tmp_path / "cifar-bp"
    run.mkdir()
    config = json.loads(json.dumps(RECIPES["cifar-backprop"].Config().__dict__))
    (run / CONFIG).write_text(json.dumps(config))
    (run / METRICS).write_text('{"epoch": 1, "train_loss": NaN, "train_error": 0.9, "test_error": 0.9}\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        table1.load_run(run)
    assert table1.main([str(run)]) == 1


def test_readout_refuses_a_checkpoint_holding_nan(data, tmp_path):
    cls = RECIPES["unsupervised"]
    recipe = cls(cls.Config(width=16, depth=2, batch_size=50, train_subset=200, eval_subset=100, epochs=1), data)
    train(recipe, tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    state["model"]["head.weight"].fill_(float("inf"))
    torch.save(state, tmp_path / CHECKPOINT)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds NaN or Inf in head.weight: the run diverged"):
        readout_run("unsupervised", tmp_path)
    assert snapshot(tmp_path) == before  # no readout.json


# ------------------------------------------------------------------ 2. two writers


# run_dir.py alone (it imports no torch), so that the second process starts in a blink
HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_dir", sys.argv[2])
run_dir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_dir)
run_dir.RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """A second process holding the lock of tmp_path / "run"; killed (-9) when asked or at the end."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run), run_dir.__file__], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "locked"
    yield run, process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_holder(mnist_dir, lock_holder, capsys):
    run, process = lock_holder
    before = snapshot(run)
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 1
    one_error_line(capsys, f"run directory {run} is in use by another ff-train run: pid {process.pid}")
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run), "--overwrite"]) == 1
    one_error_line(capsys, "in use by another ff-train run")
    assert snapshot(run) == before


def test_a_second_resume_is_refused_while_the_first_runs(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    with run_dir.RunLock(run):  # a first --resume, still running
        before = snapshot(run)
        assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run), "--resume", "--epochs", "2"]) == 1
        one_error_line(capsys, "in use by another ff-train run", f"pid {os.getpid()}")
        assert snapshot(run) == before
    assert [m["epoch"] for m in strict_json_lines(run / METRICS)] == [1]


def test_a_lock_left_by_a_killed_run_does_not_block(mnist_dir, lock_holder, capsys):
    run, process = lock_holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / run_dir.LOCK_FILE).exists()  # left behind, but no longer locked
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir()) == sorted([CHECKPOINT, CONFIG, METRICS, SUMMARY])


def test_a_parallel_run_is_refused_before_its_processes_start(mnist_dir, lock_holder, capsys):
    run, process = lock_holder
    started = time.perf_counter()
    assert main(["supervised", *tiny(mnist_dir), "--nproc", "2", "--run-dir", str(run)]) == 1
    one_error_line(capsys, f"in use by another ff-train run: pid {process.pid}")
    assert main(["supervised", *tiny(mnist_dir), "--nproc", "2", "--run-dir", str(run), "--resume"]) == 1
    one_error_line(capsys, f"in use by another ff-train run: pid {process.pid}")
    assert time.perf_counter() - started < 3


def test_a_readout_holds_the_run_lock(data, mnist_dir, tmp_path):
    """ff-readout writes readout.json into a run folder: it takes the folder's lock, so it is refused
    while ff-train (or another readout) holds it, and it leaves no lock file behind."""
    cls = RECIPES["unsupervised"]
    recipe = cls(cls.Config(width=16, depth=2, batch_size=50, train_subset=200, eval_subset=100, epochs=1), data)
    train(recipe, tmp_path, progress=False)
    before = snapshot(tmp_path)
    with run_dir.RunLock(tmp_path), pytest.raises(run_dir.RunDirInUse, match=f"pid {os.getpid()}"):
        readout_run("unsupervised", tmp_path, data_dir=str(mnist_dir))
    assert snapshot(tmp_path) == before
    fast = ReadoutSettings(epochs=1, weight_decays=(0.0,), holdout=50)
    readout_run("unsupervised", tmp_path, fast, data_dir=str(mnist_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, READOUT])  # no lock file left


def test_more_processes_than_the_machine_has_are_refused_before_starting(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    many = (os.cpu_count() or 1) + 1
    with pytest.raises(SystemExit) as exit_info:
        main(["supervised", *tiny(mnist_dir), "--batch-size", str(100 * many), "--nproc", str(many),
              "--run-dir", str(run)])
    assert exit_info.value.code == 2
    assert f"--nproc {many}: this machine has {os.cpu_count()} CPU cores" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.slow
def test_parallel_runs_stop_a_divergence_and_report_a_worker_error_in_one_line(mnist_dir, tmp_path, capsys):
    """--nproc 2 (about 20 s each): the guard runs on every rank; a rank's error is one line."""
    run = tmp_path / "run"
    assert main(["backprop", "--lr", "1e10", "--optimizer", "sgd", *tiny(mnist_dir, subset=2000),
                 "--batch-size", "500", "--width", "64", "--nproc", "2", "--run-dir", str(run)]) == 3
    one_error_line(capsys, "training diverged: backprop in epoch 1 at step", "the training loss is nan")
    assert not run.exists()
    assert main(["supervised", "--parallel", "pipeline", "--optimizer", "adam", *tiny(mnist_dir), "--nproc", "2",
                 "--run-dir", str(run)]) == 1
    one_error_line(capsys, "--parallel pipeline trains with the fused SGD step")


def test_the_lock_excludes_a_second_holder_in_the_same_process(tmp_path):
    with run_dir.RunLock(tmp_path / "run"), pytest.raises(run_dir.RunDirInUse, match=f"pid {os.getpid()}"):
        run_dir.RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # created by the first lock, removed as it was left empty


# ------------------------------------------------------------------ 3. fresh runs never overwrite


def test_a_fresh_run_refuses_a_folder_with_files_and_leaves_it_byte_identical(mnist_dir, tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    (run / CONFIG).write_text('{"mine": 1}')
    (run / METRICS).write_text("not yours\n")
    before = snapshot(run)
    started = time.perf_counter()
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 1
    assert time.perf_counter() - started < 5  # refused before loading any data
    one_error_line(capsys, f"{run} already holds files", "notes.txt", "--overwrite")
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == sorted(before)


def test_overwrite_replaces_the_run_files_and_keeps_the_rest(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 0
    (run / "notes.txt").write_text("keep me")
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 1
    one_error_line(capsys, "already holds a checkpoint", "--resume", "--overwrite")
    assert main(["supervised", *tiny(mnist_dir), "--width", "8", "--run-dir", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "keep me"
    assert json.loads((run / CONFIG).read_text())["width"] == 8
    assert [m["epoch"] for m in strict_json_lines(run / METRICS)] == [1]
    with pytest.raises(SystemExit) as caught:
        main(["supervised", "--run-dir", str(run), "--resume", "--overwrite"])
    assert caught.value.code == 2
    one_error_line(capsys, "give one of them")


def test_an_empty_run_dir_is_not_the_current_folder(mnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", ""]) == 1
    one_error_line(capsys, "must name a folder, got ''")
    assert list(tmp_path.iterdir()) == []


def test_default_run_folders_are_unique(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *a: "20261204-120000")  # both runs in the same second
    assert main(["supervised", *tiny(mnist_dir)]) == 0
    assert main(["supervised", *tiny(mnist_dir)]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["supervised-20261204-120000",
                                                                       "supervised-20261204-120000-2"]


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    assert main(["supervised", "--data-dir", str(tmp_path / "no-mnist"), "--run-dir", str(run), "--no-progress"]) == 1
    one_error_line(capsys)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ 4. frozen layers


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_frozen_layer_gets_no_grad_and_no_update(backend):
    torch.manual_seed(0)
    layer = FFLinear(8, 4, backend=backend)
    x_pos, x_neg = torch.randn(5, 8), torch.randn(5, 8)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.requires_grad_(False)
    loss = layer.ff_backward(x_pos, x_neg)
    assert torch.isfinite(loss) and layer.weight.grad is None and layer.bias.grad is None
    layer.ff_step(x_pos, x_neg, lr=0.5, momentum=0.9, weight_decay=0.1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.5)
    optimizer.step()
    for key, value in layer.state_dict().items():
        assert before.get(key) is None or torch.equal(before[key], value), key


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_frozen_bias_stays_while_the_weight_trains(backend):
    torch.manual_seed(1)
    layer = FFLinear(8, 4, backend=backend, peer_norm=ff_kernels.PeerNormalization(4, strength=0.5))
    layer.bias.requires_grad_(False)
    x_pos, x_neg = torch.randn(5, 8), torch.randn(5, 8)
    weight, bias = layer.weight.clone(), layer.bias.clone()
    layer.ff_backward(x_pos, x_neg)
    assert layer.bias.grad is None and layer.weight.grad.abs().sum() > 0
    layer.ff_step(x_pos, x_neg, lr=0.5, momentum=0.9, weight_decay=0.1)
    assert torch.equal(layer.bias, bias) and not torch.equal(layer.weight, weight)
    assert not layer.bias_momentum.any()


def test_frozen_layers_in_sequential_recurrent_and_local_nets():
    torch.manual_seed(2)
    net = FFSequential(FFLinear(8, 6), FFLinear(6, 4))
    net[0].requires_grad_(False)
    first, second = net[0].weight.clone(), net[1].weight.clone()
    x = torch.randn(4, 8)
    net.ff_step(x, x.flip(0), lr=0.5, momentum=0.9)
    net.ff_backward(x, x.flip(0))
    assert torch.equal(net[0].weight, first) and net[0].weight.grad is None
    assert not torch.equal(net[1].weight, second)

    recurrent = FFRecurrent(8, [6, 6], 3)
    recurrent.layers[1].requires_grad_(False)
    frozen = recurrent.layers[1].weight.clone()
    trained = recurrent.layers[0].weight.clone()
    top = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    recurrent.ff_step(torch.randn(4, 8), top, n_pos=2, iterations=2, lr=0.5, momentum=0.9)
    assert torch.equal(recurrent.layers[1].weight, frozen) and not torch.equal(recurrent.layers[0].weight, trained)

    local = FFLocal2d(1, 6, 2, kernel=3, backend="reference").requires_grad_(False)
    weight = local.weight.clone()
    images = torch.rand(3, 1, 6, 6)
    local.ff_step(images, images.flip(0), lr=0.5, momentum=0.9)
    assert torch.equal(local.weight, weight) and local.ff_backward(images, images) is not None
    assert local.weight.grad is None


def test_the_cifar_recurrent_local_net_honours_requires_grad():
    from ff_kernels.paper.recipes.cifar_ff_net import FFRecurrentLocal

    torch.manual_seed(3)
    net = FFRecurrentLocal(image_shape=(3, 8, 8), channels=2, depth=2, kernel=3, backend="reference")
    net.layers[0].requires_grad_(False)
    net.label_weight.requires_grad_(False)
    images, labels = torch.rand(4, 3, 8, 8), torch.eye(10)[torch.tensor([1, 2, 3, 4])]
    net.ff_backward(images, labels, n_pos=2, iterations=2)
    assert net.layers[0].weight.grad is None and net.layers[0].bias.grad is None and net.label_weight.grad is None
    assert net.layers[1].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ 5. library edges


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_threshold_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        FFLinear(4, 3, threshold=bad)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        FFLocal2d(1, 6, 2, kernel=3, threshold=bad)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        FFRecurrent(4, [3], 2, threshold=bad)
    layer = FFLinear(4, 3)
    layer.threshold = bad  # changed later: refused before it reaches the weights
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        layer.ff_step(torch.ones(2, 4), torch.zeros(2, 4), lr=0.1)
    assert torch.isfinite(layer.weight).all()


def test_goodness_overflow_is_a_clear_error_and_leaves_the_weights(capsys):
    layer = FFLinear(784, 100)
    weight = layer.weight.clone()
    huge = torch.full((4, 784), 1e20)
    for call in (lambda: layer(huge), lambda: layer.goodness(huge), lambda: layer.ff_step(huge, huge, lr=0.1),
                 lambda: layer.ff_backward(huge, huge)):
        with pytest.raises(GoodnessOverflowError, match=r"overflows float32 .*inputs up to \|x\| = 1e\+20"):
            call()
    assert torch.equal(layer.weight, weight) and layer.weight.grad is None
    assert layer(torch.full((4, 784), 1e3)).abs().sum() > 0  # large but harmless inputs still work


def test_momentum_made_under_inference_mode_works_after_it():
    layer = FFLinear(8, 4)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        layer.ff_step(x, x.flip(0), lr=0.1, momentum=0.9)
    layer.ff_step(x, x.flip(0), lr=0.1, momentum=0.9)
    state = layer.state_dict()
    fresh = FFLinear(8, 4)
    with torch.inference_mode():
        fresh.load_state_dict(state)
    fresh.ff_step(x, x.flip(0), lr=0.1, momentum=0.9)


def test_a_bogus_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'triton'\), got 'fast'"):
        FFLinear(4, 3, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        FFLocal2d(1, 6, 2, kernel=3, backend="triton")


def test_ffsequential_checks_its_layers_when_built_and_changed():
    with pytest.raises(ValueError, match="needs at least one FF layer"):
        FFSequential()
    with pytest.raises(ValueError, match="needs at least one FF layer"):
        FFSequential([])
    with pytest.raises(TypeError, match="layer 1 must be an FF layer .* got Linear"):
        FFSequential(FFLinear(4, 3), torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"layer 1 \(FFLinear\) takes rows of shape \(5,\), but layer 0 below it puts out \(3,\)"):
        FFSequential(FFLinear(4, 3), FFLinear(5, 2))
    with pytest.raises(ValueError, match="takes rows of shape"):
        FFSequential(FFLocal2d(1, 6, 2, kernel=3), FFLinear(32, 4))
    net = FFSequential(FFLinear(4, 3), FFLinear(3, 2), FFLinear(2, 2))
    with pytest.raises(ValueError, match="takes rows of shape"):
        net.append(FFLinear(7, 2))
    with pytest.raises(ValueError, match="takes rows of shape"):
        del net[1]
    assert [layer.in_features for layer in net] == [4, 3, 2]  # a refused change leaves the stack as it was
    net.append(FFLinear(2, 2))
    assert len(net) == 4


def test_load_state_dict_refuses_a_mask_that_is_not_0_or_1():
    layer = FFLinear(3, 2, mask=torch.ones(2, 3))
    state = layer.state_dict()
    state["mask"] = torch.tensor([[0.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(RuntimeError, match="mask must hold only 0 and 1"):
        layer.load_state_dict(state)
    assert layer.mask.all()
    state["mask"] = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    plain = FFLinear(3, 2)
    plain.load_state_dict(state)
    assert plain.mask.dtype == torch.bool


# ------------------------------------------------------------------ 6. ordinary errors: one line, no traceback


def _failing_save(monkeypatch, exc: BaseException):
    """torch.save in the training loop writes a little, then raises ``exc``."""

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise exc

    monkeypatch.setattr(train_module.torch, "save", save)


def test_a_full_disk_is_named_and_the_last_checkpoint_stays(mnist_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 0
    before = snapshot(run)
    # what torch.save raises when the disk fills: its own RuntimeError, the OSError as context
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as full:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        except RuntimeError as torch_error:
            torch_error.__context__ = full
            _failing_save(monkeypatch, torch_error)
    capsys.readouterr()
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run), "--resume", "--epochs", "2"]) == 1
    line = one_error_line(capsys, f"cannot write {run / CHECKPOINT}: no space left on the device", "--resume")
    assert "inline_container" not in line
    after = snapshot(run)
    assert after[CHECKPOINT] == before[CHECKPOINT] and set(after) == set(before)  # no temp file left


def test_a_read_only_folder_names_the_real_cause(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", args[0])

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "config.json", lambda f: f.write("{}"), mode="w")
    assert caught.value.errno == errno.EROFS and caught.value.filename == str(tmp_path / "config.json")
    monkeypatch.undo()
    from ff_kernels.paper.user_errors import error_line

    assert error_line(caught.value) == f"cannot write {tmp_path / 'config.json'}: the file system is read-only; " \
                                       "choose a --run-dir on a writable one"


def test_a_folder_that_cannot_be_written_fails_at_once_with_one_line(mnist_dir, tmp_path, capsys, monkeypatch):
    real_open = os.open

    def no_permission(path, flags, *args):
        if str(path).endswith(run_dir.LOCK_FILE) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_dir.os, "open", no_permission)
    run = tmp_path / "locked-down"
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 1
    one_error_line(capsys, "cannot access", "permission denied")
    assert not run.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_folder_with_chmod(mnist_dir, tmp_path, capsys):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 1
        one_error_line(capsys, "permission denied")
    finally:
        run.chmod(0o755)


def test_a_run_folder_below_a_file(mnist_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(tmp_path / "file" / "run")]) == 1
    one_error_line(capsys, "is below", "which is a file, not a folder")
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(tmp_path / "file")]) == 1
    one_error_line(capsys, "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("option", [["--train-subset", "0"], ["--eval-subset", "-3"], ["--batch-size", "0"]])
def test_bad_subsets_fail_before_loading(tmp_path, capsys, option):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as caught:
        main(["supervised", *option, "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "none")])
    assert caught.value.code == 2 and time.perf_counter() - started < 2
    one_error_line(capsys, "must be an int >= 1")


def test_subsets_that_leave_no_step_or_exceed_the_data(mnist_dir, tmp_path, capsys):
    assert main(["unsupervised", *tiny(mnist_dir, subset=1), "--run-dir", str(tmp_path / "a")]) == 1
    one_error_line(capsys, "unsupervised: epoch 1 has no training step (train_subset 1, batch_size 50)")
    assert main(["supervised", *tiny(mnist_dir, subset=100_000), "--run-dir", str(tmp_path / "b")]) == 1
    one_error_line(capsys, "n_train must be in 1..60000, got 100000 (--train-subset")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["supervised", "--device", "cuda", "--run-dir", str(tmp_path / "r")]) == 1
    one_error_line(capsys, "--device cuda: no CUDA device here", "use --device cpu")
    assert main(["supervised", "--device", "gpu0", "--run-dir", str(tmp_path / "r")]) == 1
    one_error_line(capsys, "--device must be cpu, cuda or cuda:N, got 'gpu0'")
    assert time.perf_counter() - started < 2 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, message", [
    ('{"width": 32, ', "is damaged: not valid JSON"),
    ("[1, 2, 3]", "is damaged: expected a JSON object (the run's config), got list"),
    ('{"width": NaN}', "non-finite number NaN"),
    ('{"width": "wide"}', "holds an invalid config: width must be an int >= 1, got 'wide'"),
])
def test_a_bad_config_on_resume(tmp_path, capsys, content, message):
    (tmp_path / CONFIG).write_text(content)
    before = snapshot(tmp_path)
    assert main(["supervised", "--run-dir", str(tmp_path), "--resume"]) == 1
    one_error_line(capsys, str(tmp_path / CONFIG), message)
    assert snapshot(tmp_path) == before


def test_resume_with_another_recipe_names_the_right_one(mnist_dir, tmp_path, capsys):
    assert main(["backprop", *tiny(mnist_dir), "--run-dir", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "r")
    assert main(["supervised", "--run-dir", str(tmp_path / "r"), "--resume"]) == 1
    line = one_error_line(capsys, "is not the config of an ff-train supervised run", "it is the config of a backprop run")
    assert "unexpected keyword" not in line
    assert snapshot(tmp_path / "r") == before


def test_resume_without_a_checkpoint(mnist_dir, tmp_path, capsys):
    (tmp_path / CONFIG).write_text(json.dumps({"width": 16, "depth": 2}))
    assert main(["supervised", "--run-dir", str(tmp_path), "--resume", "--data-dir", str(mnist_dir)]) == 1
    one_error_line(capsys, "no checkpoint at", "start it afresh with --overwrite")


def test_resume_with_fewer_epochs_than_done_or_of_a_diverged_checkpoint(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["supervised", *tiny(mnist_dir), "--epochs", "2", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert main(["supervised", "--run-dir", str(run), "--resume", "--epochs", "1"]) == 1
    one_error_line(capsys, "has finished 2 epochs: resume it with --epochs 2 or more, not 1")
    assert snapshot(run) == before
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["model"]["net.0.weight"][0, 0] = float("nan")  # a checkpoint written before the guard existed
    torch.save(state, run / CHECKPOINT)
    before = snapshot(run)
    assert main(["supervised", "--run-dir", str(run), "--resume", "--epochs", "3"]) == 1
    one_error_line(capsys, "holds NaN or Inf in net.0.weight: the run had diverged")
    assert snapshot(run) == before


def test_a_seed_torch_cannot_take_and_running_out_of_memory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["supervised", "--seed", str(2**70), "--run-dir", str(tmp_path / "r")])
    one_error_line(capsys, "seed must be an int >=")
    from ff_kernels.paper.user_errors import error_line

    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 40000000000000 bytes.")
    assert error_line(oom).startswith("out of memory (RuntimeError: ") and "--width" in error_line(oom)


def test_an_odd_batch_size_for_two_processes_fails_before_starting_them(tmp_path, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as caught:
        main(["supervised", "--nproc", "2", "--batch-size", "51", "--run-dir", str(tmp_path / "r")])
    assert caught.value.code == 2 and time.perf_counter() - started < 2
    one_error_line(capsys, "the batch size (51) must be a multiple of the number of processes (2)")


def test_stale_temp_files_are_removed_by_the_next_run(mnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run)]) == 0
    orphan = run / f".{CHECKPOINT}.12345.{'ab' * 16}.tmp"
    orphan.write_bytes(b"half a checkpoint from a kill -9")
    mine = run / ".my-own.tmp"
    mine.write_text("not ff-train's")
    assert main(["supervised", *tiny(mnist_dir), "--run-dir", str(run), "--resume", "--epochs", "2"]) == 0
    assert not orphan.exists() and mine.exists()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / CONFIG).write_text("[]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        main(["supervised", "--run-dir", str(tmp_path), "--resume", "--debug"])


def test_the_command_itself_prints_one_line_and_no_traceback(tmp_path):
    """Through ``python -m ff_kernels`` in a fresh process, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "ff_kernels", "supervised", "--device", "cuda:99",
                             "--run-dir", str(tmp_path / "r")], check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ff-train: error: --device cuda:99: ")


# ------------------------------------------------------------------ 7. the CIFAR-10 cache


def test_a_cifar_cache_replaced_by_zeros_is_not_trusted(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6, dtype=np.int64) % 10
    C._write_cache(tmp_path, {"train": (images, labels), "test": (images[:2], labels[:2])})
    limits = {"train": None, "test": None}
    assert np.array_equal(C._read_cache(tmp_path, limits)["train"][0], images)
    np.save(tmp_path / "train_images.npy", np.zeros_like(images), allow_pickle=False)
    with pytest.warns(RuntimeWarning, match=r"does not match its recorded sha256 \(train_images.npy\)"):
        assert C._read_cache(tmp_path, limits) is None


# ------------------------------------------------------------------ helpers of the guard


def test_nonfinite_names_reads_every_kind_of_state():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert guard.nonfinite_state(model, optimizer) == []
    optimizer.state[model.bias]["exp_avg"].fill_(math.inf)
    assert guard.nonfinite_state(model, optimizer) == ["optimizer exp_avg of bias"]


def test_cifar_backprop_divergence_is_caught_too(tmp_path):
    """cifar-backprop --lr 1e10 (synthetic 32x32 images: the guard is the training loop's, not the data's)."""
    from ff_kernels.paper.recipes.cifar_backprop import CifarBackprop, CifarBackpropConfig
    from ff_kernels.paper.recipes.cifar_common import CifarData

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(40) % 10
    data = CifarData(images, labels, {"train": (images, labels), "test": (images[:20], labels[:20])})
    recipe = CifarBackprop(CifarBackpropConfig(receptive_field=3, batch_size=10, lr=1e10, epochs=5), data=data)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged: cifar-backprop in epoch \d+\b.*--lr is 1e\+10"):
        train(recipe, run, progress=False)
    if (run / CHECKPOINT).exists():  # a good epoch before the divergence: its checkpoint is finite
        assert guard.nonfinite_names(torch.load(run / CHECKPOINT, weights_only=True)["model"].items()) == []
        assert all(math.isfinite(v) for m in strict_json_lines(run / METRICS) for v in m.values())
