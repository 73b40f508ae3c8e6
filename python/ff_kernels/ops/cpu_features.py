"""What the CPU can do natively, for choosing and explaining the CPU fast path's modes."""

from __future__ import annotations

import functools
import warnings

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where that file is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


@functools.cache
def warn_if_bf16_emulated() -> None:
    """Warn once per process when bf16 GEMMs are requested on a CPU that emulates them."""
    if cpu_flags() and not has_native_bf16():
        warnings.warn(
            "compute_dtype=torch.bfloat16 on a CPU without AMX or AVX512-BF16: oneDNN emulates bf16 "
            "GEMMs there, which is several times slower than float32 (see benchmarks/README.md)",
            RuntimeWarning,
            stacklevel=3,
        )
