"""The backprop baseline on several processes: data parallel (``--parallel data``) only.

Every rank holds a replica of the MLP (rank 0's state broadcast at the start) and the same
seed, so every rank knows every batch of B rows; rank r trains on the r-th of W equal slices
of its first ``W * (B // W)`` rows. The cross-entropy is a mean over the rows, so the slices'
gradients averaged over the ranks (``average_gradients``) are the whole batch's; every rank
steps its own optimizer with them at the same scheduled learning rate, and the replicas stay
identical. Dropout: every rank draws each layer's mask for the whole batch from torch's global
generator (seeded alike on every rank), as ``nn.Dropout`` draws it in one process, and applies
its slice (:func:`sharded_forward`). So W ranks follow the single-process run up to float
rounding.

The batch size must be a multiple of W; a short last batch loses at most W - 1 rows, and one
of fewer than W rows is skipped (its learning-rate step still counts, as in one process).
Evaluation is unchanged: every rank evaluates the whole set with its replica.
"""

from __future__ import annotations

import torch
from torch import nn

from ...distributed import average_gradients, broadcast_parameters, shard_batch
from ...distributed.comm import check_device
from .supervised_parallel import check_batch_size


def enable(recipe, context) -> None:
    """Make ``recipe`` (a BackpropMNIST) train as this rank of ``context``'s data-parallel run."""
    if context.mode != "data":
        raise ValueError(f"recipe {recipe.name!r} trains with --parallel data only, not {context.mode!r}")
    check_batch_size(recipe.config.batch_size, context)
    check_device(f"recipe {recipe.name!r}", recipe.device, context.group)
    broadcast_parameters(recipe.model, 0, context.group)
    recipe.parallel = context


def sharded_forward(model: nn.Sequential, images: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``model(batch)`` in training mode, computed from those rows only.

    images: (B / W, 784), the rank's slice of a batch of B = W * (B / W) rows; returns the
    logits (B / W, 10). Each active ``nn.Dropout`` draws the mask of all B rows (dropout applied
    to ones of the whole batch's shape: the draws it makes on that batch in one process) and
    multiplies the rank's slice of it in, so the global generator advances as in one process.
    """
    x = images
    for module in model:
        if isinstance(module, nn.Dropout) and module.training:
            ones = x.new_ones(x.shape[0] * world_size, *x.shape[1:])
            x = x * shard_batch(nn.functional.dropout(ones, module.p, training=True), rank, world_size)
        else:
            x = module(x)
    return x


def data_parallel_step(recipe, batch: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """One data-parallel update on the index tensor ``batch`` (B,) (module docstring), at the
    learning rate the caller has set.

    Returns (this rank's mean cross-entropy (0-dim), its errors before the update (0-dim), its
    rows B // W); (None, 0, 0) for a batch of fewer than W rows, which is skipped.
    """
    context = recipe.parallel
    kept = context.world_size * (batch.shape[0] // context.world_size)
    if kept == 0:
        return None, 0, 0
    rows = context.shard(batch[:kept])
    images, labels = recipe.train_images[rows], recipe.train_labels[rows]
    recipe.model.train()
    logits = sharded_forward(recipe.model, images, context.rank, context.world_size)
    loss = nn.functional.cross_entropy(logits, labels)
    recipe.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(recipe.model.parameters(), context.group)
    recipe.optimizer.step()
    errors = (logits.detach().argmax(1) != labels).sum()
    return loss.detach(), errors, labels.shape[0]
