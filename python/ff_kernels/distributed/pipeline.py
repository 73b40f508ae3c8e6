"""FF's own pipeline: each rank trains a contiguous group of layers on the activities of the group below.

Forward-Forward sends nothing backward: layer k learns from layer k-1's normalized output
alone. So ranks can own groups of layers (:func:`partition_layers`) and stream batches up::

    rank 0:  b_0 b_1 b_2 ...            layers of group 0, input batches from the caller
    rank 1:      b_0 b_1 b_2 ...        layers of group 1, activities from rank 0
    rank 2:          b_0 b_1 b_2 ...    ...

Schedule: rank r trains its group on batch b_t with the normalized output that rank r-1's
group produced for b_t with its weights *before* its b_t update (as
:meth:`FFSequential.ff_step` feeds layer k the pre-update output of layer k-1), and it trains
on b_0, b_1, ... in order. Group r's weights after b_t are therefore a function of group
r-1's pre-update outputs for b_0..b_t and of its own updates: the same as in the
single-process schedule "for each batch, train the groups in order on the pre-update outputs
of the layers below", which is exactly ``FFSequential.ff_step`` (or ``ff_backward`` + an
optimizer step) per batch, :func:`sequential_reference`. While rank r trains on b_t, rank
r-1 is already on b_{t+1}: with W ranks up to W batches are in flight.

Messages (:mod:`ff_kernels.distributed.p2p`) carry the positive and negative rows together,
with a header of their shapes; each rank keeps at most ``max_in_flight`` unfinished sends
(waiting on the oldest first), and rank 0 ends the stream with an END message that every
rank passes on before returning.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..nn.sequential import FFSequential
from ..ops.layer_step import FFLayerStep
from .comm import check_device, group_rank_and_size
from .p2p import ActivityReceiver, ActivitySender
from .state import broadcast_parameters


def partition_layers(n_layers: int, world_size: int) -> list[range]:
    """Contiguous groups of layer indices, one per rank, sizes differing by at most one.

    The first ``n_layers % world_size`` groups get the extra layer, e.g. 5 layers on 2 ranks:
    ``[range(0, 3), range(3, 5)]``.
    """
    n_layers, world_size = int(n_layers), int(world_size)
    if world_size < 1 or n_layers < world_size:
        raise ValueError(f"partition_layers: need 1 <= world_size <= n_layers, got {n_layers} layers on {world_size} ranks")
    size, extra = divmod(n_layers, world_size)
    groups, start = [], 0
    for rank in range(world_size):
        stop = start + size + (rank < extra)
        groups.append(range(start, stop))
        start = stop
    return groups


def _check_update(optimizer, lr) -> None:
    if (optimizer is None) == (lr is None):
        raise ValueError("pipeline: pass either optimizer (ff_backward + optimizer.step) or lr (fused ff_step), not both")


class LayerPipeline:
    """This rank's stage of the layer pipeline over ``net`` (see the module docstring).

    Every rank holds the whole ``net`` but trains only ``layers`` (its group of
    :func:`partition_layers`), ``stage`` being those layers as an FFSequential (shared
    modules). ``max_in_flight``: unfinished sends allowed per rank.
    """

    def __init__(self, net: FFSequential, process_group: dist.ProcessGroup | None = None, max_in_flight: int = 2) -> None:
        if not isinstance(net, FFSequential):
            raise TypeError(f"LayerPipeline: net must be an FFSequential, got {type(net).__name__}")
        if int(max_in_flight) < 1:
            raise ValueError(f"LayerPipeline: max_in_flight must be >= 1, got {max_in_flight}")
        self.net = net
        self.process_group = process_group
        self.rank, self.world_size = group_rank_and_size(process_group)
        self.groups = partition_layers(len(net), self.world_size)
        self.layers = self.groups[self.rank]
        self.stage = net[self.layers.start:self.layers.stop]
        self.max_in_flight = int(max_in_flight)
        self.device = next(net.parameters()).device
        check_device("LayerPipeline", self.device, process_group)

    def run(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> torch.Tensor:
        """Train this rank's layers on a stream of batches; every rank calls it (collective).

        batches: on rank 0, an iterable of (x_pos (Bp, ...), x_neg (Bn, ...)); other ranks pass
        None and receive their inputs until rank 0's stream ends. The update is either
        ``optimizer`` (over this rank's layers: zero_grad, ``ff_backward``, ``optimizer.step()``
        per batch) or ``lr`` / ``momentum`` / ``weight_decay`` (fused ``ff_step``).

        Returns this rank's losses (T, len(layers)) float32: one row per batch.
        """
        _check_update(optimizer, lr)
        if self.rank == 0 and batches is None:
            raise ValueError("LayerPipeline.run: rank 0 needs the batches")
        receiver = ActivityReceiver(self.rank - 1, self.process_group, self.device) if self.rank > 0 else None
        sender = None
        if self.rank < self.world_size - 1:
            sender = ActivitySender(self.rank + 1, self.process_group, self.device, self.max_in_flight)
        losses = []
        for x_pos, x_neg in batches if receiver is None else _received_batches(receiver):
            steps = self._train_stage(x_pos, x_neg, optimizer, lr, momentum, weight_decay)
            losses.append(torch.stack([step.loss for step in steps]))
            if sender is not None:
                sender.send(steps[-1].output, x_pos.shape[0])
        if sender is not None:
            sender.close()
        if not losses:
            return torch.empty(0, len(self.layers), device=self.device)
        return torch.stack(losses)

    def _train_stage(self, x_pos, x_neg, optimizer, lr, momentum, weight_decay) -> list[FFLayerStep]:
        if optimizer is None:
            return self.stage.train_steps(
                x_pos, x_neg,
                lambda layer, p, n: layer.ff_step(p, n, lr=lr, momentum=momentum, weight_decay=weight_decay, return_step=True),
            )
        optimizer.zero_grad(set_to_none=True)
        steps = self.stage.train_steps(x_pos, x_neg, lambda layer, p, n: layer.ff_backward(p, n, return_step=True))
        optimizer.step()
        return steps

    def synchronize(self) -> None:
        """Give every rank the trained state of every layer, each from the rank that owns it.

        Collective; call it before evaluating or checkpointing the whole net (on rank 0, say).
        """
        for owner, group in enumerate(self.groups):
            for i in group:
                broadcast_parameters(self.net[i], owner, self.process_group)


def _received_batches(receiver: ActivityReceiver):
    """(x_pos, x_neg) of every message until END."""
    while (message := receiver.recv()) is not None:
        x, n_pos = message
        yield x[:n_pos], x[n_pos:]


def sequential_reference(
    net: FFSequential,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """The pipeline's schedule in one process: ``FFSequential.ff_step`` (or ``ff_backward`` +
    ``optimizer.step()``) on each batch in turn. Returns the losses (T, len(net)) float32."""
    _check_update(optimizer, lr)
    losses = []
    for x_pos, x_neg in batches:
        if optimizer is None:
            losses.append(torch.stack(net.ff_step(x_pos, x_neg, lr=lr, momentum=momentum, weight_decay=weight_decay)))
        else:
            optimizer.zero_grad(set_to_none=True)
            losses.append(torch.stack(net.ff_backward(x_pos, x_neg)))
            optimizer.step()
    return torch.stack(losses)
