"""FF training throughput on 1 vs N processes: data parallel and the layer pipeline.

    python benchmarks/bench_distributed.py                            # CPU, gloo: 1 vs 2 processes
    python benchmarks/bench_distributed.py --backend nccl --nproc 4   # 1 vs 4 GPUs, rank r on cuda:r

Each configuration runs in its own processes (ff_kernels.distributed.spawn) and trains an
FFSequential of FFLinear layers (``--widths``) with fused SGD steps on global batches of
``--half-batch`` positive + ``--half-batch`` negative rows:

- data parallel: every process has a replica and a 1/N shard of each batch
  (DataParallelFF.fused_step: gradients all-reduced layer by layer);
- pipeline: process r trains the r-th group of layers (LayerPipeline.run) on the stream of
  batches; with 1 process this is plain FFSequential.ff_step.

Samples are rows (positive + negative) per second, timed between barriers after warm-up
batches; the pipeline's time includes filling and draining it (N - 1 extra stage steps).
Prints a table and appends rows (ms per global batch) to ``--csv``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ff_kernels
from ff_kernels.distributed import DataParallelFF, LayerPipeline, spawn

from common import append_csv, machine_name, today

SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
MODES = ("data parallel", "pipeline")


def make_net(widths, device) -> ff_kernels.FFSequential:
    torch.manual_seed(0)
    return ff_kernels.FFSequential(*(ff_kernels.FFLinear(d_in, d_out, device=device) for d_in, d_out in itertools.pairwise(widths)))


def worker(rank, device, mode, widths, half_batch, steps, warmup, results) -> None:
    """Train ``warmup`` then ``steps`` batches; rank 0 puts the timed seconds into ``results``."""
    world = dist.get_world_size()
    net = make_net(widths, device)
    rows = half_batch // world if mode == "data parallel" else half_batch
    batch = (torch.rand(rows, widths[0], device=device), torch.rand(rows, widths[0], device=device))
    if mode == "data parallel":
        dp = DataParallelFF(net)

        def train(n):
            for _ in range(n):
                dp.fused_step(*batch, **SGD)
    else:
        pipe = LayerPipeline(net)

        def train(n):
            pipe.run([batch] * n if rank == 0 else None, **SGD)

    def synchronized():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        return time.perf_counter()

    train(warmup)
    started = synchronized()
    train(steps)
    seconds = synchronized() - started
    if rank == 0:
        results.put(seconds)


def measure(mode, nproc, args) -> float:
    """Seconds per global batch of ``mode`` on ``nproc`` processes."""
    results = mp.get_context("spawn").SimpleQueue()
    spawn(worker, nproc, args=(mode, args.widths, args.half_batch, args.steps, args.warmup, results),
          backend=args.backend, threads=args.threads)
    return results.get() / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="gloo: CPU processes; nccl: one GPU each")
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs with nccl) compared with 1")
    parser.add_argument("--widths", default="784,2000,2000,2000,2000", help="layer sizes, input first")
    parser.add_argument("--half-batch", type=int, default=512, help="positive rows = negative rows per global batch")
    parser.add_argument("--steps", type=int, default=10, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--csv", default="benchmarks/results.csv")
    args = parser.parse_args()
    args.widths = [int(w) for w in args.widths.split(",")]
    if args.half_batch % args.nproc:
        parser.error(f"--half-batch {args.half_batch} must be divisible by --nproc {args.nproc} (equal data-parallel shards)")
    if args.nproc > len(args.widths) - 1:
        parser.error(f"--nproc {args.nproc} exceeds the {len(args.widths) - 1} layers the pipeline can split")

    device = "cuda" if args.backend == "nccl" else "cpu"
    torch.set_num_threads(args.threads)
    machine = machine_name(device)
    net_name = "-".join(map(str, args.widths))
    print(f"# FF distributed training, {net_name}, batch 2x{args.half_batch}, {args.backend}, {machine} per process, "
          f"torch {torch.__version__}, {today()}")
    if device == "cpu":
        cores = os.cpu_count()
        print(f"# {cores} CPU cores on this machine, shared by {args.nproc} processes x {args.threads} threads and any "
              f"other load: expect little speed-up where the processes outnumber the free cores")
    print(f"\n{'mode':<15}{'processes':>10}{'ms/batch':>11}{'samples/s':>11}{'vs 1 process':>14}")
    csv_rows = []
    for mode in MODES:
        single = None
        for nproc in (1, args.nproc):
            seconds = measure(mode, nproc, args)
            single = single or seconds
            print(f"{mode:<15}{nproc:>10}{seconds * 1e3:>11.1f}{2 * args.half_batch / seconds:>11.0f}{single / seconds:>13.2f}x",
                  flush=True)
            csv_rows.append({"op": "ff_distributed", "provider": f"{mode} x{nproc} {args.backend}", "shape": net_name,
                                 "batch": 2 * args.half_batch, "ms": round(seconds * 1e3, 4), "machine": machine, "date": today()})
    append_csv(args.csv, csv_rows)


if __name__ == "__main__":
    main()
