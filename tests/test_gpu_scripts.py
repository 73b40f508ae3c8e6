"""The device scripts, run on the CPU so that the one GPU call does not discover their bugs.

scripts/check_gpu_compile.py compiles for sm_90 with whatever triton is installed here (CI also
runs it in full with the GPU machines' triton 3.6, see .ci/run); scripts/gpu_timings.py runs
every code path at small shapes in the interpreter; the shell scripts must parse.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_compile_check_reports_resources():
    out = run(sys.executable, "scripts/check_gpu_compile.py", "--only", "scale_rows", "--jobs", "1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("scale_rows")]
    assert len(rows) >= 8 and all(row[-1] == "ok" for row in rows), out.stdout
    assert "compiled" in out.stdout.splitlines()[-1]


def test_compile_check_refuses_another_triton():
    out = run(sys.executable, "scripts/check_gpu_compile.py", "--triton-version", "0.0.")
    assert out.returncode == 1 and "is not the version asked for" in out.stdout


def test_timings_smoke_on_the_cpu(tmp_path):
    csv = tmp_path / "timings.csv"
    out = run(sys.executable, "scripts/gpu_timings.py", "--device", "cpu", "--smoke", "--csv", str(csv))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = csv.read_text().splitlines()
    assert lines[0] == "device,variant,M,N,K,what,us" and len(lines) == 1 + 3 * 6


@pytest.mark.parametrize("script", ["scripts/gpu_check.sh", "scripts/gpu_paper.sh"])
def test_shell_scripts_parse(script):
    out = run("bash", "-n", script)
    assert out.returncode == 0, out.stderr


def test_paper_script_needs_data(tmp_path):
    out = subprocess.run(["bash", "scripts/gpu_paper.sh", "60"], check=False, cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "DATA_ROOT": str(tmp_path), "OUT": str(tmp_path / "out")})
    assert out.returncode == 2 and "no data" in out.stderr
