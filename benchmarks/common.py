"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics

import torch
from torch.utils import benchmark


def machine_name(device: str) -> str:
    """The accelerator's name, or the CPU model and the threads torch uses."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def median_seconds(fn, min_run_time: float = 1.0) -> float:
    """Median wall time of ``fn()`` over repeated runs (CUDA-synchronized by torch's Timer)."""
    fn()  # warm up (allocations, Triton compilation)
    # torch's Timer runs single-threaded unless told otherwise; time with every thread torch uses.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_medians(fns: dict, min_run_time: float = 1.0, rounds: int = 5) -> dict:
    """Median time of each ``fns[name]()``, measured in ``rounds`` round-robin rounds.

    Every round times each function for ``min_run_time / rounds`` seconds; the result is the
    median over rounds. Interleaving keeps the ratios fair on a machine whose speed drifts
    (shared cores, clock changes) while the benchmark runs.
    """
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(median_seconds(fn, min_run_time / rounds))
    return {name: sorted(times)[len(times) // 2] for name, times in per_round.items()}


def append_csv(path: str, rows: list[dict]) -> None:
    """Append result rows (dicts with the same keys) to a CSV file, writing a header if new."""
    if not rows:
        return
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def today() -> str:
    return datetime.date.today().isoformat()


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_calls(fns: dict, min_run_time: float = 2.0, rounds: int = 5, device: str = "cpu",
                      max_runs: int | None = None) -> dict[str, list[list[float]]]:
    """Seconds of every call of each ``fns[name]()``, per round: ``{name: [round 1's calls, ...]}``,
    timed round-robin over ``rounds`` rounds.

    Made for whole training steps (tens of ms to seconds): each function is called once to warm
    up, then in every round for about ``min_run_time / rounds`` seconds (at least once), each
    call timed on its own. A slow function (the reference of a big net) thus costs a few calls,
    not a fixed block of them. ``max_runs`` caps a function's calls per round. Interleaving
    keeps the ratios fair on a machine whose speed drifts.
    """
    import time

    calls = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    synchronize(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            spent, times = 0.0, []
            while not times or (spent < min_run_time / rounds and (max_runs is None or len(times) < max_runs)):
                start = time.perf_counter()
                fn()
                synchronize(device)
                elapsed = time.perf_counter() - start
                times.append(elapsed)
                spent += elapsed
            calls[name].append(times)
    return calls


def summarize(times: list[float], statistic: str = "median") -> float:
    """The median (or ``statistic="min"``: fastest) of ``times``."""
    return min(times) if statistic == "min" else sorted(times)[len(times) // 2]


def interleaved_step_times(fns: dict, min_run_time: float = 2.0, rounds: int = 5, device: str = "cpu",
                           max_runs: int | None = None, statistic: str = "median") -> dict:
    """Median (or ``statistic="min"``: fastest) seconds per call of each ``fns[name]()`` over all
    the calls of :func:`interleaved_calls`. On a machine that other jobs use now and then, the
    fastest call of each estimates its time on the machine alone."""
    return overall_times(interleaved_calls(fns, min_run_time, rounds, device, max_runs), statistic)


def overall_times(calls: dict[str, list[list[float]]], statistic: str = "median") -> dict[str, float]:
    """Each function's :func:`summarize` over all its calls of :func:`interleaved_calls`."""
    return {name: summarize([t for r in per_round for t in r], statistic) for name, per_round in calls.items()}


def paired_ratio(calls: dict[str, list[list[float]]], numerator: str, denominator: str,
                 statistic: str = "median") -> float:
    """The median over rounds of ``summarize(numerator's calls) / summarize(denominator's calls)``
    within each round of :func:`interleaved_calls`: each ratio compares calls made seconds apart,
    so a machine whose speed drifts over a run moves it less than it moves the ratio of the
    whole run's statistics."""
    return statistics.median(summarize(a, statistic) / summarize(b, statistic)
                             for a, b in zip(calls[numerator], calls[denominator], strict=True))


def load_average() -> str:
    """The 1-minute load average and the number of CPUs, e.g. "load 0.42 / 2 CPUs"."""
    try:
        return f"load {os.getloadavg()[0]:.2f} / {os.cpu_count()} CPUs"
    except OSError:
        return "load unknown"
