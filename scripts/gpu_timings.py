"""Kernel timings of one FF linear layer at the paper's shapes: fused Triton launchers vs torch.mm.

For fp32 with TF32 tensor cores, fp32 IEEE and bfloat16, at M = 1024 rows (512 positive, 512
negative), N = 2000 units and K = 784 and 2000 inputs, times

* the forward launcher (GEMM + ReLU + goodness partials) against ``torch.mm(x, W.T)``;
* the update launcher in "sgd" mode (GEMM + SGD-momentum epilogue) against ``torch.mm(delta.T, x)``;
* ``FFLinear.ff_step`` (four launches and the input checks) as GPU time, and as wall time per
  step over a loop of steps with one synchronization at the end, which includes the host's
  launch overhead: the number a training loop sees.

GPU times come from ``triton.testing.do_bench`` (median, ms). Prints a table headed by the
device's name and appends it to ``--csv``. ``--device cpu --smoke`` runs every code path at
small shapes on the CPU (Triton interpreter, wall-clock timer) to check the script itself.

    python scripts/gpu_timings.py --csv $OUT/timings.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

VARIANTS = ("fp32-tf32", "fp32-ieee", "bf16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="small shapes and few repeats: checks the script")
    parser.add_argument("--steps", type=int, default=200, help="ff_step calls in the wall-clock loop")
    parser.add_argument("--csv", help="append the rows to this CSV file")
    return parser.parse_args(argv)


def make_timer(device):
    """(median ms of fn(), synchronize): do_bench on a GPU, the wall clock on the CPU."""
    import torch

    if device.type == "cuda":
        import triton

        return (lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"),
                torch.cuda.synchronize)

    def wall_ms(fn) -> float:
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return wall_ms, lambda: None


def time_variant(device, variant: str, half: int, n_out: int, k: int, steps: int) -> dict[str, float]:
    """Milliseconds of each timed call for one dtype/precision at (M = 2 * half, N = n_out, K = k)."""
    import torch

    import ff_kernels
    import fftriton

    timer, sync = make_timer(device)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    precision = "ieee" if variant == "fp32-ieee" else "tf32"
    torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")
    torch.manual_seed(0)
    x_pos = torch.rand(half, k, device=device).to(dtype)
    x_neg = torch.rand(half, k, device=device).to(dtype)
    x = torch.cat([x_pos, x_neg])
    w = (torch.randn(n_out, k, device=device) / k**0.5).to(dtype)
    b = torch.zeros(n_out, device=device, dtype=dtype)
    h, partials = fftriton.ff_linear_forward(x_pos, x_neg, w, b, goodness="ssq", precision=precision)
    stats = fftriton.ff_row_stats(partials, half, goodness="ssq", threshold=float(n_out), temperature=1.0,
                                  n_features=n_out)
    w_buf, b_buf = torch.zeros_like(w), torch.zeros_like(b)
    delta = torch.rand(2 * half, n_out, device=device).to(dtype)
    out_h, out_dw = torch.empty_like(h), torch.empty_like(w)
    sgd = {"lr": 1e-6, "momentum": 0.9, "weight_decay": 0.0}
    layer = ff_kernels.FFLinear(k, n_out, backend="triton", device=device, dtype=dtype)

    def step():
        layer.ff_step(x_pos, x_neg, **sgd)

    times = {
        "forward fused": timer(lambda: fftriton.ff_linear_forward(
            x_pos, x_neg, w, b, goodness="ssq", precision=precision)),
        "forward torch.mm": timer(lambda: torch.mm(x, w.t(), out=out_h)),
        "update sgd fused": timer(lambda: fftriton.ff_linear_update(
            x_pos, x_neg, h, stats.coef, w, b, goodness="ssq", mode="sgd", weight_buf=w_buf, bias_buf=b_buf,
            precision=precision, **sgd)),
        "update torch.mm": timer(lambda: torch.mm(delta.t(), x, out=out_dw)),
        "ff_step (device time)": timer(step),
    }
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    times["ff_step (wall per step)"] = (time.perf_counter() - start) * 1e3 / steps
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    device = torch.device(args.device)
    if args.smoke:
        half, n_out, widths, steps = 8, 48, (40,), 3
    else:
        half, n_out, widths, steps = 512, 2000, (784, 2000), args.steps
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    rows = []
    for k in widths:
        for variant in VARIANTS:
            for what, ms in time_variant(device, variant, half, n_out, k, steps).items():
                rows.append({"device": name, "variant": variant, "M": 2 * half, "N": n_out, "K": k, "what": what,
                             "us": round(ms * 1e3, 1)})

    print(f"== {name}: median microseconds (M = {2 * half}, N = {n_out})")
    print(f"{'K':>5}  {'variant':10}  {'what':24}  {'us':>9}")
    for row in rows:
        print(f"{row['K']:>5}  {row['variant']:10}  {row['what']:24}  {row['us']:>9.1f}")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
