"""One FF training step of an FFLinear layer: fast paths vs the reference vs the GEMM floor.

The step is a forward pass over positive and negative rows, the local weight gradient and an
SGD-momentum update. Its floor is the two GEMMs it cannot avoid, timed in the same run:
``x @ W.T`` (B x D_in x D_out) and ``delta.T @ x`` (D_out x B x D_in).

    python benchmarks/bench_linear_step.py                 # CPU: reference, fp32 and bf16 fast path
    python benchmarks/bench_linear_step.py --device cuda   # + fused Triton vs cuBLAS

Prints a table of median times and ratios measured in this one run, and appends rows to
``--csv`` (default benchmarks/results.csv).
"""

from __future__ import annotations

import argparse

import torch

import ff_kernels

from common import append_csv, interleaved_medians, machine_name, today

SHAPES = [(784, 2000), (2000, 2000)]


def make_layer(d_in, d_out, device, backend, compute_dtype=None):
    torch.manual_seed(0)
    return ff_kernels.FFLinear(d_in, d_out, backend=backend, compute_dtype=compute_dtype, device=device)


def reference_step(layer, opt, x_pos, x_neg):
    """Plain PyTorch: autograd on the FF loss, then torch.optim.SGD."""
    opt.zero_grad(set_to_none=True)
    layer.ff_backward(x_pos, x_neg)
    opt.step()


def gemm_floor(d_in, d_out, batch, device, dtype):
    """The two GEMMs of a step: forward (B, D_in) @ (D_in, D_out) and weight grad (D_out, B) @ (B, D_in),
    written into preallocated outputs so that only the arithmetic is timed."""
    x = torch.rand(batch, d_in, device=device).to(dtype)
    w = torch.rand(d_out, d_in, device=device).to(dtype)
    delta = torch.rand(batch, d_out, device=device).to(dtype)
    h, grad = torch.empty(batch, d_out, device=device, dtype=dtype), torch.empty_like(w)
    return lambda: (torch.mm(x, w.t(), out=h), torch.mm(delta.t(), x, out=grad))


def bench_shape(d_in, d_out, half_batch, device, min_run_time):
    """Median seconds of each provider's step at one shape, timed round-robin."""
    batch = 2 * half_batch
    x_pos = torch.rand(half_batch, d_in, device=device)
    x_neg = torch.rand(half_batch, d_in, device=device)
    sgd = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
    ref = make_layer(d_in, d_out, device, "reference")
    opt = torch.optim.SGD(ref.parameters(), **sgd)
    fns = {
        "reference": lambda: reference_step(ref, opt, x_pos, x_neg),
        "floor fp32": gemm_floor(d_in, d_out, batch, device, torch.float32),
    }
    if device == "cpu":
        fast = make_layer(d_in, d_out, device, "cpu")
        fast16 = make_layer(d_in, d_out, device, "cpu", torch.bfloat16)
        fns["cpu fp32"] = lambda: fast.ff_step(x_pos, x_neg, **sgd)
        fns["cpu bf16"] = lambda: fast16.ff_step(x_pos, x_neg, **sgd)
        fns["floor bf16"] = gemm_floor(d_in, d_out, batch, device, torch.bfloat16)
    else:
        fused = make_layer(d_in, d_out, device, "triton")
        fns["triton fp32"] = lambda: fused.ff_step(x_pos, x_neg, **sgd)
    return interleaved_medians(fns, min_run_time)


def ratio_rows(times):
    """(label, value) pairs of the ratios that matter, from one run's times."""
    rows = []
    for fast, floor in (("cpu fp32", "floor fp32"), ("cpu bf16", "floor bf16"), ("triton fp32", "floor fp32")):
        if fast in times:
            rows.append((f"{fast}: speedup vs reference", times["reference"] / times[fast]))
            rows.append((f"{fast}: fraction of {floor}", times[floor] / times[fast]))
    if "cpu bf16" in times:
        rows.append(("cpu bf16 vs cpu fp32: speedup", times["cpu fp32"] / times["cpu bf16"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--half-batch", type=int, default=512, help="positive rows = negative rows = this")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timing per provider and shape")
    parser.add_argument("--csv", default="benchmarks/results.csv")
    args = parser.parse_args()

    machine = machine_name(args.device)
    if args.device == "cuda":
        # Both sides use TF32 tensor cores for fp32: cuBLAS (reference, floor) and the Triton kernels.
        torch.set_float32_matmul_precision("high")
        machine += ", fp32 GEMMs in TF32"
    print(f"# FF linear step, batch 2x{args.half_batch}, {machine}, torch {torch.__version__}, {today()}")
    csv_rows = []
    for d_in, d_out in SHAPES:
        times = bench_shape(d_in, d_out, args.half_batch, args.device, args.min_run_time)
        print(f"\n## {d_in} -> {d_out}")
        print(f"{'provider':<14}{'ms':>10}")
        for name, seconds in times.items():
            print(f"{name:<14}{seconds * 1e3:>10.2f}")
            csv_rows.append({"op": "ff_linear_step", "provider": name, "shape": f"{d_in}x{d_out}", "batch": 2 * args.half_batch,
                                 "ms": round(seconds * 1e3, 4), "machine": machine, "date": today()})
        for label, value in ratio_rows(times):
            print(f"{label:<44}{value:>8.2f}x")
    append_csv(args.csv, csv_rows)


if __name__ == "__main__":
    main()
