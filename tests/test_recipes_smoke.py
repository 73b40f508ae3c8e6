"""Every registered recipe trains one small epoch through the ``ff-train`` command.

Parametrized over ``RECIPES``, so a recipe registered later is covered without editing this
file. Each run gets the small settings in ``SMALL`` for the config fields it has (the local
recipe has no width, the backprop one no backend, ...) plus its entry in ``OVERRIDES``; it must
leave metrics.jsonl, checkpoint.pt and summary.json with a finite error rate behind.
"""

import argparse
import json
import math

import pytest

from ff_kernels.paper.cli import build_parser, main
from ff_kernels.paper.recipes import RECIPES
from ff_kernels.paper.train import CHECKPOINT, METRICS, SUMMARY, load_checkpoint

from _paths import require_data

# Small values for config fields, used where a recipe's config has the field.
SMALL = {"epochs": 1, "width": 32, "depth": 2, "batch_size": 50, "train_subset": 300, "eval_subset": 100}
# Per recipe: more config fields (a tuple is passed as several values).
OVERRIDES = {
    "jitter": {"max_shift": 2},
    "local": {"channels": (4, 4, 4)},
    "aesop": {"num_strings": 20, "test_strings": 10},
    "cifar": {"receptive_field": 3, "train_iterations": 2, "score_from": 1, "score_to": 2},
    "cifar-backprop": {"receptive_field": 3},
}


def option(field: str) -> str:
    return "--" + field.replace("_", "-")


def small_arguments(name: str) -> list[str]:
    """CLI arguments of a small one-epoch run of recipe ``name``."""
    fields = RECIPES[name].Config.__dataclass_fields__
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = commands.choices[name]._option_string_actions
    values = {k: v for k, v in SMALL.items() if k in fields}
    values.update(OVERRIDES.get(name, {}))
    args = [name]
    for field, value in values.items():
        assert field in fields and option(field) in known, f"{name} has no config field / option {option(field)}"
        args += [option(field), *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return args


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_one_small_epoch(name, tmp_path, capsys):
    run_dir = tmp_path / name
    # A recipe names its data set's folder under ../shared/data in ``data_name`` (default "mnist").
    data_dir = require_data(getattr(RECIPES[name], "data_name", "mnist"))
    args = small_arguments(name) + ["--data-dir", str(data_dir), "--run-dir", str(run_dir), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    assert "done after 1 epochs" in capsys.readouterr().out
    assert {METRICS, CHECKPOINT, SUMMARY} <= {p.name for p in run_dir.iterdir()}
    lines = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert len(lines) == 1 and lines[0]["epoch"] == summary["epoch"] == 1
    assert load_checkpoint(run_dir / CHECKPOINT)["epoch"] == 1
    errors = {k: v for k, v in summary.items() if k.startswith("test_error")}
    assert "test_error" in errors and all(math.isfinite(v) and 0 <= v <= 1 for v in errors.values()), summary
    assert math.isfinite(summary["train_loss"]) and summary["wall_s"] > 0
