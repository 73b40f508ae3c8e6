"""The supervised recipe (and its jittered variant) on several processes: data parallel and layer pipeline.

Data parallel (``--parallel data``): every rank holds a replica and the same data generator,
so every rank knows every batch; rank r trains on the r-th equal slice of it. Per batch:

1. each rank runs the neutral-label pass on its slice; the softmax probabilities (B/W, 10)
   are all-gathered, so every rank holds the whole batch's (B, 10);
2. every rank draws the negative labels for the whole batch from the shared generator,
   exactly as one process would, and keeps its slice (the generators stay in step);
3. the softmax head's gradient is averaged over the ranks (``average_gradients``) and the FF
   layers take the whole batch's step (``DataParallelFF.fused_step``, or ``ff_backward`` with
   averaged gradients for Adam).

So W ranks follow the single-process run up to float rounding (the shards' sums are added in
a different order). A batch of B rows uses its first ``W * (B // W)`` rows: the batch size
must be a multiple of W, and a short last batch loses at most W - 1 rows (its negatives are
then drawn for the kept rows only, so from there on the run differs from one process's by
more than rounding).

Layer pipeline (``--parallel pipeline``): rank r trains the r-th group of layers
(``partition_layers``) on the normalized activities that rank r - 1 sends it; nothing is sent
backward. Rank 0 also makes the inputs: for each batch it runs the neutral-label pass through
its own copy of the whole net, trains the softmax head on it, draws the negative labels from
its probabilities, and streams the positive and negative rows into the pipeline. Its copy of
the layers owned by other ranks is refreshed every ``sync_every`` batches and at the end of
every epoch (``LayerPipeline.synchronize``, after the pipeline has drained): between two
refreshes, the hard negatives and the head's inputs come from those layers as they were at the
last refresh. With ``sync_every = 1`` this is the single-process schedule exactly, with no
overlap; larger values trade that staleness for overlap. At the end of the epoch rank 0 sends
the head to the others, which evaluate their shares of the test set with it. Fused SGD only.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ...distributed import DataParallelFF, LayerPipeline, average_gradients, broadcast_parameters

POSTFIX_EVERY = 20  # batches between progress-bar updates on rank 0


def enable(recipe, context) -> None:
    """Make ``recipe`` (a SupervisedMNIST) train as this rank of ``context``'s parallel run."""
    config = recipe.config
    if context.mode == "data":
        check_batch_size(config.batch_size, context)
        recipe.data_parallel = DataParallelFF(recipe.model.net, context.group)
    else:
        if config.optimizer != "sgd":
            raise ValueError(f"--parallel pipeline trains with the fused SGD step: use --optimizer sgd, not {config.optimizer!r}")
        recipe.pipeline = LayerPipeline(recipe.model.net, context.group)
    recipe.parallel = context


def check_batch_size(batch_size: int, context) -> None:
    """Refuse a data-parallel batch size that is not a multiple of the number of processes
    (every rank trains on an equal slice of every batch)."""
    if batch_size % context.world_size:
        raise ValueError(
            f"--parallel data: the batch size ({batch_size}) must be a multiple of the number of "
            f"processes ({context.world_size})"
        )


def data_parallel_step(recipe, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One data-parallel update on the index tensor ``batch`` (B,) (module docstring).

    Returns (the whole batch's mean FF loss over the layers (0-dim), this rank's softmax errors
    (0-dim), this rank's rows), or (None, 0, 0) when the batch has fewer rows than ranks.
    """
    context = recipe.parallel
    batch = batch[: context.world_size * (batch.shape[0] // context.world_size)]
    if batch.shape[0] == 0:  # a last batch of fewer rows than ranks: no update
        return None, 0, 0
    all_labels = recipe.train_labels[batch]
    rows = context.shard(batch)
    images, labels = recipe.train_images[rows], recipe.train_labels[rows]
    logits = recipe.model.head_logits(images)
    probs = torch.softmax(logits.detach(), dim=1)
    wrong = context.shard(recipe.wrong_labels(context.gather(probs), all_labels, generator))
    recipe.optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(logits, labels).backward()
    average_gradients(recipe.model.head.parameters(), context.group)
    x_pos, x_neg = recipe.model.inputs(images, labels), recipe.model.inputs(images, wrong)
    if recipe.config.optimizer == "sgd":
        losses = recipe.data_parallel.fused_step(x_pos, x_neg, **recipe.sgd_hyper())
    else:
        losses = recipe.data_parallel.ff_backward(x_pos, x_neg)
    recipe.optimizer.step()
    return torch.stack(losses).mean(), (probs.argmax(1) != labels).sum(), labels.shape[0]


def pipeline_epoch(recipe, batches, generator: torch.Generator, totals) -> None:
    """Train one epoch in pipeline mode (module docstring); records into ``totals`` (EpochTotals).

    ``batches``: the epoch's index tensors, the same on every rank (only rank 0 reads them; the
    others only count them to know where the refreshes fall). Rank 0 records the head's errors
    per batch; every rank records the mean loss of its layers per batch.
    """
    context, pipeline = recipe.parallel, recipe.pipeline
    hyper = recipe.sgd_hyper()
    iterator = iter(batches)
    while chunk := list(itertools.islice(iterator, context.sync_every)):
        inputs = (_pipeline_inputs(recipe, b, generator, totals, batches) for b in chunk) if context.rank == 0 else None
        losses = pipeline.run(inputs, **hyper)
        for row in losses:
            totals.add(row.mean())
        pipeline.synchronize()
    # Rank 0 alone trained the softmax head; every rank evaluates its share of the test set with it.
    broadcast_parameters(recipe.model.head, 0, context.group)


def _pipeline_inputs(recipe, batch, generator, totals, bar) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: the head's step on ``batch`` and the batch's (x_pos, x_neg) rows for the pipeline."""
    images, labels = recipe.train_images[batch], recipe.train_labels[batch]
    logits = recipe.model.head_logits(images)
    probs = torch.softmax(logits.detach(), dim=1)
    wrong = recipe.wrong_labels(probs, labels, generator)
    recipe.optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(logits, labels).backward()
    recipe.optimizer.step()
    totals.add(None, (probs.argmax(1) != labels).sum(), labels.shape[0])
    if hasattr(bar, "set_postfix") and totals.rows // labels.shape[0] % POSTFIX_EVERY == 0:
        bar.set_postfix(totals.postfix())
    return recipe.model.inputs(images, labels), recipe.model.inputs(images, wrong)
