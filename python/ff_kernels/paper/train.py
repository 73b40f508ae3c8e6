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

Safety (see :mod:`ff_kernels.paper.run_dir` and :mod:`ff_kernels.paper.guard`): the process
writing a run directory holds its lock (``.ff-train.lock``) for the whole run, so a second
writer is refused; a fresh run refuses a directory that already holds files unless told to
``overwrite``; temp files of interrupted writes are deleted; a run that diverges stops with
:class:`~ff_kernels.paper.guard.TrainingDiverged` before anything non-finite is checkpointed;
every JSON file is strict JSON (no NaN or Infinity).

Parallel runs (``parallel``, a :class:`~ff_kernels.distributed.context.ParallelContext`): every
rank runs this loop with the same seed; rank 0 alone shows progress and writes the run
directory; the epoch's loss and error counts are summed over the ranks. Resuming reads the
checkpoint on every rank, so the run directory must be on a file system all ranks see.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from ..nn import GoodnessOverflowError
from ..ops import validation
from . import guard
from . import run_dir as run_dirs
from .guard import NonFinite, TrainingDiverged
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
    An OS error (a full disk, a read-only folder, ...) is raised as an OSError with its errno
    and ``path`` as the file name, also when ``write`` reported it otherwise (torch.save turns
    a failed write into a RuntimeError).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    created = False
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            created = True
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if created:
            with contextlib.suppress(OSError):  # the write's error is the one to report
                tmp.unlink()
        cause = _os_error_in(err)
        if cause is not None:
            raise OSError(cause.errno, cause.strerror or os.strerror(cause.errno), str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError with an errno that caused ``err`` (``err`` itself, or one in its chain)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``; an OS error names ``path``."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        if err.errno is None or err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


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
    saved = read_run_config(recipe_cls, run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT)
    bad = guard.nonfinite_names(state["model"].items())
    if bad:
        raise CheckpointError(f"checkpoint {run_dir / CHECKPOINT} holds NaN or Inf in {guard.describe_names(bad)}: "
                              "the run diverged; it cannot be used")
    config = recipe_cls.Config(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
    recipe = recipe_cls(config)
    recipe.model.load_state_dict(state["model"])
    return recipe, state["epoch"]


def read_run_config(recipe_cls: Any, run_dir: str | os.PathLike) -> dict:
    """The config.json of the ``recipe_cls`` run in ``run_dir``, checked: strict JSON, an object,
    the fields of ``recipe_cls.Config`` (see :func:`config_mismatch`; the message names the
    recipes it does fit) with valid values. Raises CheckpointError."""
    config_path = Path(run_dir) / CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG} in {run_dir}: expected the directory of an ff-train run")
    try:
        saved = guard.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is damaged: not valid JSON ({err})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{config_path} is damaged: expected a JSON object (the run's config), "
                              f"got {type(saved).__name__}")
    mismatch = config_mismatch(recipe_cls.Config, saved)
    if mismatch:
        from .recipes import RECIPES

        fits = [name for name, cls in RECIPES.items() if config_mismatch(cls.Config, saved) is None]
        hint = f"; it is the config of a {' or '.join(fits)} run" if fits else ""
        raise CheckpointError(f"{config_path} is not the config of an ff-train {recipe_cls.name} run: {mismatch}{hint}")
    try:
        recipe_cls.Config(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path} holds an invalid config: {err}") from None
    return saved


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
    atomic_write(run_dir / METRICS, lambda f: f.writelines(guard.dumps(m) + "\n" for m in history), mode="w")


class EpochTotals:
    """Running sums of one epoch: loss over steps, training errors over rows.

    Every loss added is checked to be finite (see :class:`~ff_kernels.paper.guard.LossCheck`):
    a NaN or Inf raises :class:`~ff_kernels.paper.guard.NonFinite` naming the step or, on a
    GPU, the range of steps since the last check.
    """

    def __init__(self) -> None:
        self.loss_sum, self.steps, self.errors, self.rows = 0.0, 0, 0.0, 0
        self.total_steps = 0  # steps with a loss on all ranks, set by means()
        self.loss_check = guard.LossCheck(POSTFIX_EVERY)

    def add(self, loss: torch.Tensor | None = None, errors: torch.Tensor | int = 0, rows: int = 0) -> None:
        """One step's loss (0-dim, or None for a step whose loss another rank records), its errors and rows."""
        if loss is not None:
            self.loss_sum = self.loss_sum + (loss.detach() if torch.is_tensor(loss) else loss)
            self.steps += 1
            self.loss_check.add(loss, self.loss_sum)
        self.errors = self.errors + errors
        self.rows += rows

    def postfix(self) -> dict[str, str]:
        return {"loss": f"{float(self.loss_sum) / max(self.steps, 1):.4f}", "err": f"{float(self.errors) / max(self.rows, 1):.4f}"}

    def means(self, parallel: ParallelContext | None) -> tuple[float, float]:
        """(mean loss per step, error rate), over all ranks when ``parallel``."""
        self.loss_check.finish(self.loss_sum)
        sums = [float(self.loss_sum), float(self.steps), float(self.errors), float(self.rows)]
        loss_sum, steps, errors, rows = parallel.sum(sums) if parallel is not None else sums
        self.total_steps = int(steps)
        return loss_sum / max(steps, 1), errors / max(rows, 1)


def _run_epoch(recipe: Recipe, generator: torch.Generator, epoch: int, progress: bool,
               parallel: ParallelContext | None) -> dict[str, float]:
    """Train one epoch with a tqdm bar showing the running loss and train error.

    Raises NonFinite when a loss is NaN or Inf, or when a step fails while the model holds
    non-finite values (a diverged step, not a bug); ValueError when the epoch has no step.
    """
    totals = EpochTotals()
    batches = recipe.epoch_batches(generator)
    if len(batches) == 0:
        raise ValueError(_no_batch_message(recipe, epoch))
    desc = f"epoch {epoch}/{recipe.config.epochs}"
    step = 0
    with tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        try:
            if parallel is not None and parallel.mode == "pipeline":
                recipe.train_pipeline_epoch(bar, generator, totals)
            else:
                for step, batch in enumerate(bar, 1):
                    loss, errors, n = recipe.train_step(batch, generator)
                    totals.add(loss, errors, n)
                    if step % POSTFIX_EVERY == 0:
                        bar.set_postfix(totals.postfix())
        except (NonFinite, KeyboardInterrupt):
            raise
        except Exception as err:
            where = (step, step) if step else None
            if isinstance(err, GoodnessOverflowError):
                raise NonFinite(f"the goodness of {err.layer} overflows float32 (inputs up to |x| = "
                                f"{err.largest_input:.3g}, weights up to |w| = {err.largest_weight:.3g})", where) from err
            bad = guard.nonfinite_state(recipe.model, recipe.optimizer)
            if not bad:
                raise
            raise NonFinite(f"NaN or Inf in {guard.describe_names(bad)} made the step fail ({type(err).__name__}: "
                            f"{_first_line(err)})", where) from err
    loss, error = totals.means(parallel)
    if totals.total_steps == 0:
        raise ValueError(_no_batch_message(recipe, epoch))
    return {"train_loss": loss, recipe.train_error_name: error}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _no_batch_message(recipe: Recipe, epoch: int) -> str:
    config = recipe.config
    sizes = ", ".join(f"{name} {getattr(config, name)}" for name in ("train_subset", "batch_size") if hasattr(config, name))
    return (f"{getattr(recipe, 'name', type(recipe).__name__)}: epoch {epoch} has no training step ({sizes}): "
            "train on more images (--train-subset) or in smaller batches")


def _diverged(recipe: Recipe, run_dir: Path, epoch: int, what: str, steps: tuple[int, int] | None,
              last_good: int, writer: bool, local: bool = True) -> TrainingDiverged:
    """The one-line TrainingDiverged of a run stopped in ``epoch`` (see the guard module)."""
    name = getattr(recipe, "name", type(recipe).__name__)
    if steps is None:
        where = f"in epoch {epoch}"
    elif steps[0] == steps[1]:
        where = f"in epoch {epoch} at step {steps[0]}"
    else:
        where = f"in epoch {epoch} between steps {steps[0]} and {steps[1]}"
    if not writer:
        kept = ""
    elif last_good > 0:
        kept = f"; {run_dir / CHECKPOINT} still holds the last good state (epoch {last_good})"
    else:
        kept = "; no checkpoint was written"
    return TrainingDiverged(f"training diverged: {name} {where}: {what}{kept}; {guard.lr_hint(recipe.config)}",
                            local=local)


def _check_state(recipe: Recipe, parallel: ParallelContext | None, run_dir: Path, epoch: int, last_good: int,
                 writer: bool) -> None:
    """Before evaluating and checkpointing: no layer saw a NaN or Inf input on the device this
    epoch (the deferred CUDA checks of :func:`~ff_kernels.ops.validation.raise_deferred_checks`,
    read here once) and the model's and optimizer's state is finite, on every rank (one
    all_reduce of the counts in a parallel run); else TrainingDiverged."""
    problems = []
    try:
        validation.raise_deferred_checks()
    except ValueError as err:
        problems.append(str(err))
    bad = guard.nonfinite_state(recipe.model, recipe.optimizer)
    if bad:
        problems.append(f"NaN or Inf in {guard.describe_names(bad)} at the end of the epoch")
    anywhere = parallel.sum([float(len(problems))])[0] if parallel is not None else len(problems)
    if anywhere:
        what = "; ".join(problems) if problems else "another rank holds NaN or Inf at the end of the epoch"
        raise _diverged(recipe, run_dir, epoch, what, None, last_good, writer, local=bool(problems))


def train(recipe: Recipe, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
          parallel: ParallelContext | None = None, overwrite: bool = False) -> dict:
    """Train ``recipe`` up to ``recipe.config.epochs`` epochs, checkpointing into ``run_dir``.

    With ``resume`` the run continues from ``run_dir/checkpoint.pt``. Without it ``run_dir``
    must be new or empty, unless ``overwrite``: then the files of a previous run there are
    deleted (:func:`~ff_kernels.paper.run_dir.delete_run_files`; other files stay). The writer
    holds the directory's lock throughout (a second writer gets RunDirInUse). ``parallel``:
    this rank's context in a parallel run (the recipe must already have it, see the module
    docstring). A run that diverges raises TrainingDiverged and writes nothing non-finite. A
    fresh run that fails before its first checkpoint deletes the config.json and metrics.jsonl
    it wrote (and the directory, if it made it and it is left empty).
    Returns the summary (also written to ``summary.json`` and printed as one line, by rank 0).
    """
    writer = parallel is None or parallel.is_writer
    progress = progress and writer
    run_dir = Path(run_dir)
    if writer:
        run_dirs.check_path(run_dir)
        if not resume:
            run_dirs.check_fresh(run_dir, overwrite)  # refuse before creating anything
    with run_dirs.hold(run_dir, enabled=writer):
        if writer:
            run_dirs.remove_stale_temp_files(run_dir)
            if not resume:
                run_dirs.check_fresh(run_dir, overwrite)  # again, now that no one else can write there
                if overwrite:
                    run_dirs.delete_run_files(run_dir)
        try:
            return _train(recipe, run_dir, resume, progress, parallel, writer)
        except BaseException:
            if writer and not resume and not (run_dir / CHECKPOINT).exists():
                # a fresh run stopped before its first checkpoint: nothing of it is worth keeping
                for name in (CONFIG, METRICS):
                    with contextlib.suppress(OSError):
                        (run_dir / name).unlink()
            raise


def _train(recipe: Recipe, run_dir: Path, resume: bool, progress: bool, parallel: ParallelContext | None,
           writer: bool) -> dict:
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
        if state["epoch"] > recipe.config.epochs:
            raise CheckpointError(f"{checkpoint_path} has finished {state['epoch']} epochs: resume it with --epochs "
                                  f"{state['epoch']} or more, not {recipe.config.epochs}")
        bad = guard.nonfinite_names(state["model"].items())
        if bad:
            raise CheckpointError(f"checkpoint {checkpoint_path} holds NaN or Inf in {guard.describe_names(bad)}: "
                                  "the run had diverged; start afresh with --overwrite")
        recipe.model.load_state_dict(state["model"])
        recipe.optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            if state.get("scheduler") is None:
                raise CheckpointError(f"checkpoint {checkpoint_path} has no learning-rate scheduler state to resume")
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generator)
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed_s"]
    if writer:
        atomic_write(run_dir / CONFIG, lambda f: guard.dump(config, f, indent=2), mode="w")
        _write_metrics(run_dir, history)  # drops lines of epochs after the checkpoint, if any

    last_good = start_epoch
    for epoch in range(start_epoch + 1, recipe.config.epochs + 1):
        started = time.perf_counter()
        try:
            metrics = {"epoch": epoch, **_run_epoch(recipe, generator, epoch, progress, parallel)}
        except NonFinite as bad:
            raise _diverged(recipe, run_dir, epoch, bad.what, bad.steps, last_good, writer) from bad
        metrics["train_s"] = time.perf_counter() - started
        if scheduler is not None:
            scheduler.step()
        _check_state(recipe, parallel, run_dir, epoch, last_good, writer)
        if evaluation_due(epoch, recipe.config):
            metrics.update(recipe.evaluate())
        metrics["epoch_s"] = time.perf_counter() - started
        bad_metrics = guard.nonfinite_values(metrics)
        if bad_metrics:
            what = "; ".join(f"{key} is {metrics[key]}" for key in bad_metrics)
            raise _diverged(recipe, run_dir, epoch, what, None, last_good, writer)
        elapsed += metrics["epoch_s"]
        history.append(metrics)
        last_good = epoch
        if not writer:
            continue
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "config": config, "model": recipe.model.state_dict(),
            "optimizer": recipe.optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(), "rng": rng_state(generator), "history": history,
            "elapsed_s": elapsed,
        }
        atomic_write(checkpoint_path, lambda f, state=state: torch.save(state, f))
        append_line(run_dir / METRICS, guard.dumps(metrics))
        if progress:
            tqdm.write(f"epoch {epoch}: " + _format_metrics(metrics))

    summary = {**history[-1], "wall_s": elapsed}
    if writer:
        atomic_write(run_dir / SUMMARY, lambda f: guard.dump(summary, f, indent=2), mode="w")
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
