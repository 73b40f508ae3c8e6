"""The training loop shared by the recipes: progress bar, metrics log, checkpoints and resume.

A run directory holds:

    config.json      the recipe's config (written at the start of every session)
    metrics.jsonl    one JSON object per finished epoch
    checkpoint.pt    the state after the last finished epoch: model, optimizer, learning-rate
                     scheduler (if the recipe has one), RNG states
                     (torch, CUDA, numpy, python ``random`` and the data generator), metrics
                     history and elapsed time; replaced atomically each epoch
    summary.json     the final result, written when the last epoch is done

Resuming restores everything in the checkpoint, so 1 epoch + resume + 1 epoch gives the same
weights as 2 epochs straight.

Parallel runs (``parallel``, a :class:`~ff_kernels.distributed.context.ParallelContext`): every
rank runs this loop with the same seed; rank 0 alone shows progress and writes the run
directory; the epoch's loss and error counts are summed over the ranks. Resuming reads the
checkpoint on every rank, so the run directory must be on a file system all ranks see.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .options import OPTION

if TYPE_CHECKING:
    from ..distributed.context import ParallelContext

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
CHECKPOINT_FORMAT = 1
# Config fields a resumed run may change: they do not alter the trained result.
RESUMABLE_FIELDS = ("epochs", "device", "data_dir", "eval_every")
POSTFIX_EVERY = 20  # batches between progress-bar updates of the running loss and error


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not fit the run it is loaded into."""


class Recipe(Protocol):
    """What :func:`train` needs from a recipe (see ``ff_kernels.paper.recipes``)."""

    config: Any  # a dataclass with at least ``epochs`` and ``seed``; optional ``eval_every`` (see evaluation_due)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    # Optional (None or absent): stepped once after every epoch's training; saved in the checkpoint.
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_error_name: str  # metrics key of the running train error that train_step counts

    def epoch_batches(self, generator: torch.Generator) -> Sequence[Any]:
        """The shuffled batches of one epoch, drawn with ``generator``."""

    def train_step(self, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One update; returns (loss 0-dim, number of training errors 0-dim, batch size)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, e.g. {"test_error": 0.0136}."""

    # Optional, for parallel runs: ``enable_parallel(context)`` (called before training) and, for
    # the pipeline mode, ``train_pipeline_epoch(batches, generator, totals)``, which trains on the
    # epoch's batches and records into ``totals`` (an :class:`EpochTotals`).


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` all-or-nothing: ``write(file)`` into a temp file beside it, fsync, rename.

    ``mode`` is "wb" or "w". A crash leaves either the old file or the new one, never a mix.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state(generator: torch.Generator) -> dict:
    """Every random state a run uses, as tensors and plain Python values (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np_state["state"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; damage raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start without resume, or name the run directory that has one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from err
    expected = {"format", "epoch", "config", "model", "optimizer", "rng", "history", "elapsed_s"}
    if not isinstance(state, dict) or not expected <= state.keys():
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} is not an ff_kernels checkpoint: expected keys {sorted(expected)}, got {found}"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {state['format']}, this version reads format {CHECKPOINT_FORMAT}"
        )
    return state


def config_mismatch(config_cls: type, saved: dict) -> str | None:
    """Why ``saved`` (a run's config.json) is not a ``config_cls`` config, or None when it is.

    Its keys must be fields of ``config_cls``; it may lack fields that have defaults (fields added
    since the run: their defaults keep the behaviour the run had).
    """
    fields = dataclasses.fields(config_cls)
    unexpected = sorted(set(saved) - {f.name for f in fields})
    missing = sorted(f.name for f in fields if f.name not in saved
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return f"missing {missing}, unexpected {unexpected}" if unexpected or missing else None


def load_trained(recipe_cls: Callable[[Any], Recipe], run_dir: str | os.PathLike,
                 **overrides: Any) -> tuple[Recipe, int]:
    """Rebuild a finished or checkpointed run: ``(recipe, finished epochs)``.

    ``recipe_cls`` (e.g. ``RECIPES["cifar"]``) is built from ``run_dir``'s config.json with
    ``overrides`` applied (those given as None are skipped) and loads its checkpoint's weights.
    A config that does not fit ``recipe_cls.Config`` (see :func:`config_mismatch`), e.g. a run
    of another recipe, raises CheckpointError naming the fields.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG} in {run_dir}: expected the directory of an ff-train run")
    saved = json.loads(config_path.read_text())
    mismatch = config_mismatch(recipe_cls.Config, saved) if isinstance(saved, dict) else "not a JSON object"
    if mismatch:
        raise CheckpointError(f"{config_path} is not the config of an ff-train {recipe_cls.name} run: {mismatch}")
    state = load_checkpoint(run_dir / CHECKPOINT)
    config = recipe_cls.Config(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
    recipe = recipe_cls(config)
    recipe.model.load_state_dict(state["model"])
    return recipe, state["epoch"]


def evaluation_due(finished_epochs: int, config: Any) -> bool:
    """Whether :func:`train` evaluates after ``finished_epochs``: after every
    ``config.eval_every``-th epoch (every epoch for a config without that field) and the last.

    Evaluation draws no random numbers from the training streams, so skipping it changes
    nothing else in a run.
    """
    return finished_epochs % getattr(config, "eval_every", 1) == 0 or finished_epochs >= config.epochs


def _check_resumable(saved: dict, current: dict, path: Path, defaults: dict, detected: tuple[str, ...] = ()) -> None:
    """The resumed config may differ from the saved one only in RESUMABLE_FIELDS; a field the
    saved one lacks (added since the run) counts as its default from ``defaults``, and a
    ``detected`` field saved as None (found out when the run starts) accepts what was found."""
    saved = {**defaults, **saved}
    saved.update({k: current.get(k) for k in detected if saved.get(k) is None})
    changed = {k for k in saved.keys() | current.keys() if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k)}
    if changed:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, given {current.get(k)!r}" for k in sorted(changed))
        raise CheckpointError(
            f"cannot resume {path} with a different config ({details}); only {RESUMABLE_FIELDS} may change"
        )


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    atomic_write(run_dir / METRICS, lambda f: f.writelines(json.dumps(m) + "\n" for m in history), mode="w")


class EpochTotals:
    """Running sums of one epoch: loss over steps, training errors over rows."""

    def __init__(self) -> None:
        self.loss_sum, self.steps, self.errors, self.rows = 0.0, 0, 0.0, 0

    def add(self, loss: torch.Tensor | None = None, errors: torch.Tensor | int = 0, rows: int = 0) -> None:
        """One step's loss (0-dim, or None for a step whose loss another rank records), its errors and rows."""
        if loss is not None:
            self.loss_sum = self.loss_sum + loss.detach()
            self.steps += 1
        self.errors = self.errors + errors
        self.rows += rows

    def postfix(self) -> dict[str, str]:
        return {"loss": f"{float(self.loss_sum) / max(self.steps, 1):.4f}", "err": f"{float(self.errors) / max(self.rows, 1):.4f}"}

    def means(self, parallel: ParallelContext | None) -> tuple[float, float]:
        """(mean loss per step, error rate), over all ranks when ``parallel``."""
        sums = [float(self.loss_sum), float(self.steps), float(self.errors), float(self.rows)]
        loss_sum, steps, errors, rows = parallel.sum(sums) if parallel is not None else sums
        return loss_sum / max(steps, 1), errors / max(rows, 1)


def _run_epoch(recipe: Recipe, generator: torch.Generator, epoch: int, progress: bool,
               parallel: ParallelContext | None) -> dict[str, float]:
    """Train one epoch with a tqdm bar showing the running loss and train error."""
    totals = EpochTotals()
    batches = recipe.epoch_batches(generator)
    desc = f"epoch {epoch}/{recipe.config.epochs}"
    with tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        if parallel is not None and parallel.mode == "pipeline":
            recipe.train_pipeline_epoch(bar, generator, totals)
        else:
            for step, batch in enumerate(bar, 1):
                loss, errors, n = recipe.train_step(batch, generator)
                totals.add(loss, errors, n)
                if step % POSTFIX_EVERY == 0:
                    bar.set_postfix(totals.postfix())
    loss, error = totals.means(parallel)
    return {"train_loss": loss, recipe.train_error_name: error}


def train(recipe: Recipe, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
          parallel: ParallelContext | None = None) -> dict:
    """Train ``recipe`` up to ``recipe.config.epochs`` epochs, checkpointing into ``run_dir``.

    With ``resume`` the run continues from ``run_dir/checkpoint.pt``; without it a run
    directory that already has a checkpoint is refused. ``parallel``: this rank's context in a
    parallel run (the recipe must already have it, see the module docstring). Returns the
    summary (also written to ``summary.json`` and printed as one line, by rank 0).
    """
    writer = parallel is None or parallel.is_writer
    progress = progress and writer
    run_dir = Path(run_dir)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(recipe.config)
    checkpoint_path = run_dir / CHECKPOINT
    generator = torch.Generator().manual_seed(int(recipe.config.seed))
    start_epoch, history, elapsed = 0, [], 0.0
    scheduler = getattr(recipe, "scheduler", None)
    if resume:
        state = load_checkpoint(checkpoint_path, map_location=next(recipe.model.parameters()).device)
        defaults = {f.name: f.default for f in dataclasses.fields(recipe.config) if f.default is not dataclasses.MISSING}
        detected = tuple(f.name for f in dataclasses.fields(recipe.config) if getattr(f.metadata.get(OPTION), "detected", False))
        _check_resumable(state["config"], config, checkpoint_path, defaults, detected)
        recipe.model.load_state_dict(state["model"])
        recipe.optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            if state.get("scheduler") is None:
                raise CheckpointError(f"checkpoint {checkpoint_path} has no learning-rate scheduler state to resume")
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generator)
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed_s"]
    elif checkpoint_path.exists():
        raise FileExistsError(f"{run_dir} already holds a checkpoint; resume it or choose another run directory")
    if writer:
        atomic_write(run_dir / CONFIG, lambda f: json.dump(config, f, indent=2), mode="w")
        _write_metrics(run_dir, history)  # drops lines of epochs after the checkpoint, if any

    for epoch in range(start_epoch + 1, recipe.config.epochs + 1):
        started = time.perf_counter()
        metrics = {"epoch": epoch, **_run_epoch(recipe, generator, epoch, progress, parallel)}
        metrics["train_s"] = time.perf_counter() - started
        if scheduler is not None:
            scheduler.step()
        if evaluation_due(epoch, recipe.config):
            metrics.update(recipe.evaluate())
        metrics["epoch_s"] = time.perf_counter() - started
        elapsed += metrics["epoch_s"]
        history.append(metrics)
        if not writer:
            continue
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "config": config, "model": recipe.model.state_dict(),
            "optimizer": recipe.optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(), "rng": rng_state(generator), "history": history,
            "elapsed_s": elapsed,
        }
        atomic_write(checkpoint_path, lambda f, state=state: torch.save(state, f))
        with open(run_dir / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if progress:
            tqdm.write(f"epoch {epoch}: " + _format_metrics(metrics))

    summary = {**history[-1], "wall_s": elapsed}
    if writer:
        atomic_write(run_dir / SUMMARY, lambda f: json.dump(summary, f, indent=2), mode="w")
        print(f"done after {summary['epoch']} epochs: {_format_metrics(summary)}", flush=True)
    return summary


def _format_metrics(metrics: dict) -> str:
    """Error rates as percentages, times in seconds: "test_error 1.36%, ..., wall_s 12.3 s"."""
    parts = []
    for key, value in metrics.items():
        if "_error" in key:
            parts.append(f"{key} {100 * value:.2f}%")
        elif key.endswith("_s"):
            parts.append(f"{key} {value:.1f} s")
        elif key == "train_loss":
            parts.append(f"{key} {value:.4f}")
    return ", ".join(parts)
