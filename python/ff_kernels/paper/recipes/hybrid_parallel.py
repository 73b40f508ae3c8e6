"""The recipes with hybrid negatives (unsupervised, local) on several processes: data parallel.

``--parallel data`` only (the layer pipeline is the supervised recipes'). Every rank holds a
replica (rank 0's FF layers broadcast at the start; the softmax starts at zero everywhere) and
the same data generator, so every rank knows every batch. Per batch of B rows:

1. every rank draws the hybrid negatives for the whole batch (``hybrid_negatives`` pairs the
   images within the batch), exactly as one process would, so the generators stay in step
   with each other and with the single-process run;
2. the first ``W * (B // W)`` images and their hybrids are cut into W equal slices; rank r
   keeps the r-th (``context.shard``);
3. the FF layers take the whole batch's step from the slices (``DataParallelFF.fused_step``
   with the recipe's SGD settings, or ``ff_backward`` with averaged gradients for Adam), which
   also gives each layer's pre-update output of the rank's images; the softmax learns on
   those, its gradient averaged over the ranks (``average_gradients``) before the optimizer
   steps.

So W ranks follow the single-process run up to float rounding. The batch size must be a
multiple of W; a short last batch loses at most W - 1 rows, and one of fewer than W rows is
skipped (no update).

Evaluation is unchanged: every rank evaluates the whole set with its replica, the same on every
rank (the real-vs-hybrid error draws its hybrids from a fixed seed per call), so the metrics
need no reduction.
"""

from __future__ import annotations

import torch

from ...distributed import DataParallelFF, average_gradients
from ..data import hybrid_negatives
from .softmax_head import cross_entropy_grad_
from .supervised_parallel import check_batch_size


def enable(recipe, context) -> None:
    """Make ``recipe`` (an UnsupervisedMNIST or LocalMNIST) train as this rank of ``context``'s
    data-parallel run."""
    if context.mode != "data":
        raise ValueError(f"recipe {recipe.name!r} trains with --parallel data only, not {context.mode!r}")
    check_batch_size(recipe.config.batch_size, context)
    recipe.data_parallel = DataParallelFF(recipe.model.net, context.group)
    recipe.parallel = context


def data_parallel_step(
    recipe, batch: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """One data-parallel update on the index tensor ``batch`` (B,) (module docstring).

    Returns (the whole batch's mean FF loss over the layers (0-dim), this rank's softmax errors
    before the update (0-dim), this rank's rows B // W); (None, 0, 0) for a batch of fewer than
    W rows, which is skipped.
    """
    context = recipe.parallel
    images, labels = recipe.train_images[batch], recipe.train_labels[batch]
    negatives = hybrid_negatives(images, generator, recipe.config.blur_steps)
    kept = context.world_size * (labels.shape[0] // context.world_size)
    if kept == 0:
        return None, 0, 0
    images, negatives, labels = context.shard((images[:kept], negatives[:kept], labels[:kept]))
    x_pos, x_neg = recipe.model.inputs(images), recipe.model.inputs(negatives)
    recipe.optimizer.zero_grad(set_to_none=True)
    if recipe.config.optimizer == "sgd":
        steps = recipe.data_parallel.fused_step(x_pos, x_neg, **recipe.sgd_hyper(), return_steps=True)
    else:
        steps = recipe.data_parallel.ff_backward(x_pos, x_neg, return_steps=True)
    outputs = [step.output[: labels.shape[0]] for step in steps]  # the images' rows (B / W, ...)
    logits = cross_entropy_grad_(recipe.model.head, recipe.model.head_blocks(outputs), labels)
    average_gradients(recipe.model.head.parameters(), context.group)
    recipe.optimizer.step()
    errors = (logits.argmax(1) != labels).sum()
    return torch.stack([step.loss for step in steps]).mean(), errors, labels.shape[0]
