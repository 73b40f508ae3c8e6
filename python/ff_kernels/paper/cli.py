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
import json
import os
import sys
import time
from pathlib import Path

from ..distributed.context import MODES
from .data import DataError, MnistCorruptError, MnistMissingError
from .recipes import (
    RECIPES,
    BackpropMNISTConfig,
    JitterMNISTConfig,
    LocalMNISTConfig,
    SupervisedMNISTConfig,
    UnsupervisedMNISTConfig,
)
from .recipes.checks import add_mnist_subset_arguments
from .recipes.schedule import LR_SCHEDULES, SCHEDULE_HELP
from .train import CHECKPOINT, CONFIG, CheckpointError, train


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="where config, metrics and checkpoints go (default runs/RECIPE-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--parallel", choices=MODES,
                        help="train on several processes: data (replicas, sharded batches) or pipeline (a group of "
                             "layers per process); with --nproc N, or under torchrun (default data with --nproc)")
    parser.add_argument("--nproc", type=int,
                        help="start N processes on this machine (gloo on CPU, NCCL with one GPU each)")
    parser.add_argument("--sync-every", type=int,
                        help="pipeline: batches between refreshes of rank 0's copy of the whole net (default 10)")


def _add_supervised_arguments(parser: argparse.ArgumentParser) -> None:
    d = SupervisedMNISTConfig()
    parser.add_argument("--epochs", type=int, help=f"number of epochs (default {d.epochs})")
    parser.add_argument("--width", type=int, help=f"ReLUs per hidden layer (default {d.width})")
    parser.add_argument("--depth", type=int, help=f"number of hidden layers (default {d.depth})")
    add_mnist_subset_arguments(parser)
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"learning rate of the FF layers (default {d.lr:g})")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help=f"default {d.optimizer}")
    parser.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum:g})")
    parser.add_argument("--weight-decay", type=float, help=f"FF layers' weight decay (default {d.weight_decay:g})")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                        help=f"{SCHEDULE_HELP} (default {d.lr_schedule})")
    parser.add_argument("--head-lr", type=float, help=f"learning rate of the softmax head (default {d.head_lr:g})")
    parser.add_argument("--head-weight-decay", type=float, help=f"default {d.head_weight_decay:g}")
    parser.add_argument("--peer-norm", type=float, help=f"peer-normalization strength, 0 = off (default {d.peer_norm:g})")
    parser.add_argument("--negatives", choices=("hard", "random"), help=f"wrong-label choice (default {d.negatives})")
    parser.add_argument("--goodness", choices=("ssq", "neg_ssq", "sum"), help=f"default {d.goodness}")
    parser.add_argument("--temperature", type=float,
                        help=f"T in sigmoid((G - threshold) / T), threshold = width (default {d.temperature:g})")
    parser.add_argument("--length-norm", action="store_false", dest="rms_norm",
                        help="pass on activities scaled to unit length (default: unit mean square)")
    parser.add_argument("--no-input-norm", action="store_false", dest="input_norm",
                        help="feed the raw pixels (default: input rows scaled to unit mean square)")
    parser.add_argument("--init", choices=("normal", "uniform"), help=f"weight initialization (default {d.init})")
    parser.add_argument("--seed", type=int, help=f"default {d.seed}")
    parser.add_argument("--device", help=f"cpu, cuda, cuda:1, ... (default {d.device})")
    parser.add_argument("--backend", choices=("auto", "reference", "cpu", "triton"), help=f"default {d.backend}")
    parser.add_argument("--bf16", action="store_const", const="bfloat16", dest="compute_dtype",
                        help="bf16 GEMMs (CPU backend); parameters stay float32")
    parser.add_argument("--data-dir",
                        help="folder with the four MNIST IDX files (default: $FF_KERNELS_DATA/mnist or download)")


def _add_jitter_arguments(parser: argparse.ArgumentParser) -> None:
    _add_supervised_arguments(parser)
    d = JitterMNISTConfig()
    for action in parser._actions:
        if "--epochs" in action.option_strings:
            action.help = f"number of epochs (default {d.epochs}, the paper's)"
    parser.add_argument("--max-shift", type=int,
                        help=f"largest shift in pixels in each direction, zero-filled (default {d.max_shift}: 25 shifts)")


def _add_backprop_arguments(parser: argparse.ArgumentParser) -> None:
    d = BackpropMNISTConfig()
    parser.add_argument("--epochs", type=int, help=f"number of epochs (default {d.epochs})")
    parser.add_argument("--width", type=int, help=f"ReLUs per hidden layer (default {d.width})")
    parser.add_argument("--depth", type=int, help=f"number of hidden layers (default {d.depth})")
    add_mnist_subset_arguments(parser)
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"initial learning rate (default {d.lr:g})")
    parser.add_argument("--lr-decay", type=float,
                        help=f"learning-rate factor per epoch, applied per step; 1 = constant (default {d.lr_decay:g})")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), help=f"sgd has momentum 0.9 (default {d.optimizer})")
    parser.add_argument("--weight-decay", type=float, help=f"L2 coefficient (default {d.weight_decay:g})")
    parser.add_argument("--dropout", type=float, help=f"drop probability of the hidden units (default {d.dropout:g})")
    parser.add_argument("--seed", type=int, help=f"default {d.seed}")
    parser.add_argument("--device", help=f"cpu, cuda, cuda:1, ... (default {d.device})")
    parser.add_argument("--data-dir",
                        help="folder with the four MNIST IDX files (default: $FF_KERNELS_DATA/mnist or download)")


def _add_hybrid_arguments(parser: argparse.ArgumentParser, d) -> None:
    """Options shared by the recipes with hybrid negatives (unsupervised, local); ``d`` their default config."""
    parser.add_argument("--epochs", type=int, help=f"number of epochs (default {d.epochs}, the paper's)")
    parser.add_argument("--head-layers", type=int,
                        help=f"the softmax reads the last N hidden layers (default {d.head_layers})")
    parser.add_argument("--blur-steps", type=int, help=f"blurring passes of the hybrid masks (default {d.blur_steps})")
    add_mnist_subset_arguments(parser)
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"learning rate of the FF layers (default {d.lr:g})")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help=f"default {d.optimizer}")
    parser.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum:g})")
    parser.add_argument("--weight-decay", type=float, help=f"FF layers' weight decay (default {d.weight_decay:g})")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                        help=f"{SCHEDULE_HELP} (default {d.lr_schedule})")
    parser.add_argument("--head-lr", type=float, help=f"learning rate of the softmax (default {d.head_lr:g})")
    parser.add_argument("--head-weight-decay", type=float, help=f"default {d.head_weight_decay:g}")
    parser.add_argument("--peer-norm", type=float, help=f"peer-normalization strength, 0 = off (default {d.peer_norm:g})")
    parser.add_argument("--goodness", choices=("ssq", "neg_ssq", "sum"), help=f"default {d.goodness}")
    parser.add_argument("--temperature", type=float,
                        help=f"T in sigmoid((G - N) / T), N the layer's units (default {d.temperature:g})")
    parser.add_argument("--length-norm", action="store_false", dest="rms_norm",
                        help="pass on activities scaled to unit length (default: unit mean square)")
    parser.add_argument("--no-input-norm", action="store_false", dest="input_norm",
                        help="feed the raw pixels (default: images scaled to unit mean square)")
    parser.add_argument("--init", choices=("normal", "uniform"), help=f"weight initialization (default {d.init})")
    parser.add_argument("--seed", type=int, help=f"default {d.seed}")
    parser.add_argument("--device", help=f"cpu, cuda, cuda:1, ... (default {d.device})")
    parser.add_argument("--data-dir",
                        help="folder with the four MNIST IDX files (default: $FF_KERNELS_DATA/mnist or download)")
    parser.add_argument("--figures", action="store_true",
                        help="after training, write receptive_fields.png (first layer, like the paper's Figure 2) and "
                             "hybrid_example.png (Figure 1) into the run directory")


def _add_unsupervised_arguments(parser: argparse.ArgumentParser) -> None:
    d = UnsupervisedMNISTConfig()
    _add_hybrid_arguments(parser, d)
    parser.add_argument("--width", type=int, help=f"ReLUs per hidden layer (default {d.width})")
    parser.add_argument("--depth", type=int, help=f"number of hidden layers (default {d.depth})")
    parser.add_argument("--backend", choices=("auto", "reference", "cpu", "triton"), help=f"default {d.backend}")
    parser.add_argument("--bf16", action="store_const", const="bfloat16", dest="compute_dtype",
                        help="bf16 GEMMs (CPU backend); parameters stay float32")


def _add_local_arguments(parser: argparse.ArgumentParser) -> None:
    d = LocalMNISTConfig()
    _add_hybrid_arguments(parser, d)
    parser.add_argument("--channels", type=int, nargs=3, metavar=("C1", "C2", "C3"),
                        help=f"units per location of the three layers (default {' '.join(map(str, d.channels))})")
    parser.add_argument("--backend", choices=("auto", "reference", "cpu", "cuda"), help=f"default {d.backend}")


ARGUMENTS = {"supervised": _add_supervised_arguments, "jitter": _add_jitter_arguments,
             "backprop": _add_backprop_arguments}
ARGUMENTS.update({"unsupervised": _add_unsupervised_arguments, "local": _add_local_arguments})


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per recipe in ``ff_kernels.paper.recipes.RECIPES``."""
    parser = argparse.ArgumentParser(prog="ff-train", description="Train a Forward-Forward recipe.")
    commands = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, recipe in RECIPES.items():
        sub = commands.add_parser(name, help=(recipe.__doc__ or "").split("\n")[0],
                                  argument_default=argparse.SUPPRESS)
        # Recipes outside ARGUMENTS declare their own options: ``add_arguments(parser)``.
        (ARGUMENTS.get(name) or recipe.add_arguments)(sub)
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
    figures = options.pop("figures", False)  # unsupervised and local only
    parallel = _parallel_options(parser, options, recipe_cls)
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
    if parallel is not None:
        return _train_parallel(recipe_cls, options, run_dir, resume, progress, figures, parallel)
    try:
        recipe = recipe_cls(config)
        train(recipe, run_dir, resume=resume, progress=progress)
    except (MnistMissingError, MnistCorruptError, DataError, CheckpointError, FileExistsError) as err:
        print(f"ff-train: error: {err}", file=sys.stderr)
        return 1
    if figures:
        from .figures import write_run_figures

        for path in write_run_figures(recipe, run_dir):
            print(f"wrote {path}")
    return 0


def _parallel_options(parser: argparse.ArgumentParser, options: dict, recipe_cls) -> dict | None:
    """Pop --parallel / --nproc / --sync-every; None for a single-process run.

    Returns {"mode", "nproc" (None under torchrun), "sync_every"}. A parallel run needs either
    --nproc or torchrun's environment (RANK, WORLD_SIZE, ...), not both.
    """
    mode, nproc = options.pop("parallel", None), options.pop("nproc", None)
    sync_every = options.pop("sync_every", 10)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if mode is None and nproc is None:
        return None
    if nproc is not None and under_torchrun:
        parser.error("--nproc starts processes itself: leave it out under torchrun (torchrun --nproc-per-node N)")
    if nproc is None and not under_torchrun:
        parser.error(f"--parallel {mode} needs --nproc N, or the processes started by torchrun")
    if nproc is not None and nproc < 1:
        parser.error(f"--nproc must be >= 1, got {nproc}")
    if sync_every < 1:
        parser.error(f"--sync-every must be >= 1, got {sync_every}")
    if not hasattr(recipe_cls, "enable_parallel"):
        supported = sorted(name for name, cls in RECIPES.items() if hasattr(cls, "enable_parallel"))
        parser.error(f"recipe {recipe_cls.name!r} does not support --parallel / --nproc yet; these do: {supported}")
    if mode == "pipeline" and not hasattr(recipe_cls, "train_pipeline_epoch"):
        supported = sorted(name for name, cls in RECIPES.items() if hasattr(cls, "train_pipeline_epoch"))
        parser.error(f"recipe {recipe_cls.name!r} supports --parallel data only; --parallel pipeline: {supported}")
    return {"mode": mode or "data", "nproc": nproc, "sync_every": sync_every}


def _train_parallel(recipe_cls, options: dict, run_dir, resume: bool, progress: bool, figures: bool,
                    parallel: dict) -> int:
    """Run :func:`_parallel_worker` on every rank: in ``nproc`` new processes, or in this one under torchrun."""
    from torch.multiprocessing import ProcessRaisedException

    from ..distributed import init_from_env, spawn

    args = (recipe_cls.name, options, str(run_dir), resume, progress, figures, parallel["mode"], parallel["sync_every"])
    if parallel["nproc"] is None:
        device = init_from_env()
        try:
            _parallel_worker(int(os.environ["RANK"]), device, *args)
        finally:
            import torch.distributed as dist

            dist.destroy_process_group()
        return 0
    try:
        spawn(_parallel_worker, parallel["nproc"], args=args, threads=max(1, (os.cpu_count() or 1) // parallel["nproc"]))
    except ProcessRaisedException as err:
        print(f"ff-train: error in a training process:\n{err}", file=sys.stderr)
        return 1
    return 0


def _parallel_worker(rank: int, device, name: str, options: dict, run_dir: str, resume: bool, progress: bool,
                     figures: bool, mode: str, sync_every: int) -> None:
    """One rank of a parallel run: the recipe on ``device`` (cuda:LOCAL_RANK with NCCL), trained with a
    context; rank 0 writes the figures when asked."""
    from ..distributed.context import ParallelContext

    recipe_cls = RECIPES[name]
    if device.type == "cuda":
        options = {**options, "device": str(device)}
    recipe = recipe_cls(recipe_cls.Config(**options))
    context = ParallelContext(mode, sync_every)
    recipe.enable_parallel(context)
    train(recipe, run_dir, resume=resume, progress=progress, parallel=context)
    if figures and context.is_writer:
        from .figures import write_run_figures

        for path in write_run_figures(recipe, run_dir):
            print(f"wrote {path}")
