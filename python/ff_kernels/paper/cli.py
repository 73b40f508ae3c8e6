"""The ``ff-train`` command: ``ff-train RECIPE [options]`` trains one recipe into a run directory.

    ff-train supervised --epochs 1 --train-subset 10000 --width 500 --depth 2 --data-dir DIR
    ff-train supervised --run-dir runs/x --resume --epochs 10     # continue a run
    ff-train unsupervised --epochs 2 --width 500 --depth 2 --figures   # section 3.2, hybrid negatives
    ff-train local --epochs 1 --train-subset 10000                     # footnote 8's local receptive fields
    ff-train supervised --nproc 2 --parallel data ...                  # 2 local processes, sharded batches
    torchrun --nproc-per-node 4 -m ff_kernels supervised --parallel pipeline ...   # a layer group per GPU

Options left out take the recipe's defaults, or when resuming the saved run's values.

Errors are one line, ``ff-train: error: ...``, with exit status 2 for a bad command line, 3 for
a run stopped because training diverged (NaN or Inf, see :mod:`ff_kernels.paper.guard`), 130
for an interrupt and 1 for everything else (a run directory in use or already holding files, a
damaged file, missing data, a full disk, ...); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..distributed.context import MODES
from . import run_dir as run_dirs
from .options import Option, add_options, check_options
from .recipes import RECIPES
from .train import CHECKPOINT, CONFIG, CheckpointError, read_run_config, train
from .user_errors import EXIT_INTERRUPTED, EXIT_USAGE, check_device, error_line, exit_status


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
    overwrite: bool = Option("start afresh in a --run-dir that already holds files: the previous run's files there "
                             "(config.json, metrics.jsonl, checkpoint.pt, summary.json, readout.json, figures) are "
                             "deleted, any other file stays")(False)
    debug: bool = Option("on an error, show the full traceback instead of one line")(False)

    def __post_init__(self) -> None:
        check_options(self)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per recipe in ``RECIPES``, whose options are the fields
    of its config and of :class:`RunOptions` (defaults suppressed: options left out take the
    recipe's defaults, or when resuming the saved run's values)."""
    parser = _Parser(prog="ff-train", description="Train a Forward-Forward recipe.")
    commands = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, recipe in RECIPES.items():
        sub = commands.add_parser(name, help=(recipe.__doc__ or "").split("\n")[0],
                                  argument_default=argparse.SUPPRESS)
        add_options(sub, recipe.Config)
        add_options(sub, RunOptions, skip=() if hasattr(recipe, "write_figures") else ("figures",))
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ff-train: error: ...`` (exit status 2), no usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"ff-train: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _split_options(options: dict) -> tuple[dict, RunOptions]:
    """The parsed options -> (the recipe's config fields given, the run options)."""
    run_names = {f.name for f in dataclasses.fields(RunOptions)}
    run = RunOptions(**{k: v for k, v in options.items() if k in run_names})
    return {k: v for k, v in options.items() if k not in run_names}, run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, return the exit status.

    Every error becomes one line on stderr and a non-zero status (module docstring); with
    ``--debug`` it is raised with its traceback instead.
    """
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    debug = bool(options.get("debug", False))
    try:
        return _main(parser, options)
    except KeyboardInterrupt:
        if debug:
            raise
        print("ff-train: interrupted (a run with a checkpoint continues from its last finished epoch with --resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        if _under_torchrun() and os.environ.get("RANK") != "0" and not getattr(err, "local", True):
            return exit_status(err)  # another rank reports it
        print(f"ff-train: error: {error_line(err)}", file=sys.stderr)
        return exit_status(err)


def _main(parser: argparse.ArgumentParser, options: dict) -> int:
    recipe_cls = RECIPES[options.pop("recipe")]
    try:
        options, run = _split_options(options)
    except ValueError as err:
        parser.error(str(err))
    _check_parallel(parser, run, recipe_cls)
    writer = not _under_torchrun() or os.environ.get("RANK") == "0"
    if run.resume:
        if run.run_dir is None:
            parser.error("--resume needs --run-dir")
        if run.overwrite:
            parser.error("--resume continues the run in --run-dir, --overwrite starts one afresh there: give one of them")
        run_dirs.check_not_in_use(run.run_dir)
        saved = Path(run.run_dir) / CONFIG
        if not saved.is_file():
            parser.error(f"--resume: {saved} does not exist" + (
                f" ({run.run_dir} is not an ff-train run directory)" if Path(run.run_dir).is_dir() else ""))
        options = {**read_run_config(recipe_cls, run.run_dir), **options}
        if not (Path(run.run_dir) / CHECKPOINT).exists():
            raise CheckpointError(f"no checkpoint at {Path(run.run_dir) / CHECKPOINT}: the run stopped before finishing "
                                  "its first epoch; start it afresh with --overwrite instead of --resume")
    elif run.run_dir is not None and writer:
        run_dirs.check_fresh(run.run_dir, run.overwrite)  # refuse before loading anything
    try:
        config = recipe_cls.Config(**options)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    check_device(config.device)
    _check_world_size(parser, run, config)
    created: tuple[Path, ...] = ()
    if run.run_dir is None:
        base = f"runs/{recipe_cls.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run.run_dir, created = run_dirs.claim_default(base) if writer else (base, ())
    if run.parallel is not None or run.nproc is not None:
        return _train_parallel(recipe_cls, options, run, created)
    with run_dirs.hold(run.run_dir, created=created):
        recipe = recipe_cls(config)
        if not run.no_progress and hasattr(recipe, "data_source"):
            print(f"data: {recipe.data_source}", flush=True)
        train(recipe, run.run_dir, resume=run.resume, progress=not run.no_progress, overwrite=run.overwrite)
        if run.figures:
            for path in recipe.write_figures(run.run_dir):
                print(f"wrote {path}")
    return 0


def _check_world_size(parser: argparse.ArgumentParser, run: RunOptions, config) -> None:
    """Data-parallel ranks train on equal slices of every batch: refuse a batch size that is not a
    multiple of the number of processes before starting them."""
    if run.parallel is None and run.nproc is None:
        return
    world = run.nproc if run.nproc is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if run.nproc is not None:  # processes this command starts on this machine: one per GPU, or per CPU core
        import torch

        cuda = str(config.device).startswith("cuda")
        available = torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
        if run.nproc > available:
            parser.error(f"--nproc {run.nproc}: this machine has {available} {'GPUs' if cuda else 'CPU cores'}; "
                         f"start at most that many processes (more ranks across machines: torchrun)")
    if (run.parallel or "data") == "data" and config.batch_size % world:
        parser.error(f"--parallel data: the batch size ({config.batch_size}) must be a multiple of the number of "
                     f"processes ({world})")


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


def _train_parallel(recipe_cls, options: dict, run: RunOptions, created: tuple[Path, ...] = ()) -> int:
    """Run :func:`_parallel_worker` on every rank: in ``run.nproc`` new processes, or in this one under torchrun.

    With ``--nproc`` a rank that fails writes its one-line error into a folder this process
    reads, so that the failure is reported as one line (the traceback with ``--debug``).
    """
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

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
    errors = tempfile.mkdtemp(prefix="ff-train-errors-")
    # torch logs a warning per process it stops after another failed; the failure's own line says it all
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    if not run.debug:
        spawn_log.setLevel(logging.ERROR)
    try:
        spawn(_parallel_worker, run.nproc, args=(*args, errors), threads=max(1, (os.cpu_count() or 1) // run.nproc))
    except (ProcessRaisedException, ProcessExitedException) as err:
        reports = sorted(Path(errors).iterdir())
        if reports:
            status, line = reports[0].read_text().split("\n", 1)
            print(f"ff-train: error: {line}", file=sys.stderr)
            return int(status)
        if run.debug:
            print(f"ff-train: error in a training process:\n{err}", file=sys.stderr)
        else:
            print(f"ff-train: error: a training process failed: {_last_line(str(err))} "
                  "(run again with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        spawn_log.setLevel(level)
        shutil.rmtree(errors, ignore_errors=True)
        for path in created:  # a default run directory left empty by a failed start
            try:
                path.rmdir()
            except OSError:
                break
    return 0


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _parallel_worker(rank: int, device, name: str, options: dict, run: RunOptions, errors: str | None = None) -> None:
    """One rank of a parallel run: the recipe on ``device`` (cuda:LOCAL_RANK with NCCL), trained with a
    context; rank 0 writes the figures when asked. ``errors``: with ``--nproc``, the folder where
    a failing rank leaves its one-line error (named so that a rank that found the problem sorts
    before the ranks that stopped because of it) before exiting."""
    try:
        _train_rank(device, name, options, run)
    except BaseException as err:
        if errors is None or run.debug or isinstance(err, SystemExit):
            raise
        status = EXIT_INTERRUPTED if isinstance(err, KeyboardInterrupt) else exit_status(err)
        line = "interrupted" if isinstance(err, KeyboardInterrupt) else error_line(err)
        order = 0 if getattr(err, "local", True) else 1
        Path(errors, f"{order}-{rank:05d}").write_text(f"{status}\n{line}")
        raise SystemExit(status) from None


def _train_rank(device, name: str, options: dict, run: RunOptions) -> None:
    from ..distributed.context import ParallelContext

    recipe_cls = RECIPES[name]
    if device.type == "cuda":
        options = {**options, "device": str(device)}
    recipe = recipe_cls(recipe_cls.Config(**options))
    context = ParallelContext(run.parallel, run.sync_every)
    recipe.enable_parallel(context)
    train(recipe, run.run_dir, resume=run.resume, progress=not run.no_progress, parallel=context,
          overwrite=run.overwrite)
    if run.figures and context.is_writer:
        with run_dirs.hold(run.run_dir):
            for path in recipe.write_figures(run.run_dir):
                print(f"wrote {path}")
