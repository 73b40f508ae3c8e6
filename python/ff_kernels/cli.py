"""The ``ff-train`` command: ``ff-train RECIPE [options]`` trains one recipe into a run directory.

    ff-train supervised --epochs 1 --train-subset 10000 --width 500 --depth 2 --data-dir DIR
    ff-train supervised --run-dir runs/x --resume --epochs 10     # continue a run

Options left out take the recipe's defaults, or when resuming the saved run's values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .data import MnistCorruptError, MnistMissingError
from .recipes import RECIPES, SupervisedMNISTConfig
from .train import CHECKPOINT, CONFIG, CheckpointError, train


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="where config, metrics and checkpoints go (default runs/RECIPE-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")


def _add_supervised_arguments(parser: argparse.ArgumentParser) -> None:
    d = SupervisedMNISTConfig()
    parser.add_argument("--epochs", type=int, help=f"number of epochs (default {d.epochs})")
    parser.add_argument("--width", type=int, help=f"ReLUs per hidden layer (default {d.width})")
    parser.add_argument("--depth", type=int, help=f"number of hidden layers (default {d.depth})")
    parser.add_argument("--train-subset", type=int, help="train on the first N training images (default all)")
    parser.add_argument("--eval-subset", type=int, help="evaluate on the first N evaluation images (default all)")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on the last 10,000 training images (held out) instead of the test set")
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"learning rate (default {d.lr:g})")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), help=f"default {d.optimizer}")
    parser.add_argument("--negatives", choices=("hard", "random"), help=f"wrong-label choice (default {d.negatives})")
    parser.add_argument("--goodness", choices=("ssq", "neg_ssq", "sum"), help=f"default {d.goodness}")
    parser.add_argument("--temperature", type=float, help="T in sigmoid((G - threshold) / T) (default: the width)")
    parser.add_argument("--seed", type=int, help=f"default {d.seed}")
    parser.add_argument("--device", help=f"cpu, cuda, cuda:1, ... (default {d.device})")
    parser.add_argument("--backend", choices=("auto", "reference", "cpu", "triton"), help=f"default {d.backend}")
    parser.add_argument("--bf16", action="store_const", const="bfloat16", dest="compute_dtype",
                        help="bf16 GEMMs (CPU backend); parameters stay float32")
    parser.add_argument("--data-dir",
                        help="folder with the four MNIST IDX files (default: $FF_KERNELS_DATA/mnist or download)")


ARGUMENTS = {"supervised": _add_supervised_arguments}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per recipe in ``ff_kernels.recipes.RECIPES``."""
    parser = argparse.ArgumentParser(prog="ff-train", description="Train a Forward-Forward recipe.")
    commands = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, recipe in RECIPES.items():
        sub = commands.add_parser(name, help=(recipe.__doc__ or "").split("\n")[0],
                                  argument_default=argparse.SUPPRESS)
        ARGUMENTS[name](sub)
        _add_run_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, return the exit status."""
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    recipe_cls = RECIPES[options.pop("recipe")]
    run_dir = options.pop("run_dir", None)
    resume = options.pop("resume", False)
    progress = not options.pop("no_progress", False)
    if resume:
        if run_dir is None:
            parser.error("--resume needs --run-dir")
        saved = Path(run_dir) / CONFIG
        if not saved.is_file():
            parser.error(f"--resume: {saved} does not exist")
        options = {**json.loads(saved.read_text()), **options}
    if run_dir is None:
        run_dir = f"runs/{recipe_cls.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    elif not resume and (Path(run_dir) / CHECKPOINT).exists():
        parser.error(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or another --run-dir")
    try:
        config = recipe_cls.Config(**options)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    try:
        train(recipe_cls(config), run_dir, resume=resume, progress=progress)
    except (MnistMissingError, MnistCorruptError, CheckpointError, FileExistsError) as err:
        print(f"ff-train: error: {err}", file=sys.stderr)
        return 1
    return 0
