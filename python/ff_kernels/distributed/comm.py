"""Facts about a process group and the error raised when a peer rank fails.

How a dead or stuck rank becomes an error on the others (instead of a hang):

- gloo (CPU): when a process dies, the operating system closes its TCP connections, so a
  pending ``recv``, ``send`` or collective on a peer fails at once ("Connection closed by
  peer"). A rank that is alive but stuck (or a lost machine whose connections stay half open)
  is caught by the process group's timeout, ``init_process_group(timeout=...)``
  (:func:`~ff_kernels.distributed.launch.init_from_env` sets it): every gloo operation,
  point-to-point receives included, gives up after it.
- NCCL (GPU): ``Work.wait()`` only orders CUDA streams, so the host does not notice a failure
  there; NCCL's watchdog thread aborts the communicator when an operation exceeds the same
  timeout and, by default (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``), ends the process with an
  error naming the operation. ``TORCH_NCCL_BLOCKING_WAIT=1`` makes ``wait()`` raise instead.

Every communication call of this package runs inside :func:`peer_failure`, which turns the
backend's error into a :class:`PeerError` naming this rank, the operation and the peer ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """A communication with other ranks failed: one died, or did not answer within the timeout."""


def group_rank_and_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); ``group`` None is the default group."""
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: start the processes with torchrun (and call "
            "ff_kernels.distributed.init_from_env()) or with ff_kernels.distributed.spawn()"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where the tensors this package creates for ``group``'s communication live.

    NCCL communicates CUDA tensors (this process's current device); gloo here uses CPU tensors.
    """
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device(name: str, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Refuse a model on a device the group's backend does not communicate (see :func:`comm_device`)."""
    expected = comm_device(group)
    if device.type != expected.type:
        raise ValueError(
            f"{name}: the {dist.get_backend(group)} backend communicates {expected.type} tensors, but the net is on "
            f"{device}; use gloo for CPU training and nccl with the net on cuda:LOCAL_RANK (init_from_env returns it)"
        )


@contextmanager
def peer_failure(what: str, peers: Sequence[int], group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Run a communication call; turn a backend failure into a :class:`PeerError`.

    ``what`` names the operation ("all_reduce of layer 2's gradients"), ``peers`` the group
    ranks it depends on. Keep the block to the communication calls themselves: any
    RuntimeError inside is reported as a peer failure.
    """
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        rank, size = group_rank_and_size(group)
        who = f"rank {peers[0]}" if len(peers) == 1 else f"one of ranks {list(peers)}"
        raise PeerError(
            f"rank {rank} of {size}: {what} failed: {who} stopped (died or closed the connection) or did not "
            f"answer within the process group's timeout (init_process_group(timeout=...)). Backend error: {err}"
        ) from err


def other_ranks(group: dist.ProcessGroup | None = None) -> list[int]:
    """Every group rank but this one: the peers of a collective."""
    rank, size = group_rank_and_size(group)
    return [r for r in range(size) if r != rank]
