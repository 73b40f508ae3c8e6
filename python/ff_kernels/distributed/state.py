"""Copying a module's state from one rank to the others."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .comm import comm_device, group_rank_and_size, other_ranks, peer_failure


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0, process_group: dist.ProcessGroup | None = None) -> None:
    """Give every rank of the group rank ``src``'s state of ``module`` (collective: all ranks call it).

    The whole ``state_dict`` travels: parameters and buffers, including those FF layers create
    on first use (momentum buffers), which may exist on ``src`` only; the receivers load it with
    ``load_state_dict`` (strict), so their modules must have the same structure. Rank ``src``
    first broadcasts the names, shapes and dtypes, then each tensor. ``src`` is a rank of
    ``process_group`` (None: the default group).
    """
    rank, size = group_rank_and_size(process_group)
    if not 0 <= src < size:
        raise ValueError(f"broadcast_parameters: src must be a rank in 0..{size - 1}, got {src}")
    if size == 1:
        return
    device = comm_device(process_group)
    peers = [src] if rank != src else other_ranks(process_group)
    state = module.state_dict() if rank == src else None
    layout = [[(name, tuple(t.shape), t.dtype) for name, t in state.items()] if rank == src else None]
    with peer_failure(f"broadcast of the state layout from rank {src}", peers, process_group):
        dist.broadcast_object_list(layout, group=process_group, group_src=src, device=device)
    if rank == src:
        tensors = [state[name].to(device).contiguous() for name, _, _ in layout[0]]
    else:
        tensors = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in layout[0]]
    for (name, _, _), tensor in zip(layout[0], tensors):
        with peer_failure(f"broadcast of {name} from rank {src}", peers, process_group):
            dist.broadcast(tensor, group=process_group, group_src=src)
    if rank != src:
        module.load_state_dict({name: t for (name, _, _), t in zip(layout[0], tensors)})
