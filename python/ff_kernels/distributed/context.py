"""What a recipe needs to train on several processes: the mode, this rank, and the collectives.

``ff-train RECIPE --parallel data|pipeline`` (with ``--nproc N`` or under torchrun) builds a
:class:`ParallelContext` and hands it to the recipe (``recipe.enable_parallel(context)``) and
to :func:`ff_kernels.paper.train.train`. The recipe uses it to shard batches, gather what every
rank must see (the class probabilities that hard negatives are drawn from), and sum counts;
the training loop uses it to let rank 0 alone write files and to agree on epoch metrics.

Every rank runs the same recipe with the same seed, so the data generator (batch order,
negatives, jitter) is identical on all ranks and stays in step as long as every rank draws
the same random numbers: rows are drawn for the whole batch on every rank and each rank
keeps its shard (:meth:`ParallelContext.shard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import comm_device, group_rank_and_size, other_ranks, peer_failure
from .data_parallel import shard_batch

MODES = ("data", "pipeline")


@dataclass
class ParallelContext:
    """This process's place in a parallel run.

    ``mode``: "data" (every rank a replica, batches sharded) or "pipeline" (every rank a group
    of layers). ``sync_every``: pipeline only, batches between two refreshes of every rank's
    copy of the whole net (see the recipes that support the pipeline). ``group``: the process
    group (None: the default group).
    """

    mode: str
    sync_every: int = 10
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"parallel mode must be one of {MODES}, got {self.mode!r}")
        if int(self.sync_every) < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        self.rank, self.world_size = group_rank_and_size(self.group)

    @property
    def is_writer(self) -> bool:
        """True on rank 0, the one rank that writes metrics, checkpoints and progress."""
        return self.rank == 0

    def shard(self, batch):
        """This rank's equal, contiguous share of a tensor (B, ...) or tuple of them (see :func:`shard_batch`)."""
        return shard_batch(batch, self.rank, self.world_size)

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The ranks' equal shards (B / W, ...) concatenated in rank order: (B, ...), on every rank."""
        device = comm_device(self.group)
        parts = [torch.empty_like(shard, device=device) for _ in range(self.world_size)]
        with peer_failure("all_gather of batch rows", other_ranks(self.group), self.group):
            dist.all_gather(parts, shard.detach().to(device).contiguous(), group=self.group)
        return torch.cat(parts).to(shard.device)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (float64; one blocking all_reduce)."""
        total = torch.tensor(values, dtype=torch.float64, device=comm_device(self.group))
        with peer_failure("all_reduce of epoch statistics", other_ranks(self.group), self.group):
            dist.all_reduce(total, group=self.group)
        return total.tolist()

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
        with peer_failure("barrier", other_ranks(self.group), self.group):
            dist.barrier(group=self.group)
