"""Starting the processes: join a process group from torchrun's environment, or spawn them here.

With torchrun (one process per GPU, or per CPU share)::

    torchrun --nproc-per-node 2 my_script.py      # my_script calls init_from_env()

or from Python, on this machine::

    ff_kernels.distributed.spawn(train_fn, nproc=2)   # each process calls train_fn(rank, device)
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Must exceed the longest time a rank can wait for another at a matching communication: one
# pipeline stage's step, or rank-0-only evaluation and checkpointing while the others wait.
DEFAULT_TIMEOUT_S = 300.0
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def default_backend() -> str:
    """"nccl" when CUDA and NCCL are available, else "gloo"."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group that the environment describes (torchrun sets it).

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK (default 0). ``backend``
    None picks :func:`default_backend`. Every operation of the group gives up after
    ``timeout_s`` seconds, so a stuck peer becomes an error (see
    :mod:`ff_kernels.distributed.comm`). Returns this rank's device: ``cuda:LOCAL_RANK`` with
    NCCL (made the current device), else the CPU.
    """
    missing = [name for name in ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_from_env: environment variables {missing} are not set; start the processes with "
            "torchrun --nproc-per-node N (or ff_kernels.distributed.spawn)"
        )
    backend = backend or default_backend()
    if not float(timeout_s) > 0:
        raise ValueError(f"init_from_env: timeout_s must be > 0, got {timeout_s}")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, timeout=datetime.timedelta(seconds=float(timeout_s)), device_id=device if backend == "nccl" else None
    )
    return device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    fn: Callable[..., None],
    nproc: int,
    args: tuple = (),
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int = 1,
    join: bool = True,
) -> mp.ProcessContext | None:
    """Run ``fn(rank, device, *args)`` in ``nproc`` new processes of one process group.

    The processes are started by torch.multiprocessing (start method "spawn", so ``fn`` and
    ``args`` must be picklable: a module-level function), join a group on a free local port
    with :func:`init_from_env` (``backend``, ``timeout_s``) and use ``threads`` torch threads
    each; with NCCL rank r uses ``cuda:r``. With ``join`` it returns when all have finished;
    if one raises, the others are stopped and ``torch.multiprocessing.ProcessRaisedException``
    carries its traceback. Without, it returns the ``ProcessContext`` at once (its
    ``processes`` can be joined one by one).
    """
    if int(nproc) < 1:
        raise ValueError(f"spawn: nproc must be >= 1, got {nproc}")
    port = free_port()
    return mp.spawn(_worker, args=(fn, int(nproc), port, backend, timeout_s, threads, args), nprocs=int(nproc), join=join)


def _worker(rank, fn, nproc, port, backend, timeout_s, threads, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    device = init_from_env(backend, timeout_s)
    try:
        fn(rank, device, *args)
    finally:
        dist.destroy_process_group()
