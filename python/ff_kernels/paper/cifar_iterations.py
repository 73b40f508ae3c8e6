"""Which iterations and hidden layers of a trained CIFAR-10 FF net tell the labels apart.

    python -m ff_kernels.paper.cifar_iterations RUN_DIR [--images 1000] [--set test] [--iterations 10] [--logits]

loads the checkpoint of an ``ff-train cifar`` run, runs the first ``--images`` images of an
evaluation set ("test", "test_exact", "train", or "validation" for a run trained with
``--validation``) with each of the 10 labels for ``--iterations``
damped iterations, and prints the error of the "compute goodness for every label" test
procedure with the goodness summed over each range of iterations (``--ranges``, e.g.
``1-3,4-6``), for every hidden layer alone and for all of them. The recipe's own procedure is
all layers over iterations ``score_from..score_to`` (the paper's 4-6), marked in the table; the
last line gives the one-pass softmax's error on the same images. ``--logits`` adds what each
layer's FF loss sees at every iteration: the mean logit of p(positive) with the true and with the
wrong labels, and the share of each on the right side of the threshold; and a second table of
how the logits spread: across images (the standard deviation of an image's mean logit over its
10 labels), across an image's labels (the standard deviation over them, averaged over images),
the share of rows with |logit| > 5 (the loss's sigmoid saturated: such a row weighs all or
nothing), and the share of (true, wrong) label pairs of one image whose rows sit on the same side
of the threshold (for such a pair a saturated threshold loss moves one row only: it shifts the
image's goodness level instead of separating its labels).

A net trained on its FF losses at iterations 1..N (``--train-iterations N``) may tell the
labels apart at those iterations and not later: this shows where.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import functional
from ..ops.validation import describe
from .options import Option, add_options, check_options
from .recipes.cifar_common import CifarData
from .recipes.cifar_ff import LABEL_BATCH, CifarFF
from .train import CheckpointError, load_trained

DEFAULT_RANGES = "1-1,1-3,1-6,4-6,7-10"


def parse_ranges(text: str, iterations: int) -> list[tuple[int, int]]:
    """"1-3,4-6" -> [(1, 3), (4, 6)]; every range must satisfy 1 <= first <= last <= iterations."""
    ranges = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not (sep and first.isdigit() and last.isdigit()) or not 1 <= int(first) <= int(last) <= iterations:
            raise ValueError(f"ranges must be FIRST-LAST with 1 <= FIRST <= LAST <= {iterations} (the iterations run), "
                             f"separated by commas; got {part.strip()!r} in {text!r}")
        ranges.append((int(first), int(last)))
    return ranges


def load_recipe(run_dir: str | Path, eval_subset: int, data_dir: str | None = None) -> CifarFF:
    """The run's recipe with its checkpoint's weights; its evaluation sets hold the first
    ``eval_subset`` images (the run's config, with ``eval_subset`` and, if given, ``data_dir``
    replaced)."""
    recipe, _ = load_trained(CifarFF, run_dir, eval_subset=eval_subset, train_eval_subset=eval_subset,
                             data_dir=data_dir)
    return recipe


def _check_labels(images: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dtype != torch.int64 or tuple(labels.shape) != (images.shape[0],):
        raise ValueError(f"labels must be int64 ({images.shape[0]},), one per image, got {describe(labels)}")


@torch.no_grad()
def iteration_errors(recipe: CifarFF, images: torch.Tensor, labels: torch.Tensor, iterations: int,
                     ranges: list[tuple[int, int]]) -> tuple[dict[tuple[int, int], list[float]], float]:
    """Errors of the goodness-over-labels procedure on uint8 ``images`` (N, 3, 32, 32) with int64
    ``labels`` (N,): {(first, last): [layer 1, ..., layer K, all layers]}, goodness summed over
    iterations first..last; and the one-pass softmax's error."""
    _check_labels(images, labels)
    scores = []  # (N, T, 10, K)
    softmax_wrong = torch.zeros((), dtype=torch.long, device=labels.device)  # counted on the device, read once
    for x, y in zip(images.split(LABEL_BATCH), labels.split(LABEL_BATCH)):
        x = recipe.inputs(x)
        scores.append(recipe.model.label_goodness(x, iterations).permute(2, 0, 1, 3))
        softmax_wrong += (recipe.model.head_logits(x).argmax(1) != y).sum()
    softmax_errors = int(softmax_wrong)
    g = torch.cat(scores)
    depth = g.shape[-1]

    def error(s: torch.Tensor) -> float:
        return int((s.argmax(1) != labels).sum()) / len(labels)

    table = {}
    for first, last in ranges:
        summed = g[:, first - 1:last].sum(1)  # (N, 10, K)
        table[(first, last)] = [error(summed[..., k]) for k in range(depth)] + [error(summed.sum(2))]
    return table, softmax_errors / len(labels)


@torch.no_grad()
def label_logits(recipe: CifarFF, images: torch.Tensor, labels: torch.Tensor, iterations: int) -> torch.Tensor:
    """The logit of p(positive) (what each layer's FF loss sees) of every image with every label
    clamped, on uint8 ``images`` (N, 3, 32, 32) with int64 ``labels`` (N,): (iterations, 10, N, K) float64."""
    _check_labels(images, labels)
    net, sign = recipe.model.net, functional.goodness_sign(recipe.config.goodness)
    return torch.cat([functional.positive_logit(sign * recipe.model.label_goodness(recipe.inputs(x), iterations),
                                                net.goodness_kind, net.threshold, net.temperature).double()
                      for x in images.split(LABEL_BATCH)], dim=2)


@torch.no_grad()
def logit_levels(recipe: CifarFF, images: torch.Tensor, labels: torch.Tensor, iterations: int,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
    """What each layer's FF loss sees at every iteration, on uint8 ``images`` (N, 3, 32, 32) with
    int64 ``labels`` (N,): (iterations, K, 4) float64 holding, per iteration and hidden layer, the
    mean logit of p(positive) with the true label clamped, its mean with each wrong label, and the
    share of true-label and of wrong-label rows on the right side of the threshold (logit > 0
    and < 0). ``logits``: :func:`label_logits` of the same arguments, if already computed."""
    _check_labels(images, labels)
    logits = label_logits(recipe, images, labels, iterations) if logits is None else logits  # (T, 10, N, K)
    true = torch.nn.functional.one_hot(labels, logits.shape[1]).t().bool()  # (10, N)
    pos, neg = logits[:, true], logits[:, ~true]  # (T, N, K), (T, 9N, K)
    return torch.stack([pos.mean(1), neg.mean(1), (pos > 0).double().mean(1), (neg < 0).double().mean(1)], dim=2)


SATURATED = 5.0  # |logit| above which sigmoid is within 0.7% of 0 or 1


@torch.no_grad()
def logit_spread(recipe: CifarFF, images: torch.Tensor, labels: torch.Tensor, iterations: int,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
    """How the logits of :func:`label_logits` spread, per iteration and hidden layer: (iterations, K, 4)
    float64 holding the standard deviation across images of an image's mean logit over the 10
    labels, the standard deviation across an image's 10 labels (averaged over the images), the
    share of rows (all labels) with |logit| > :data:`SATURATED`, and the share of (true label,
    wrong label) pairs of one image whose two rows are on the same side of the threshold."""
    _check_labels(images, labels)
    logits = label_logits(recipe, images, labels, iterations) if logits is None else logits  # (T, 10, N, K)
    true = torch.nn.functional.one_hot(labels, logits.shape[1]).t().bool()  # (10, N)
    pos = logits[:, true]  # (T, N, K)
    t, _, n, k = logits.shape
    neg = logits.transpose(1, 2)[:, ~true.t()].view(t, n, -1, k)  # (T, N, 9, K): each image's wrong labels
    same_side = ((pos.unsqueeze(2) > 0) == (neg > 0)).double().mean((1, 2))
    return torch.stack([logits.mean(1).std(1), logits.std(1).mean(1), (logits.abs() > SATURATED).double().mean((1, 2)),
                        same_side], dim=2)


def format_levels(levels: torch.Tensor) -> str:
    """The output of :func:`logit_levels` as a markdown table (logits to 1 decimal, shares in percent)."""
    header = ("| iteration | layer | mean logit, true label | mean logit, wrong labels | true right side % | "
              "wrong right side % |")
    lines = [header, "|---|---|---|---|---|---|"]
    for t, per_layer in enumerate(levels.tolist()):
        for k, (pos, neg, pos_right, neg_right) in enumerate(per_layer):
            lines.append(f"| {t + 1} | {k + 1} | {pos:.1f} | {neg:.1f} | {100 * pos_right:.1f} | {100 * neg_right:.1f} |")
    return "\n".join(lines)


def format_spread(spread: torch.Tensor) -> str:
    """The output of :func:`logit_spread` as a markdown table (logits to 1 decimal, shares in percent)."""
    header = ("| iteration | layer | std across images | std across an image's labels | "
              f"saturated (abs logit > {SATURATED:g}) % | true/wrong pairs on one side % |")
    lines = [header, "|---|---|---|---|---|---|"]
    for t, per_layer in enumerate(spread.tolist()):
        for k, (images, labels, saturated, same_side) in enumerate(per_layer):
            lines.append(f"| {t + 1} | {k + 1} | {images:.1f} | {labels:.1f} | {100 * saturated:.1f} | "
                         f"{100 * same_side:.1f} |")
    return "\n".join(lines)


def format_table(table: dict[tuple[int, int], list[float]], softmax_error: float, scored: tuple[int, int]) -> str:
    """The errors of :func:`iteration_errors` as a markdown table, in percent."""
    depth = len(next(iter(table.values()))) - 1
    lines = ["| iterations | " + " | ".join(f"layer {k + 1}" for k in range(depth)) + " | all layers |",
             "|---|" + "---|" * (depth + 1)]
    for (first, last), errors in table.items():
        mark = " (the recipe's test)" if (first, last) == scored else ""
        lines.append(f"| {first}-{last}{mark} | " + " | ".join(f"{100 * e:.1f}" for e in errors) + " |")
    lines.append(f"\none-pass softmax: {100 * softmax_error:.1f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class IterationsCommand:
    """The options of ``python -m ff_kernels.paper.cifar_iterations``."""

    run_dir: str = Option("an ff-train cifar run directory (config.json, checkpoint.pt)", positional=True)()
    images: int = Option("first N images of the set", min=1)(1000)
    set: str = Option("the evaluation set", choices=("test", "test_exact", "train", "validation"))("test")
    iterations: int = Option("iterations to run", min=1)(10)
    ranges: str = Option("iteration ranges to score")(DEFAULT_RANGES)
    data_dir: str | None = Option("CIFAR-10 folder", none="the one saved in the run's config")(None)
    logits: bool = Option("also print each layer's mean logit of p(positive) at every iteration, for the true "
                          "and the wrong labels: what its FF loss sees, and how the logits spread across images and labels")(False)

    def __post_init__(self) -> None:
        check_options(self)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ff_kernels.paper.cifar_iterations",
                                     description=__doc__.split("\n\n")[0])
    add_options(parser, IterationsCommand, with_defaults=True)
    try:
        args = IterationsCommand(**vars(parser.parse_args(argv)))
        ranges = parse_ranges(args.ranges, args.iterations)
        recipe = load_recipe(args.run_dir, args.images, args.data_dir)
        data: CifarData = recipe.data
        if args.set not in data.eval_sets:
            raise ValueError(f"the run's data has no {args.set!r} set; it has {sorted(data.eval_sets)}")
        images, labels = data.eval_sets[args.set]
        images, labels = images[:args.images], labels[:args.images]
        table, softmax_error = iteration_errors(recipe, images, labels, args.iterations, ranges)
        levels = spread = None
        if args.logits:
            logits = label_logits(recipe, images, labels, args.iterations)
            levels = logit_levels(recipe, images, labels, args.iterations, logits)
            spread = logit_spread(recipe, images, labels, args.iterations, logits)
    except (OSError, ValueError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    c = recipe.config
    print(f"{args.run_dir}: {args.set}, first {len(labels)} images, {args.iterations} iterations, "
          f"trained on iterations {c.train_from}-{c.train_iterations}")
    print(format_table(table, softmax_error, (c.score_from, c.score_to)))
    if levels is not None:
        print(f"\nlogit of p(positive) = {functional.goodness_sign(c.goodness):+g} * (G - {recipe.model.net.threshold:g}) / "
              f"{recipe.model.net.temperature:g}; 'right side': > 0 for the true label, < 0 for a wrong one\n")
        print(format_levels(levels))
        print()
        print(format_spread(spread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
