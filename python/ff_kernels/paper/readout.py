"""A linear softmax fit on the frozen features of a finished hybrid-negative run.

The paper evaluates unsupervised FF (section 3.2) with "the normalized activity vectors of the
last three hidden layers as the inputs to a softmax that is trained to predict the label".
The ``unsupervised`` and ``local`` recipes train such a softmax alongside the FF layers, with
SGD on features that keep changing; it monitors the run but lags behind what the features
support. This module fits the softmax once more after training, on features that no longer
change:

1. the run's checkpoint is loaded into its recipe (``config.json`` + ``checkpoint.pt``);
2. the recipe's head features (``HybridFFNet.head_features``: the normalized outputs of the
   last ``head_layers`` layers) are computed for every training and evaluation image;
3. a softmax (``nn.Linear`` with bias) is trained with Adam on all but the last ``holdout``
   training images, for up to ``epochs`` epochs, once for each weight decay of
   ``weight_decays``; after each epoch its error on the held-out training images is
   measured, and the weight decay and epoch with the lowest one are kept (the first on a
   tie). The evaluation images (the official test set, or the validation split of a
   ``--validation`` run) are not looked at until that choice is made.

``readout.json`` in the run directory records the result: the kept epoch, the held-out and
evaluation errors, the running head's evaluation error for comparison, and the settings.

    ff-readout unsupervised runs/unsupervised-full --data-dir DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .guard import TrainingDiverged, dump, nonfinite_values
from .options import Option, add_options, check_options
from .recipes import RECIPES
from .recipes.unsupervised_mnist import HybridFFNet, UnsupervisedMNIST
from .run_dir import RunLock
from .train import atomic_write, load_trained
from .user_errors import USER_ERRORS, error_line

READOUT = "readout.json"
FEATURE_BATCH = 1000  # images per forward pass when computing the features
# The recipes whose model is a HybridFFNet: real images vs hybrids, a softmax on the top layers.
HYBRID_RECIPES = tuple(sorted(name for name, cls in RECIPES.items() if issubclass(cls, UnsupervisedMNIST)))


@dataclass(frozen=True)
class ReadoutSettings:
    """How the softmax is fit: Adam(``lr``, weight decay), ``batch_size`` rows per step, up to
    ``epochs`` epochs, for each of ``weight_decays``; the last ``holdout`` training rows are held
    out to pick the weight decay and the epoch; shuffling from ``seed``."""

    epochs: int = Option("most epochs of Adam", min=1)(20)
    lr: float = Option("Adam's learning rate", above=0)(1e-3)
    weight_decays: tuple[float, ...] = Option("Adam weight decays to try", min=0, flag="--weight-decay")(
        (0.0, 1e-4, 1e-3))
    batch_size: int = Option("rows per step", min=1)(100)
    holdout: int = Option("last training images held out to pick the epoch", min=1)(10_000)
    seed: int = Option("seed of the shuffling")(0)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class ReadoutRun:
    """Which run ``ff-readout`` reads."""

    recipe: str = Option("the run's recipe", choices=HYBRID_RECIPES, positional=True)()
    run_dir: str = Option("the ff-train run directory (config.json and checkpoint.pt)", positional=True)()
    data_dir: str | None = Option("MNIST folder", none="the one saved in the run's config")(None)


@dataclass
class ReadoutFit:
    """A fitted softmax: ``head`` (the kept epoch's weights), its ``weight_decay``,
    ``best_epoch`` (1-based) and the held-out error after every epoch (``holdout_errors``, one
    per epoch run)."""

    head: nn.Linear
    weight_decay: float
    best_epoch: int
    holdout_errors: list[float] = field(default_factory=list)

    @property
    def holdout_error(self) -> float:
        """The held-out error of the kept epoch."""
        return self.holdout_errors[self.best_epoch - 1]


def error_rate(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``features`` (N, F) whose arg-max logit differs from ``labels`` (N,)."""
    with torch.no_grad():
        wrong = sum((head(x).argmax(1) != y).sum() for x, y in  # on the device, read once
                    zip(features.split(FEATURE_BATCH), labels.split(FEATURE_BATCH)))
    return int(wrong) / labels.shape[0]


def choose_softmax(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   settings: ReadoutSettings) -> tuple[ReadoutFit, list[ReadoutFit]]:
    """:func:`fit_softmax` for each of ``settings.weight_decays``; returns (the fit with the
    lowest held-out error, the first on a tie; all fits, in the order of ``weight_decays``)."""
    fits = [fit_softmax(features, labels, num_classes, settings, wd) for wd in settings.weight_decays]
    return min(fits, key=lambda fit: fit.holdout_error), fits


def fit_softmax(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                settings: ReadoutSettings, weight_decay: float) -> ReadoutFit:
    """Fit a softmax on ``features`` (N, F) float and ``labels`` (N,) int64 in [0, num_classes)
    with Adam's ``weight_decay``.

    The last ``settings.holdout`` rows pick the epoch; the others are trained on. Raises
    ValueError when the shapes disagree or fewer than one training row would remain.
    """
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"expected features (N, F) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if not features.is_floating_point() or labels.dtype != torch.int64 or labels.device != features.device:
        raise ValueError(f"expected float features and int64 labels on one device, got {features.dtype} on "
                         f"{features.device} and {labels.dtype} on {labels.device}")
    n_fit = features.shape[0] - settings.holdout
    if n_fit < 1:
        raise ValueError(f"holdout ({settings.holdout}) must leave training rows: there are {features.shape[0]}")
    fit_x, fit_y = features[:n_fit], labels[:n_fit]
    held_x, held_y = features[n_fit:], labels[n_fit:]
    generator = torch.Generator().manual_seed(settings.seed)
    head = nn.Linear(features.shape[1], num_classes, device=features.device)
    nn.init.zeros_(head.weight)  # the loss is convex in the head: no random start needed
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr, weight_decay=weight_decay)
    best_state, best_error, best_epoch, history = None, float("inf"), 0, []
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(n_fit, generator=generator).to(features.device)
        for rows in order.split(settings.batch_size):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(head(fit_x[rows]), fit_y[rows]).backward()
            optimizer.step()
        history.append(error_rate(head, held_x, held_y))
        if history[-1] < best_error:
            best_error, best_epoch = history[-1], epoch
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return ReadoutFit(head, weight_decay, best_epoch, history)


def frozen_features(model: HybridFFNet, images: torch.Tensor) -> torch.Tensor:
    """The head's input features (N, F) float32 for flat ``images`` (N, 784), in batches."""
    chunks = []
    with torch.no_grad():
        for batch in images.split(FEATURE_BATCH):
            outputs, _ = model.outputs_and_goodness(model.inputs(batch))
            chunks.append(model.head_features(outputs))
    return torch.cat(chunks)


def load_run(recipe_name: str, run_dir: Path, data_dir: str | None = None):
    """(recipe, finished epochs): the hybrid-negative recipe ``recipe_name`` rebuilt from
    ``run_dir`` (see :func:`~ff_kernels.paper.train.load_trained`); ``data_dir`` replaces the saved
    data folder when given."""
    if recipe_name not in HYBRID_RECIPES:
        raise ValueError(f"ff-readout refits the softmax of a hybrid-negative run: expected a recipe in "
                         f"{HYBRID_RECIPES}, got {recipe_name!r}")
    return load_trained(RECIPES[recipe_name], run_dir, data_dir=data_dir)


def readout_run(recipe_name: str, run_dir: str | Path, settings: ReadoutSettings = ReadoutSettings(),
                data_dir: str | None = None) -> dict:
    """Fit the softmax on the frozen features of the run in ``run_dir`` (see the module doc);
    write and return the ``readout.json`` record. The run directory's lock is held meanwhile, so
    neither an ``ff-train`` run nor another readout writes into it at the same time
    (:class:`~ff_kernels.paper.run_dir.RunDirInUse` names the holder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # load_run names what is missing; the lock would create the folder
        return _readout(recipe_name, run_dir, settings, data_dir)
    with RunLock(run_dir):
        return _readout(recipe_name, run_dir, settings, data_dir)


def _readout(recipe_name: str, run_dir: Path, settings: ReadoutSettings, data_dir: str | None) -> dict:
    started = time.perf_counter()
    recipe, epoch = load_run(recipe_name, run_dir, data_dir)
    model = recipe.model
    train_x = frozen_features(model, recipe.train_images)
    eval_x = frozen_features(model, recipe.eval_images)
    fit, fits = choose_softmax(train_x, recipe.train_labels, model.head.out_features, settings)
    split = recipe.eval_name
    record = {
        "recipe": recipe_name, "checkpoint_epoch": epoch, "features": train_x.shape[1],
        "weight_decay": fit.weight_decay, "best_epoch": fit.best_epoch, "holdout_error": fit.holdout_error,
        f"{split}_error": error_rate(fit.head, eval_x, recipe.eval_labels),
        f"running_head_{split}_error": error_rate(model.head, eval_x, recipe.eval_labels),
        "holdout_errors": {str(f.weight_decay): f.holdout_errors for f in fits}, "settings": asdict(settings),
        "seconds": time.perf_counter() - started,
    }
    bad = nonfinite_values(record)
    if bad:
        raise TrainingDiverged(f"the readout of {run_dir} gives NaN or Inf in {', '.join(bad)}; nothing written")
    atomic_write(run_dir / READOUT, lambda f: dump(record, f, indent=2), mode="w")
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ff-readout", description=__doc__.split("\n")[0])
    add_options(parser, ReadoutRun, with_defaults=True)
    add_options(parser, ReadoutSettings, with_defaults=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``ff-readout RECIPE RUN_DIR [options]``: print the readout's result as one line."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        run = ReadoutRun(**{f.name: args[f.name] for f in fields(ReadoutRun)})
        settings = ReadoutSettings(**{f.name: args[f.name] for f in fields(ReadoutSettings)})
    except ValueError as err:
        parser.error(str(err))
    try:
        record = readout_run(run.recipe, run.run_dir, settings, run.data_dir)
    except (*USER_ERRORS, OSError) as err:
        print(f"ff-readout: error: {error_line(err)}", file=sys.stderr)
        return 1
    shown = {k: v for k, v in record.items() if k not in ("holdout_errors", "settings")}
    print("readout: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
