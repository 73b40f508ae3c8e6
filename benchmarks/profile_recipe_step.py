"""Where a recipe's training step spends its time: torch.profiler on bench_recipes' step.

Runs the step of ``bench_recipes.py``'s case (the paper's size and batch, random data of the
real shapes) a few times to warm up, then ``--steps`` times under ``torch.profiler``, and prints
the ops by self CPU time per step, with the step's GEMMs (``mm``, ``addmm``, ``bmm`` and
their in-place and batched forms) summed apart from the rest: what is left over is the
overhead around the GEMMs.

    python benchmarks/profile_recipe_step.py local --steps 20
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_recipes import CASES
from common import load_average, machine_name, today

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addbmm_"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (after 5 warm-up steps)")
    parser.add_argument("--rows", type=int, default=25, help="ops to list")
    args = parser.parse_args()
    case = CASES[args.recipe]("cpu")
    for _ in range(5):
        case.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            case.step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    per_step = lambda e: e.self_cpu_time_total / args.steps / 1e3  # ms
    total = sum(per_step(e) for e in events)
    gemm = sum(per_step(e) for e in events if e.key in GEMM_OPS)
    print(f"# {case.name} ({case.shape}), batch {case.batch}, {args.steps} steps; {machine_name('cpu')}, "
          f"torch {torch.__version__}, {load_average()}, {today()}")
    print(f"self CPU per step {total:.2f} ms: GEMMs {gemm:.2f} ms, everything else {total - gemm:.2f} ms")
    print(f"\n{'op':<40}{'ms/step':>9}{'share':>8}{'calls/step':>12}")
    for e in events[: args.rows]:
        print(f"{e.key[:39]:<40}{per_step(e):>9.3f}{per_step(e) / total:>8.1%}{e.count / args.steps:>12.1f}")


if __name__ == "__main__":
    main()
