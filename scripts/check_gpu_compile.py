"""Compile every fftriton kernel for an sm_90 GPU on a CPU-only machine and check its resources.

For each GEMM config that ``fftriton.config`` can choose on a GPU, for fp32 with TF32 tensor
cores, fp32 with IEEE FMAs and bfloat16, masked and unmasked, and (update kernel) in "grad" and
"sgd" mode, the kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``;
Triton's bundled ptxas reports registers, stack and spills. Each variant is compiled twice: with
every integer argument divisible by 16 ("aligned": the paper's shapes, vectorized loads) and
with none ("ragged"), the two specializations the JIT makes of real calls. The row kernels are
compiled at each of their configs too.

Prints one row per compile (registers, shared memory, stack, spill bytes, whether the GEMM uses
wgmma and cp.async) and exits 1 on a compile error or on any spill or stack use, or when
shared memory exceeds the H100/H200 limit (227 KB per block).

    python scripts/check_gpu_compile.py              # every config, all cores
    python scripts/check_gpu_compile.py --jobs 1 --only update --csv out.csv
    .venv-triton36/bin/python scripts/check_gpu_compile.py --triton-version 3.6.   # as CI runs it

The JIT would compile the same code on the device: run it with the Triton version the device
has (CI: triton 3.6 in .venv-triton36, see .ci/run).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs, not the interpreter's
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report; parsed below
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would print no report

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fftriton import config
from fftriton.linear_forward import _linear_forward_kernel
from fftriton.linear_update import _linear_update_kernel
from fftriton.row_stats import _row_stats_kernel, _scale_rows_kernel

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
KERNELS = {
    "forward": _linear_forward_kernel,
    "update": _linear_update_kernel,
    "row_stats": _row_stats_kernel,
    "scale_rows": _scale_rows_kernel,
}
# Pointer element types that do not follow the weight's dtype.
FIXED_POINTERS = {"mask_ptr": "*u8", "occ_ptr": "*i32", "coef_ptr": "*fp32", "xs_ptr": "*fp32", "part_ptr": "*fp32",
                  "g_ptr": "*fp32", "loss_ptr": "*fp32", "inv_ptr": "*fp32"}
FLOAT_ARGS = {"lr", "momentum", "weight_decay", "threshold", "sign", "temperature", "inv_n_pos", "inv_n_neg",
              "norm_div", "eps"}
PRECISIONS = {"fp32-tf32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee"),
              "bf16": (torch.bfloat16, "tf32")}


@dataclass(frozen=True)
class Job:
    """One compile: a kernel, its constexprs and launch options, and the integer specialization."""

    kernel: str
    label: str  # what the constexprs mean, for the report
    dtype: str  # "fp32" or "bf16": the element type of x, W, h and the parameter-shaped tensors
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int
    spec: str  # a key of SPECS


@dataclass
class Result:
    kernel: str
    label: str
    spec: str
    blocks: str
    warps: int
    stages: int
    regs: int = -1
    smem: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    wgmma: bool = False
    cp_async: bool = False
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        found = []
        if self.spill_stores or self.spill_loads or self.stack:
            found.append(f"spills ({self.stack} B stack, {self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.smem > SMEM_LIMIT:
            found.append(f"shared memory {self.smem} B > {SMEM_LIMIT} B")
        return found


# Integer arguments that are multiples of the weight's dims: divisible by 16 when N and K are.
WEIGHT_INTS = {"N", "K", "stride_h"}
SPECS = {  # which integer arguments the JIT sees as divisible by 16
    "aligned": lambda name: True,  # every one: the paper's shapes
    "ragged_rows": lambda name: name in WEIGHT_INTS,  # N, K aligned; batch sizes and x strides not
    "ragged": lambda name: False,  # none
}


def signature(kernel, dtype: str, constexprs: dict, spec: str) -> tuple[dict, dict]:
    """Triton's signature and specialization attributes for the kernel's non-constexpr arguments."""
    sig, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = FIXED_POINTERS.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if SPECS[spec](name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = {p.name for p in kernel.params if p.is_constexpr} - set(constexprs)
    if missing:
        raise ValueError(f"{kernel.__name__}: no value for constexprs {sorted(missing)}")
    return sig, attrs


PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job: Job) -> Result:
    """Compile one job; never raises (a failure is reported in ``Result.error``)."""
    constexprs = dict(job.constexprs)
    blocks = "x".join(str(constexprs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C") if b in constexprs)
    result = Result(job.kernel, job.label, job.spec, blocks, job.num_warps, job.num_stages)
    kernel = KERNELS[job.kernel]
    log = io.StringIO()
    try:
        sig, attrs = signature(kernel, job.dtype, constexprs, job.spec)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=TARGET, options={"num_warps": job.num_warps,
                                                                   "num_stages": job.num_stages})
    except Exception as err:  # noqa: BLE001 (any compile failure is a finding to report, with the rest)
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        return result
    report = log.getvalue()
    regs, spills = PTXAS_REGS.search(report), PTXAS_SPILLS.search(report)
    if regs is None or spills is None:
        result.error = f"no ptxas report in the compile output: {report[-200:]!r}"
        return result
    result.regs = int(regs.group(1))
    result.stack, result.spill_stores, result.spill_loads = map(int, spills.groups())
    result.smem = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    result.wgmma = "wgmma.mma_async" in ptx
    result.cp_async = "cp.async" in ptx
    return result


def gemm_jobs(only: set[str]) -> list[Job]:
    """Every entry of config.GEMM_TILES, per mask and mode, at the specializations its shapes get."""
    jobs = []
    for (kind, key, aligned), cfg in config.GEMM_TILES.items():
        if kind not in only:
            continue
        dtype, precision = PRECISIONS[key]
        for masked in (False, True):
            for mode in ("grad", "sgd") if kind == "update" else (None,):
                consts = {"HAS_BIAS": True, "HAS_SCALE": True, "SQUARED": True, "PRECISION": precision,
                          "DOT_IN_FP32": False, "HAS_MASK": masked,
                          "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
                if mode is not None:
                    consts |= {"MODE": mode, "USE_BUF": mode == "sgd"}
                label = " ".join([key, "masked" if masked else "dense"] + ([mode] if mode else []))
                for spec in ("aligned", "ragged_rows") if aligned else ("ragged",):
                    jobs.append(Job(kind, label, "bf16" if dtype == torch.bfloat16 else "fp32",
                                    tuple(sorted(consts.items())), cfg.num_warps, cfg.num_stages, spec))
    return jobs


def row_jobs(only: set[str]) -> list[Job]:
    """The row-statistics and row-scaling kernels at each of their configs."""
    jobs = []
    if "row_stats" in only:
        for cfg in config.gpu_row_configs("row_stats"):
            for squared in (True, False):
                consts = {"SQUARED": squared, "BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_n}
                jobs += [Job("row_stats", "squared" if squared else "sum", "fp32", tuple(sorted(consts.items())),
                             cfg.num_warps, 1, spec) for spec in ("aligned", "ragged")]
    if "scale_rows" in only:
        for cfg in config.gpu_row_configs("scale_rows"):
            for short in ("fp32", "bf16"):
                consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
                jobs += [Job("scale_rows", short, short, tuple(sorted(consts.items())), cfg.num_warps, 1, spec)
                         for spec in ("aligned", "ragged")]
    return jobs


COLUMNS = ("kernel", "label", "spec", "blocks", "warps", "stages", "regs", "smem", "stack", "spill_stores",
           "spill_loads", "wgmma", "cp_async")


def print_table(results: list[Result]) -> None:
    header = ["kernel", "variant", "spec", "blocks", "warps", "stages", "regs", "smem KB", "stack", "spill st",
              "spill ld", "wgmma", "cp.async", "status"]
    rows = []
    for r in results:
        problems = r.problems()
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        if r.error:
            rows.append([r.kernel, r.label, r.spec, r.blocks, r.warps, r.stages] + [""] * 7 + [status])
            continue
        rows.append([r.kernel, r.label, r.spec, r.blocks, r.warps, r.stages, r.regs, f"{r.smem / 1024:.1f}", r.stack,
                     r.spill_stores, r.spill_loads, "y" if r.wgmma else "-", "y" if r.cp_async else "-", status])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", nargs="+", choices=list(KERNELS), default=list(KERNELS), help="kernels to compile")
    parser.add_argument("--csv", help="also write the table as CSV to this path")
    parser.add_argument("--triton-version", help="fail unless the imported triton's version starts with this")
    args = parser.parse_args(argv)
    if args.triton_version and not triton.__version__.startswith(args.triton_version):
        print(f"triton {triton.__version__} is not the version asked for ({args.triton_version}): {triton.__file__}")
        return 1
    only = set(args.only)
    jobs = gemm_jobs(only) + row_jobs(only)
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}: {len(jobs)} compiles on {args.jobs} processes",
          flush=True)
    start = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(compile_job, jobs, chunksize=4))
    else:
        results = [compile_job(job) for job in jobs]
    print_table(results)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in results)
    failed = [r for r in results if r.problems()]
    print(f"compiled {len(results)} kernels: {len(results) - len(failed)} ok, {len(failed)} failing ({time.time() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
