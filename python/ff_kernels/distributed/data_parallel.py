"""Data-parallel FF training: every rank holds a replica of the net and trains on its shard of each batch.

Why averaging the ranks' gradients is exact. A layer's FF loss on P positive and N negative
rows is a mean over each kind (:func:`ff_kernels.functional.ff_loss`)::

    L = (1/P) sum_{i in pos} l_pos(x_i) + (1/N) sum_{j in neg} l_neg(x_j)

Cut the batch into W shards of P/W positive and N/W negative rows. Shard r's loss is
``L_r = (W/P) sum_{pos_r} l_pos + (W/N) sum_{neg_r} l_neg``, so ``(1/W) sum_r L_r = L`` and,
the gradient being linear, ``(1/W) sum_r dL_r/dW = dL/dW``. The replicas are identical and
rows are processed independently, so every layer's input rows on a rank are exactly that
shard of the layer's input on the whole batch, and the argument holds layer by layer.
Peer normalization takes two means over the positive rows (the mean activity and the mean
input, ``FFLayer.peer_norm_statistics``); averaged over equal shards they are the whole
batch's, so they are averaged too and the peer term is applied after the reduction, as one
process would apply it on the whole batch. With unequal shards the mean of the shard
gradients would weight rows unequally; :func:`shard_batch` refuses them.

Only rounding differs from one process: the weight-gradient GEMM sums the rows in W pieces
and the all_reduce adds W partial sums, so results agree to float32 rounding (about 1e-7
relative per step), not bit for bit.

Overlap: no derivative crosses layers, so layer k's gradient is final as soon as its
``ff_backward`` returns. Its all_reduce starts right then, asynchronously, while layer k+1
computes; :meth:`DataParallelFF.ff_backward` waits for all of them before it returns. Each
layer's tensors (weight and bias gradients, loss, peer statistics) travel as one flat
float32 bucket: one all_reduce per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.optim.sgd import sgd

from ..nn.layer import FFLayer
from ..nn.sequential import FFSequential
from ..ops.layer_step import FFLayerStep
from ..ops.validation import check_hyper
from .comm import check_device, comm_device, group_rank_and_size, other_ranks, peer_failure
from .state import broadcast_parameters


class _AveragedBucket:
    """Tensors averaged over the ranks by one asynchronous all_reduce of one float32 buffer.

    Construction copies the tensors into the buffer and starts the sum; :meth:`wait` divides
    it by the world size and copies the means back into the tensors, in place.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], what: str, group: dist.ProcessGroup | None) -> None:
        self.tensors, self.what, self.group = list(tensors), what, group
        self.buffer = torch.cat([t.detach().reshape(-1).float() for t in self.tensors])
        with peer_failure(what, other_ranks(group), group):
            self.work = dist.all_reduce(self.buffer, group=group, async_op=True)

    @torch.no_grad()
    def wait(self) -> None:
        with peer_failure(self.what, other_ranks(self.group), self.group):
            self.work.wait()
        self.buffer.div_(dist.get_world_size(self.group))
        for tensor, chunk in zip(self.tensors, self.buffer.split([t.numel() for t in self.tensors])):
            tensor.copy_(chunk.view(tensor.shape))


def average_gradients(parameters: Iterable[torch.Tensor], process_group: dist.ProcessGroup | None = None) -> None:
    """Replace every ``.grad`` of ``parameters`` by its mean over the ranks (one blocking all_reduce).

    For what is trained by backprop beside the FF layers (a softmax head). Parameters without
    a gradient are skipped; all ranks must have gradients for the same parameters.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        _AveragedBucket(grads, "all_reduce of gradients", process_group).wait()


class DataParallelFF:
    """Trains the replica ``net`` of this rank on its shard of every batch (see the module docstring).

    Construction broadcasts rank 0's state of ``net`` (:func:`broadcast_parameters`), so the
    replicas start identical; every rank must then make the same calls with shards of equal
    size (:func:`shard_batch`). ``process_group`` None is the default group.

    Use either ``ff_backward`` + any torch optimizer (every rank steps its own optimizer on
    the same averaged gradients, so the replicas stay identical), or ``fused_step``.
    """

    def __init__(self, net: FFSequential, process_group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(net, FFSequential):
            raise TypeError(f"DataParallelFF: net must be an FFSequential, got {type(net).__name__}")
        others = [f"{i}: {type(layer).__name__}" for i, layer in enumerate(net) if not isinstance(layer, FFLayer)]
        if others:
            raise TypeError(f"DataParallelFF: every layer must be an FFLayer (FFLinear, FFLocal2d), got {others}")
        self.net = net
        self.process_group = process_group
        self.rank, self.world_size = group_rank_and_size(process_group)
        check_device("DataParallelFF", next(net.parameters()).device, process_group)
        broadcast_parameters(net, 0, process_group)

    def ff_backward(self, x_pos: torch.Tensor, x_neg: torch.Tensor, layers: Iterable[int] | None = None,
                    return_steps: bool = False) -> list[torch.Tensor] | list[FFLayerStep]:
        """Accumulate every chosen layer's gradient of the whole (all ranks') batch into ``.grad``.

        x_pos: (Bp, ...) and x_neg: (Bn, ...), this rank's shards (equal sizes on all ranks);
        ``layers`` as in :meth:`FFSequential.ff_backward`. Returns the chosen layers' losses on
        the whole batch (0-dim float32 each, averaged over ranks on the device, no host sync),
        or with ``return_steps`` their :class:`~ff_kernels.ops.FFLayerStep` s: ``loss`` that
        averaged loss, ``goodness`` (Bp + Bn,) and ``output`` (Bp + Bn, ...) this rank's rows,
        computed with the weights before the update (e.g. the features a head reads).

        The all_reduce averages ``.grad`` as it is after this rank's step, i.e. whatever was
        accumulated there plus this step's local gradient. That is right when what was there is
        the same on every rank (nothing, or the results of earlier calls of this method), so
        accumulating over several calls is exact too.
        """
        steps = [step for _, step in self._averaged_backward(x_pos, x_neg, layers)]
        return steps if return_steps else [step.loss for step in steps]

    def fused_step(
        self,
        x_pos: torch.Tensor,
        x_neg: torch.Tensor,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        layers: Iterable[int] | None = None,
        return_steps: bool = False,
    ) -> list[torch.Tensor] | list[FFLayerStep]:
        """``FFSequential.ff_step`` on the whole batch: the same SGD update, from this rank's shards.

        Unlike the single-process fused step, which never writes dL/dW to memory, the
        data-parallel step must materialize each layer's gradient to all-reduce it: it computes
        the averaged gradients as :meth:`ff_backward` does, in temporary ``.grad`` tensors
        (whatever ``.grad`` held is set aside and put back afterwards), then applies
        ``torch.optim.SGD(lr, momentum, weight_decay)`` (dampening 0, no Nesterov) through
        torch's own functional SGD (``torch.optim.sgd.sgd``) with the layers' momentum buffers
        (``FFLayer.momentum_buffers``), so its state is that of ``ff_step`` (a checkpoint moves
        freely between single-process and data-parallel training). Returns the chosen layers'
        losses, or with ``return_steps`` their steps, as :meth:`ff_backward`.
        """
        name = "DataParallelFF.fused_step"
        lr, momentum = check_hyper(name, "lr", lr), check_hyper(name, "momentum", momentum)
        weight_decay = check_hyper(name, "weight_decay", weight_decay)
        params = list(self.net.parameters())
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            done = self._averaged_backward(x_pos, x_neg, layers)
            updated, bufs = [], []
            for layer, _ in done:
                for param, buf in zip((layer.weight, layer.bias), layer.momentum_buffers(momentum)):
                    if param is not None:
                        updated.append(param)
                        bufs.append(buf)
            with torch.no_grad():
                sgd(updated, [p.grad for p in updated], bufs, weight_decay=weight_decay,
                    momentum=momentum, lr=lr, dampening=0.0, nesterov=False, maximize=False)
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad
        steps = [step for _, step in done]
        return steps if return_steps else [step.loss for step in steps]

    def _averaged_backward(self, x_pos, x_neg, layers) -> list[tuple[FFLayer, FFLayerStep]]:
        """Local steps with each layer's bucket all-reduced behind the next layer's compute.

        Returns (layer, step) for the chosen layers once every bucket has arrived (the step's
        loss averaged in place) and the peer terms are applied.
        """
        pending = []

        def step_fn(layer: FFLayer, p: torch.Tensor, n: torch.Tensor):
            step = layer.ff_backward(p, n, return_step=True, apply_peer_norm=False)
            statistics = layer.peer_norm_statistics(step, p)
            grads = [param.grad for param in (layer.weight, layer.bias) if param is not None]
            what = f"all_reduce of layer {list(self.net).index(layer)}'s gradients"
            bucket = _AveragedBucket([*grads, step.loss, *(statistics or ())], what, self.process_group)
            pending.append((layer, step, statistics, bucket))
            return step

        self.net.train_steps(x_pos, x_neg, step_fn, layers)
        for layer, _, statistics, bucket in pending:
            bucket.wait()
            if statistics is not None:
                layer.apply_peer_norm_(statistics, "grad")
        return [(layer, step) for layer, step, _, _ in pending]


def shard_batch(batch, rank: int, world_size: int):
    """Rank ``rank``'s contiguous, equal share of ``batch``.

    ``batch``: a tensor (B, ...) or a tuple / list of tensors, each cut on its own along dim 0
    (e.g. ``(x_pos, x_neg)`` with Bp and Bn rows, or ``(images, labels)``). Rank r gets rows
    ``[r * B / W, (r + 1) * B / W)``. Every B must be divisible by ``world_size`` (W): equal
    shards are what makes the averaged gradients exact (module docstring).
    """
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise ValueError(f"shard_batch: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(t, rank, world_size) for t in batch)
    if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
        raise TypeError(f"shard_batch: batch must be a tensor with a batch dimension or a tuple/list of them, got {batch!r:.80}")
    rows = batch.shape[0]
    if rows % world_size:
        raise ValueError(
            f"shard_batch: a batch of {rows} rows does not split into {world_size} equal shards; "
            f"use a batch size divisible by {world_size} (and drop or pad a short last batch)"
        )
    share = rows // world_size
    return batch[rank * share:(rank + 1) * share]


def all_reduce_counts(errors, total, process_group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """Sum an evaluation's counts over the ranks, each having evaluated its own shard.

    ``errors``, ``total``: ints or 0-dim integer tensors. Returns (all errors, all rows) as
    Python ints on every rank (one blocking all_reduce).
    """
    counts = torch.tensor([int(errors), int(total)], dtype=torch.int64, device=comm_device(process_group))
    with peer_failure("all_reduce of evaluation counts", other_ranks(process_group), process_group):
        dist.all_reduce(counts, group=process_group)
    all_errors, all_rows = counts.tolist()
    return all_errors, all_rows
