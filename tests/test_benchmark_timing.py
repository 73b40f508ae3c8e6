"""The benchmarks' timing helpers (benchmarks/common.py): interleaved rounds and paired ratios."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import interleaved_calls, paired_ratio, summarize


def test_interleaved_calls_time_every_function_once_or_more_per_round():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    calls = interleaved_calls(fns, min_run_time=0.0, rounds=3, max_runs=1)
    assert list(calls) == ["a", "b"]
    assert [len(r) for r in calls["a"]] == [1, 1, 1] and [len(r) for r in calls["b"]] == [1, 1, 1]
    assert order == ["a", "b"] * 4  # one warm-up call each, then the rounds alternate


def test_paired_ratio_is_robust_to_one_fast_moment():
    """The floor takes 0.5 s and the step 1 s at the machine's usual speed, but the machine ran
    twice as fast while the floor ran in round 1: the ratio of the run's minima says 0.25, the
    median of the rounds' ratios 0.5."""
    floor_speed, step_speed = [0.5, 1.0, 1.0, 1.0, 1.0], [1.0] * 5
    calls = {"floor": [[0.5 * s, 0.55 * s] for s in floor_speed], "step": [[1.0 * s, 1.1 * s] for s in step_speed]}
    overall = (summarize([t for r in calls["floor"] for t in r], "min")
               / summarize([t for r in calls["step"] for t in r], "min"))
    assert overall == pytest.approx(0.25)
    assert paired_ratio(calls, "floor", "step", "min") == pytest.approx(0.5)
    assert paired_ratio(calls, "floor", "step", "median") == pytest.approx(0.55 / 1.1)


def test_paired_ratio_of_an_even_number_of_rounds_is_the_mean_of_the_middle_two():
    calls = {"x": [[1.0], [2.0], [3.0], [4.0]], "y": [[1.0]] * 4}
    assert paired_ratio(calls, "x", "y") == pytest.approx(2.5)
