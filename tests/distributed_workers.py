"""What each spawned process of tests/test_distributed.py runs (module-level, so spawn can pickle it).

Every worker writes its results to ``out_dir/rank<r>.pt``; the test process compares them
with the single-process references built from the same functions here.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ff_kernels
from ff_kernels.distributed import (
    DataParallelFF,
    LayerPipeline,
    PeerError,
    all_reduce_counts,
    average_gradients,
    shard_batch,
)

WIDTHS = (12, 16, 16, 16, 8)
STEPS = 3
BATCH = 8  # positive and negative rows per global batch: 4 + 4 per rank on 2 ranks
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


def make_net(seed: int = 0) -> ff_kernels.FFSequential:
    """4 FFLinear layers; layers 0 and 2 with peer normalization strong enough to matter."""
    torch.manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(WIDTHS)):
        peer = ff_kernels.PeerNormalization(d_out, strength=0.5, momentum=0.5) if i % 2 == 0 else None
        layers.append(ff_kernels.FFLinear(d_in, d_out, threshold=1.0, temperature=0.5, backend="cpu", peer_norm=peer))
    return ff_kernels.FFSequential(*layers)


def make_local_net(seed: int = 0) -> ff_kernels.FFSequential:
    """2 FFLocal2d layers: 4-D activities travel between the pipeline ranks."""
    torch.manual_seed(seed)
    return ff_kernels.FFSequential(
        ff_kernels.FFLocal2d(2, 6, 3, kernel=3, padding=1, threshold=1.0),
        ff_kernels.FFLocal2d(3, 6, 2, kernel=3, padding=1, threshold=1.0),
    )


def make_batches(shape=(WIDTHS[0],), steps=STEPS, seed=1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(BATCH, *shape, generator=gen), torch.rand(BATCH, *shape, generator=gen)) for _ in range(steps)]


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, **SGD)


def train_and_compare(rank: int, device: torch.device, out_dir: str) -> None:
    """2-rank data-parallel (both paths), pipeline (both paths, linear and local nets), counts."""
    world = dist.get_world_size()
    batches = make_batches()
    results = {}

    net = make_net(seed=rank)  # rank 1 starts different: DataParallelFF broadcasts rank 0's weights
    dp = DataParallelFF(net)
    opt = sgd(net.parameters())
    losses = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        losses.append(torch.stack(dp.ff_backward(*shard_batch(batch, rank, world))))
        opt.step()
    results["dp_backward"] = (net.state_dict(), torch.stack(losses))

    net = make_net(seed=rank)
    dp = DataParallelFF(net)
    losses = [torch.stack(dp.fused_step(*shard_batch(batch, rank, world), **SGD)) for batch in batches]
    results["dp_fused"] = (net.state_dict(), torch.stack(losses))

    for name, make, shape in (("pipe", make_net, (WIDTHS[0],)), ("pipe_local", make_local_net, (2, 6, 6))):
        net = make()
        pipe = LayerPipeline(net, max_in_flight=1)
        losses = pipe.run(make_batches(shape) if rank == 0 else None, **SGD)
        pipe.synchronize()
        results[f"{name}_fused"] = (net.state_dict(), losses)
    net = make_net()
    pipe = LayerPipeline(net)
    losses = pipe.run(batches if rank == 0 else None, optimizer=sgd(pipe.stage.parameters()))
    pipe.synchronize()
    results["pipe_backward"] = (net.state_dict(), losses)

    head = torch.nn.Linear(3, 2)
    head.weight.grad = torch.full_like(head.weight, float(rank))
    average_gradients(head.parameters())
    results["head_grad"] = head.weight.grad
    results["counts"] = all_reduce_counts(torch.tensor(rank + 1), 10)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def die_or_survive(rank: int, device: torch.device, mode: str, out_dir: str) -> None:
    """One rank stops after the first batch; the other records the error it gets and how soon.

    mode "pipeline": rank 0 is killed (SIGKILL) while rank 1 waits in a recv for its next
    batch. "data_parallel": rank 1 is killed while rank 0 waits in an all_reduce. "hang":
    rank 1 sleeps instead (alive, silent) while rank 0 waits in an all_reduce.
    """
    world = dist.get_world_size()
    victim = 0 if mode == "pipeline" else 1

    def stop_if_victim():
        if rank == victim:
            if mode == "hang":
                time.sleep(30)
            os.kill(os.getpid(), signal.SIGKILL)

    def stream():
        for t, batch in enumerate(make_batches(steps=50)):
            if t == 1:
                stop_if_victim()
            yield batch

    started = time.perf_counter()
    try:
        if mode == "pipeline":
            LayerPipeline(make_net(), max_in_flight=1).run(stream() if rank == 0 else None, **SGD)
        else:
            dp = DataParallelFF(make_net())
            for batch in stream():
                dp.fused_step(*shard_batch(batch, rank, world), **SGD)
        outcome = {"error": None}
    except PeerError as err:
        outcome = {"error": str(err)}
    outcome["seconds"] = time.perf_counter() - started
    torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")
