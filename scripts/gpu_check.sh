#!/usr/bin/env bash
# Every check that needs a GPU, in one bounded call on a lent device (docs/gpu.md). The device
# has its own torch (CUDA), triton, nvcc and Python and no network: nothing is installed, no
# venv is made, and the CUDA extension is built in place against that torch.
#
# Phases, in order, each under `timeout` and within BUDGET_S seconds in all (default 450):
#   1 env          torch, CUDA, triton, nvcc, gcc, Python, GPU name and SM count, test plugins
#   2 build        the CUDA extension for sm_90 (TORCH_CUDA_ARCH_LIST=9.0); fails unless
#                  torch.ops.ff_kernels.built_with_cuda()
#   3 correctness  a smoke test, then one FF step at the paper's shapes for every precision,
#                  mask and mode, and the no-host-sync steps, under CUDA_LAUNCH_BLOCKING=1
#   4 timings      fused launchers vs torch.mm (tf32, ieee, bf16) and ff_step us/step
#   5 bench_*      benchmarks/*.py --device cuda (bench_recipes.py too when it exists)
#   6 pytest       the rest of the default test suite on the GPU: xdist by file when installed,
#                  else one process per file; per-test timeout when pytest-timeout is installed
# Logs, junit XML and CSVs are written to $LOGS (/tmp/ff_gpu_check) and, after every phase,
# gathered into $OUT (/tmp/ff_gpu_check_out) as at most 5 files, since a device call returns at
# most 8: status.txt, timings.csv, results.csv, env.log and logs.tar.gz (everything). The output
# ends with one status line per phase; the exit status is 1 if any phase did not pass.
#
#     OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ff_gpu_check_out}
LOGS=${LOGS:-/tmp/ff_gpu_check}
BUDGET_S=${BUDGET_S:-450}
PY=${PYTHON:-python3}
JOBS=${JOBS:-8}
mkdir -p "$OUT" "$LOGS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=9.0 LOGS PY JOBS
unset TRITON_INTERPRET CUDA_LAUNCH_BLOCKING
STATUS=()
FAILED=0

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# pytest options every phase shares: the repository's addopts need pytest-benchmark, which the
# device may lack, so they are replaced; collection errors (a missing optional package) only
# cost their own file.
PYTEST_OPTS=(-p no:cacheprovider -o addopts= -m "not slow" -rfE --continue-on-collection-errors)
if has_module pytest_timeout; then PYTEST_OPTS+=(--timeout=120); fi
export PYTEST_OPTS_STR="${PYTEST_OPTS[*]@Q}"

print_status() {
  echo "== status ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(($(date +%s) - START))s of ${BUDGET_S}s)"
  printf '%s\n' "${STATUS[@]}"
}

# What comes back from the device: a few files in $OUT, refreshed after every phase.
collect() {
  print_status >"$LOGS/status.txt"
  for f in status.txt timings.csv results.csv env.log; do
    if [ -f "$LOGS/$f" ]; then cp "$LOGS/$f" "$OUT/$f"; fi
  done
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
}

# run_phase NAME CAP_S COMMAND...: run COMMAND under timeout (CAP_S, or what is left of the
# budget), log to $LOGS/NAME.log, show its last lines, record a status line and collect.
run_phase() {
  local name=$1 cap=$2
  shift 2
  local left=$((START + BUDGET_S - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    STATUS+=("$(printf '%-22s SKIPPED (budget spent)' "$name")")
    FAILED=1
    collect
    return
  fi
  echo "== $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-25}" "$LOGS/$name.log"
  local secs=$(($(date +%s) - t0)) result
  case $rc in
    0) result="ok" ;;
    124 | 137) result="TIMEOUT after ${limit}s"; FAILED=1 ;;
    *) result="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  local summary
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$LOGS/$name.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  STATUS+=("$(printf '%-22s %s (%ss)%s' "$name" "$result" "$secs" "${summary:+: $summary}")")
  collect
}

phase_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
  "$PY" - <<'PYTHON'
import importlib, platform, sys
import torch
from torch.utils import cpp_extension
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
print("CUDA_HOME", cpp_extension.CUDA_HOME)
for name in ("triton", "numpy", "pytest", "xdist", "pytest_timeout", "pytest_benchmark", "hypothesis",
             "tqdm", "matplotlib", "ninja", "setuptools", "pybind11"):
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as err:  # an absent package is a fact to record
        print(f"  {name} MISSING ({type(err).__name__})")
PYTHON
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc MISSING"; fi
  gcc --version | head -1
  echo "cores $(nproc), $(free -g | awk '/Mem:/ {print $2}') GiB"
}

phase_build() {
  rm -f python/ff_kernels/_C*.so
  CFLAGS=-g0 MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" -c "
import torch, ff_kernels._C
assert torch.ops.ff_kernels.built_with_cuda(), 'ff_kernels._C was built without CUDA: setup.py found no nvcc (CUDA_HOME)'
print('ff_kernels._C built with CUDA for TORCH_CUDA_ARCH_LIST', '$TORCH_CUDA_ARCH_LIST')"
}

phase_correctness() {
  eval "opts=($PYTEST_OPTS_STR)"
  export CUDA_LAUNCH_BLOCKING=1
  local rc=0
  echo "-- smoke"
  "$PY" -m pytest "${opts[@]}" -q tests/test_fftriton.py -k "batch1 or empty" || rc=1
  echo "-- production shapes, no host sync"
  "$PY" -m pytest "${opts[@]}" -v --junitxml="$LOGS/junit-correctness.xml" \
    tests/test_fftriton_production.py tests/test_finite_checks.py || rc=1
  return $rc
}

phase_pytest() {
  eval "opts=($PYTEST_OPTS_STR)"
  if has_module xdist; then
    "$PY" -m pytest "${opts[@]}" -v -n "$JOBS" --dist loadfile --junitxml="$LOGS/junit-pytest.xml" \
      --ignore tests/test_fftriton_production.py --ignore tests/test_finite_checks.py tests
    return
  fi
  # One process per file, JOBS at a time: a CUDA fault poisons only its own file.
  mkdir -p "$LOGS/pytest"
  ls tests/test_*.py | grep -v -e test_fftriton_production -e test_finite_checks | xargs -P "$JOBS" -I{} sh -c \
    "name=\$(basename {} .py); \"$PY\" -m pytest $PYTEST_OPTS_STR -v --junitxml=\"$LOGS/pytest/\$name.xml\" {} \
       >\"$LOGS/pytest/\$name.log\" 2>&1; echo \"\$name: \$(tail -1 \"$LOGS/pytest/\$name.log\")\""
  local total
  total=$(cat "$LOGS"/pytest/*.log | grep -E "^=+ .*(passed|failed|error).* in " |
    grep -oE "[0-9]+ (passed|failed|errors?|skipped)" | awk '{n[$2]+=$1} END {for (k in n) printf "%d %s, ", n[k], k}')
  echo "${total%, } in all"
  ! grep -lE "^=+ .*(failed|error)" "$LOGS"/pytest/*.log >/dev/null
}

export -f has_module phase_env phase_build phase_correctness phase_pytest

run_phase env 30 bash -c phase_env
run_phase build 200 bash -c phase_build
run_phase correctness 100 bash -c phase_correctness
run_phase timings 60 "$PY" scripts/gpu_timings.py --csv "$LOGS/timings.csv"
run_phase bench_linear_step 45 "$PY" benchmarks/bench_linear_step.py --device cuda --min-run-time 0.5 \
  --csv "$LOGS/results.csv"
run_phase bench_local2d 40 "$PY" benchmarks/bench_local2d.py --device cuda --min-run-time 0.3 --csv "$LOGS/results.csv"
run_phase bench_recurrent_local 40 "$PY" benchmarks/bench_recurrent_local.py --device cuda --depth 2 --batch 100 \
  --min-run-time 0.3 --csv "$LOGS/results.csv"
if [ -f benchmarks/bench_recipes.py ]; then
  run_phase bench_recipes 60 "$PY" benchmarks/bench_recipes.py --device cuda --csv "$LOGS/results.csv"
fi
run_phase pytest 300 bash -c phase_pytest

print_status
exit $FAILED
