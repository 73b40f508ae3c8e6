"""A training process killed with SIGKILL mid-run resumes to exactly the uninterrupted result.

``python -m ff_kernels supervised ...`` runs as a subprocess; as soon as its first checkpoint
exists it is killed (no chance to clean up), then the same command with ``--resume`` finishes
the run. Its final weights, optimizer state and metrics must equal those of the same command
run without interruption. All three processes run with one thread so that their GEMMs reduce
in the same order; the uninterrupted run goes alongside the one that is killed (two cores).
"""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from ff_kernels.paper.train import CHECKPOINT, METRICS, SUMMARY, load_checkpoint

from _paths import REPO_ROOT, require_mnist

EPOCHS = 4
POLL_S = 0.01
START_TIMEOUT_S = 120  # until the first checkpoint: interpreter start, imports, MNIST load, one epoch


def command(run_dir, *extra):
    return [
        sys.executable, "-m", "ff_kernels", "supervised", "--epochs", str(EPOCHS), "--width", "48", "--depth", "2",
        "--train-subset", "1000", "--eval-subset", "200", "--batch-size", "50", "--data-dir", str(require_mnist()),
        "--run-dir", str(run_dir), "--no-progress", *extra,
    ]


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "python"), env.get("PYTHONPATH")]))
    return env


def run_to_end(args):
    result = subprocess.run(args, check=False, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def metrics_without_times(run_dir):
    lines = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("_s")} for m in lines]


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    straight = subprocess.Popen(command(straight_dir), env=environment(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen(command(killed_dir), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (killed_dir / CHECKPOINT).exists():  # os.replace puts it there whole, never half-written
            assert process.poll() is None, f"the run ended before its first checkpoint: {process.stderr.read()}"
            assert time.monotonic() < deadline, f"no checkpoint after {START_TIMEOUT_S} s"
            time.sleep(POLL_S)
        time.sleep(POLL_S)  # into the next epoch
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        _, straight_err = straight.communicate(timeout=300)
        assert straight.returncode == 0, straight_err
    finally:
        for started in (process, straight):  # only on failure is one still running
            if started.poll() is None:
                started.kill()
                started.wait()
            started.stderr.close()

    state = load_checkpoint(killed_dir / CHECKPOINT)  # the checkpoint left behind is whole
    assert 1 <= state["epoch"] < EPOCHS, "killed after the run had finished: nothing was interrupted"
    assert not (killed_dir / SUMMARY).exists()

    resumed = run_to_end(command(killed_dir, "--resume"))
    assert f"done after {EPOCHS} epochs" in resumed.stdout

    killed = torch.load(killed_dir / CHECKPOINT, weights_only=True)
    straight = torch.load(straight_dir / CHECKPOINT, weights_only=True)
    assert killed["epoch"] == straight["epoch"] == EPOCHS
    assert killed["model"].keys() == straight["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(killed["model"][key], value), key
    for index, param_state in straight["optimizer"]["state"].items():
        for key, value in param_state.items():
            assert torch.equal(torch.as_tensor(killed["optimizer"]["state"][index][key]), torch.as_tensor(value)), key
    assert metrics_without_times(killed_dir) == metrics_without_times(straight_dir)
