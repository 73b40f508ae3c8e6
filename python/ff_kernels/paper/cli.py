"""The ``ff-train`` command: ``ff-train RECIPE [options]`` trains one recipe into a run directory.

    ff-train supervised --epochs 1 --train-subset 10000 --width 500 --depth 2 --data-dir DIR
    ff-train supervised --run-dir runs/x --resume --epochs 10     # continue a run
    ff-train unsupervised --epochs 2 --width 500 --depth 2 --figures   # section 3.2, hybrid negatives
    ff-train local --epochs 1 --train-subset 10000                     # footnote 8's local receptive fields
    ff-train supervised --nproc 2 --parallel data ...                  # 2 local processes, sharded batches
    torchrun --nproc-per-node 4 -m ff_kernels supervised --parallel pipeline ...   # a layer group per GPU

Options left out take the recipe's defaults, or when resuming the saved run's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..distributed.context import MODES
from .data import DataError, MnistCorruptError, MnistMissingError
from .options import Option, add_options, check_options
from .recipes import RECIPES
from .train import CHECKPOINT, CONFIG, CheckpointError, train


@dataclass
class RunOptions:
    """How ``ff-train`` runs a recipe: where to, resuming or not, on how many processes.

    These are not part of the recipe's config (config.json); ``figures`` is offered only by the
    recipes that can draw them (``write_figures``).
    """

    run_dir: str | None = Option("where config, metrics and checkpoints go", none="runs/RECIPE-TIME")(None)
    resume: bool = Option("continue the run in --run-dir from its checkpoint")(False)
    no_progress: bool = Option("no progress bar or per-epoch lines")(False)
    parallel: str | None = Option(
        "train on several processes: data (replicas, sharded batches) or pipeline (a group of layers per process); "
        "with --nproc N, or under torchrun", choices=MODES, none="data with --nproc")(None)
    nproc: int | None = Option("start N processes on this machine (gloo on CPU, NCCL with one GPU each)", min=1)(None)
    sync_every: int = Option("pipeline: batches between refreshes of rank 0's copy of the whole net", min=1)(10)
    figures: bool = Option("after training, write the run's figures (receptive_fields.png like the paper's "
                           "Figure 2, hybrid_example.png like Figure 1) into the run directory")(False)

    def __post_init__(self) -> None:
        check_options(self)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per recipe in ``RECIPES``, whose options are the fields
    of its config and of :class:`RunOptions` (defaults suppressed: options left out take the
    recipe's defaults, or when resuming the saved run's values)."""
    parser = argparse.ArgumentParser(prog="ff-train", description="Train a Forward-Forward recipe.")
    commands = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, recipe in RECIPES.items():
        sub = commands.add_parser(name, help=(recipe.__doc__ or "").split("\n")[0],
                                  argument_default=argparse.SUPPRESS)
        add_options(sub, recipe.Config)
        add_options(sub, RunOptions, skip=() if hasattr(recipe, "write_figures") else ("figures",))
    return parser


def _split_options(options: dict) -> tuple[dict, RunOptions]:
    """The parsed options -> (the recipe's config fields given, the run options)."""
    run_names = {f.name for f in dataclasses.fields(RunOptions)}
    run = RunOptions(**{k: v for k, v in options.items() if k in run_names})
    return {k: v for k, v in options.items() if k not in run_names}, run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, return the exit status."""
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    recipe_cls = RECIPES[options.pop("recipe")]
    try:
        options, run = _split_options(options)
    except ValueError as err:
        parser.error(str(err))
    _check_parallel(parser, run, recipe_cls)
    if run.resume:
        if run.run_dir is None:
            parser.error("--resume needs --run-dir")
        saved = Path(run.run_dir) / CONFIG
        if not saved.is_file():
            parser.error(f"--resume: {saved} does not exist")
        options = {**json.loads(saved.read_text()), **options}
    if run.run_dir is None:
        run.run_dir = f"runs/{recipe_cls.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    elif not run.resume and (Path(run.run_dir) / CHECKPOINT).exists():
        parser.error(f"{run.run_dir} already holds a checkpoint: pass --resume to continue it, or another --run-dir")
    try:
        config = recipe_cls.Config(**options)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    if run.parallel is not None or run.nproc is not None:
        return _train_parallel(recipe_cls, options, run)
    try:
        recipe = recipe_cls(config)
        if not run.no_progress and hasattr(recipe, "data_source"):
            print(f"data: {recipe.data_source}", flush=True)
        train(recipe, run.run_dir, resume=run.resume, progress=not run.no_progress)
    except (MnistMissingError, MnistCorruptError, DataError, CheckpointError, FileExistsError) as err:
        print(f"ff-train: error: {err}", file=sys.stderr)
        return 1
    if run.figures:
        for path in recipe.write_figures(run.run_dir):
            print(f"wrote {path}")
    return 0


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _check_parallel(parser: argparse.ArgumentParser, run: RunOptions, recipe_cls) -> None:
    """A parallel run (--parallel or --nproc) needs either --nproc or torchrun's environment
    (RANK, WORLD_SIZE, ...), not both, and a recipe that supports the mode."""
    if run.parallel is None and run.nproc is None:
        return
    if run.nproc is not None and _under_torchrun():
        parser.error("--nproc starts processes itself: leave it out under torchrun (torchrun --nproc-per-node N)")
    if run.nproc is None and not _under_torchrun():
        parser.error(f"--parallel {run.parallel} needs --nproc N, or the processes started by torchrun")
    if not hasattr(recipe_cls, "enable_parallel"):
        supported = sorted(name for name, cls in RECIPES.items() if hasattr(cls, "enable_parallel"))
        parser.error(f"recipe {recipe_cls.name!r} does not support --parallel / --nproc yet; these do: {supported}")
    if run.parallel == "pipeline" and not hasattr(recipe_cls, "train_pipeline_epoch"):
        supported = sorted(name for name, cls in RECIPES.items() if hasattr(cls, "train_pipeline_epoch"))
        parser.error(f"recipe {recipe_cls.name!r} supports --parallel data only; --parallel pipeline: {supported}")


def _train_parallel(recipe_cls, options: dict, run: RunOptions) -> int:
    """Run :func:`_parallel_worker` on every rank: in ``run.nproc`` new processes, or in this one under torchrun."""
    from torch.multiprocessing import ProcessRaisedException

    from ..distributed import init_from_env, spawn

    run = dataclasses.replace(run, parallel=run.parallel or "data")
    args = (recipe_cls.name, options, run)
    if run.nproc is None:
        device = init_from_env()
        try:
            _parallel_worker(int(os.environ["RANK"]), device, *args)
        finally:
            import torch.distributed as dist

            dist.destroy_process_group()
        return 0
    try:
        spawn(_parallel_worker, run.nproc, args=args, threads=max(1, (os.cpu_count() or 1) // run.nproc))
    except ProcessRaisedException as err:
        print(f"ff-train: error in a training process:\n{err}", file=sys.stderr)
        return 1
    return 0


def _parallel_worker(rank: int, device, name: str, options: dict, run: RunOptions) -> None:
    """One rank of a parallel run: the recipe on ``device`` (cuda:LOCAL_RANK with NCCL), trained with a
    context; rank 0 writes the figures when asked."""
    from ..distributed.context import ParallelContext

    recipe_cls = RECIPES[name]
    if device.type == "cuda":
        options = {**options, "device": str(device)}
    recipe = recipe_cls(recipe_cls.Config(**options))
    context = ParallelContext(run.parallel, run.sync_every)
    recipe.enable_parallel(context)
    train(recipe, run.run_dir, resume=run.resume, progress=not run.no_progress, parallel=context)
    if run.figures and context.is_writer:
        for path in recipe.write_figures(run.run_dir):
            print(f"wrote {path}")
