"""The paper's Table 1 (CIFAR-10, section 4) as a markdown table, read from run directories.

    python -m ff_kernels.paper.table1 runs/cifar-table1/*

Every directory holds an ``ff-train cifar`` or ``ff-train cifar-backprop`` run (``config.json``
and ``metrics.jsonl``, see :mod:`ff_kernels.paper.train`); which of the two it is, its depth and, for
FF, its goodness ("ssq" = the paper's max ssq, "neg_ssq" = min ssq) come from ``config.json``.
A cell holds the error of the run's last evaluated epoch, in percent: training error on the
first ``train_eval_subset`` training images, test error on the JPEG test set and, after a slash,
on the exact test set when the run has it. The list of runs under the table gives each run's
schedule (epochs; for FF, the iterations trained on and a loss other than the paper's); a run whose last evaluation is not its
last epoch is marked "(epoch k of N)" there, and a run that has not been evaluated yet fills
its cells with "running". Two runs for the same cell are an error, and so is a ``--validation``
run (it has no test error); a cell no run fills shows "—".

Rows, in the paper's layout (one row per procedure and depth, depth 2 first): BP (softmax);
FF min ssq and FF max ssq, each with the two test procedures of
:mod:`ff_kernels.paper.recipes.cifar_ff` ("compute goodness for every label" = ``<set>_error``,
"one-pass softmax" = ``<set>_error_softmax``). Each row gives the paper's training and test
error (:data:`PAPER`) beside ours.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .guard import loads, nonfinite_values
from .options import Option, add_options, check_options
from .recipes.cifar_backprop import CifarBackpropConfig
from .recipes.cifar_ff import CifarFFConfig
from .train import CONFIG, METRICS, config_mismatch

DEPTHS = (2, 3)
# (learning procedure, testing procedure, recipe, goodness or None, metric suffix)
ROWS = (
    ("BP", "softmax", "cifar-backprop", None, ""),
    ("FF min ssq", "compute goodness for every label", "cifar", "neg_ssq", ""),
    ("FF min ssq", "one-pass softmax", "cifar", "neg_ssq", "_softmax"),
    ("FF max ssq", "compute goodness for every label", "cifar", "ssq", ""),
    ("FF max ssq", "one-pass softmax", "cifar", "ssq", "_softmax"),
)
_CONFIGS = {"cifar": CifarFFConfig, "cifar-backprop": CifarBackpropConfig}
# The paper's Table 1: (learning procedure, testing procedure, hidden layers) -> (train %, test %)
PAPER = {
    ("BP", "softmax", 2): (0, 37), ("BP", "softmax", 3): (2, 39),
    ("FF min ssq", "compute goodness for every label", 2): (20, 41),
    ("FF min ssq", "one-pass softmax", 2): (31, 45),
    ("FF max ssq", "compute goodness for every label", 2): (25, 44),
    ("FF max ssq", "one-pass softmax", 2): (33, 46),
    ("FF min ssq", "compute goodness for every label", 3): (24, 41),
    ("FF min ssq", "one-pass softmax", 3): (32, 44),
    ("FF max ssq", "compute goodness for every label", 3): (21, 44),
    ("FF max ssq", "one-pass softmax", 3): (31, 46),
}


@dataclass(frozen=True)
class CifarRun:
    """One run directory: its recipe ("cifar" or "cifar-backprop"), depth, goodness, the first
    and last iteration with an FF loss and that loss's form ("threshold" or "pairwise"; FF only,
    else None), planned epochs, the last finished
    epoch and the last evaluated epoch's metrics (``epoch`` among them; empty before the first
    evaluation)."""

    path: Path
    recipe: str
    depth: int
    goodness: str | None
    trained_iterations: tuple[int, int] | None
    ff_loss: str | None
    epochs: int
    last_epoch: int
    metrics: dict

    @property
    def finished(self) -> bool:
        return self.metrics.get("epoch") == self.epochs

    def describe(self) -> str:
        """"cifar, depth 3, goodness ssq, 10 epochs, FF losses at iterations 1-3 (epoch 5 of 10)"."""
        text = f"{self.recipe}, depth {self.depth}"
        if self.goodness is not None:
            text += f", goodness {self.goodness}"
        text += f", {self.epochs} epochs"
        if self.trained_iterations is not None:
            text += ", FF losses at iterations {}-{}".format(*self.trained_iterations)
        if self.ff_loss not in (None, "threshold"):
            text += f", {self.ff_loss} loss"
        if not self.metrics:
            return text + f" (running: epoch {self.last_epoch} of {self.epochs}, not evaluated yet)"
        return text + ("" if self.finished else f" (epoch {self.metrics['epoch']} of {self.epochs})")


def _trained_iterations(config: dict) -> tuple[int, int] | None:
    """(first, last) iteration of an FF run's losses (``train_from`` is absent from older runs: 1); None for BP."""
    if "train_iterations" not in config:
        return None
    return config.get("train_from", 1), config["train_iterations"]


def load_run(path: str | Path) -> CifarRun:
    """Read ``config.json`` and the last evaluated epoch of ``metrics.jsonl`` in ``path``.

    Raises ValueError naming the file when the config is not one of the two CIFAR recipes' or
    is a ``--validation`` run's, and when a file is not strict JSON: a NaN or Infinity (a
    diverged run's) is refused, not shown as a result.
    """
    path = Path(path)
    config = _read_json(path / CONFIG)
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG} is damaged: expected a JSON object, got {type(config).__name__}")  # noqa: TRY004 (a damaged file, reported as main reports bad files)
    recipe = next((name for name, cls in _CONFIGS.items() if config_mismatch(cls, config) is None), None)
    if recipe is None:
        raise ValueError(f"{path / CONFIG} is not the config of an ff-train cifar or cifar-backprop run; "
                         f"its keys are {sorted(config)}")
    if config["validation"]:
        raise ValueError(f"{path / CONFIG} is a --validation run: it has no test error for Table 1")
    lines = (path / METRICS).read_text().splitlines()
    epochs = [_read_json(path / METRICS, line, number) for number, line in enumerate(lines, 1) if line.strip()]
    bad = [f"line {number}: {', '.join(keys)}" for number, m in enumerate(epochs, 1) if (keys := nonfinite_values(m))]
    if bad:
        raise ValueError(f"{path / METRICS} holds NaN or Inf ({'; '.join(bad)}): the run diverged, it has no result")
    evaluated = [m for m in epochs if "test_error" in m]
    ff_loss = config.get("loss", "threshold") if recipe == "cifar" else None  # runs before --loss: threshold
    return CifarRun(path, recipe, config["depth"], config.get("goodness"), _trained_iterations(config), ff_loss,
                    config["epochs"], epochs[-1]["epoch"] if epochs else 0, evaluated[-1] if evaluated else {})


def _read_json(path: Path, text: str | None = None, line: int | None = None):
    """Strict JSON (no NaN or Infinity) from ``path``, or from ``text``, its line ``line``."""
    try:
        return loads(path.read_text() if text is None else text)
    except ValueError as err:
        where = f"{path} line {line}" if line is not None else str(path)
        raise ValueError(f"{where} is not valid JSON: {err}") from None


def _cell_runs(runs: list[CifarRun]) -> dict[tuple[str, str | None, int], CifarRun]:
    cells: dict[tuple[str, str | None, int], CifarRun] = {}
    for run in runs:
        key = (run.recipe, run.goodness, run.depth)
        if key in cells:
            raise ValueError(f"two runs for the same cell of Table 1 ({run.recipe}, goodness {run.goodness}, "
                             f"depth {run.depth}): {cells[key].path} and {run.path}")
        cells[key] = run
    return cells


def _percent(metrics: dict, name: str) -> str:
    return f"{100 * metrics[name]:.1f}" if name in metrics else "—"


def table1(runs: list[CifarRun]) -> str:
    """Table 1 in markdown (module docstring), followed by the list of the runs it uses."""
    cells = _cell_runs(runs)
    head = ("| learning procedure | testing procedure | hidden layers | paper: train % | paper: test % "
            "| ours: train % | ours: test % (JPEG / exact) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for depth in DEPTHS:
        for learning, testing, recipe, goodness, suffix in ROWS:
            paper_train, paper_test = PAPER[(learning, testing, depth)]
            line = f"| {learning} | {testing} | {depth} | {paper_train} | {paper_test} |"
            run = cells.get((recipe, goodness, depth))
            if run is None:
                line += " — | — |"
            elif not run.metrics:
                line += " running | running |"
            else:
                m = run.metrics
                test = _percent(m, f"test_error{suffix}")
                if f"test_exact_error{suffix}" in m:
                    test += f" / {_percent(m, f'test_exact_error{suffix}')}"
                line += f" {_percent(m, f'train_error{suffix}')} | {test} |"
            lines.append(line)
    lines.append("")
    for run in sorted(cells.values(), key=lambda r: (r.recipe, r.goodness or "", r.depth)):
        lines.append(f"- `{run.path}`: {run.describe()}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Table1Command:
    """The options of ``python -m ff_kernels.paper.table1``."""

    run_dirs: tuple[str, ...] = Option("run directories of ff-train cifar / cifar-backprop runs", positional=True)()

    def __post_init__(self) -> None:
        check_options(self)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ff_kernels.paper.table1", description=__doc__.split("\n\n")[0])
    add_options(parser, Table1Command, with_defaults=True)
    args = Table1Command(**vars(parser.parse_args(argv)))
    try:
        print(table1([load_run(path) for path in args.run_dirs]))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
