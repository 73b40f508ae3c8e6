#!/usr/bin/env bash
# The paper's full training schedules on one GPU, in priority order, within BUDGET_S seconds:
#
#   supervised      MNIST, label in the input, 60 epochs (section 3.3)
#   recurrent       recurrent net with top-down connections, 60 epochs (section 3.4)
#   local           locally connected net, hybrid negatives, 60 epochs (section 3.2)
#   jitter          jittered MNIST: the paper's 500 epochs, as many as fit (section 3.3)
#   cifar           CIFAR-10, Table 1's FF row at depth 2 (section 4)
#   cifar-backprop  CIFAR-10, Table 1's backprop row at depth 2
#
# Each run goes to $RUNS/NAME through `ff-train` (python -m ff_kernels) with --run-dir, under
# `timeout` so that it stops within the budget; checkpoints are written after every epoch, so
# a stopped run resumes from its last finished epoch. A run that has a checkpoint is resumed
# (--resume), one that has summary.json is finished and skipped. RESUME_FROM names a folder
# holding NAME/ run directories from an earlier device call (carried into the working tree):
# they are copied to $RUNS first. The CUDA extension is built first if it is missing.
#
# What comes back ($OUT, at most 8 files): status.txt and paper-NAME.tar.gz per run (config,
# metrics.jsonl, summary.json, NAME.log (ff-train's output; a fresh run refuses a folder that holds files), and checkpoint.pt when the archive stays under
# 15 MiB, the limit of a returned file; larger nets must finish within one call).
#
# Environment: OUT (/tmp/ff_paper_out), RUNS (/tmp/ff_paper_runs), RESUME_FROM, DEVICE (cuda),
# PYTHON (python3), DATA_ROOT (default: shared/data in the repository, else ../shared/data;
# it needs mnist/ and, for the CIFAR runs, cifar10/), ONLY (space-separated run names),
# EXTRA_ARGS (appended to every ff-train call, e.g. a smoke run's --train-subset 500).
#
#     OUT=/some/dir bash scripts/gpu_paper.sh 540
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${1:?usage: gpu_paper.sh BUDGET_S}
OUT=${OUT:-/tmp/ff_paper_out}
RUNS=${RUNS:-/tmp/ff_paper_runs}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
START=$(date +%s)
MIN_RUN_S=60  # a run started with less than this left would not finish an epoch worth keeping
RETURN_LIMIT=$((15 * 1024 * 1024))
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCH_CUDA_ARCH_LIST=9.0
unset TRITON_INTERPRET CUDA_LAUNCH_BLOCKING
STATUS=()

if [ -z "${DATA_ROOT:-}" ]; then
  for candidate in shared/data ../shared/data; do
    if [ -d "$candidate/mnist" ]; then DATA_ROOT=$candidate; break; fi
  done
fi
if [ -z "${DATA_ROOT:-}" ] || [ ! -d "$DATA_ROOT/mnist" ]; then
  echo "no data: set DATA_ROOT to a folder with mnist/ (and cifar10/), or put it at shared/data" >&2
  exit 2
fi
DATA_ROOT=$(cd "$DATA_ROOT" && pwd)
echo "== data: $DATA_ROOT; runs: $RUNS; budget ${BUDGET_S}s"

if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, ff_kernels._C; assert torch.ops.ff_kernels.built_with_cuda()" 2>/dev/null; then
  echo "== building the CUDA extension"
  CFLAGS=-g0 MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace >"$RUNS/build.log" 2>&1 || tail -20 "$RUNS/build.log"
fi

print_status() {
  echo "== status ($("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null), $(($(date +%s) - START))s of ${BUDGET_S}s)"
  printf '%s\n' "${STATUS[@]}"
}

# pack NAME: the run's records into $OUT/paper-NAME.tar.gz, with its checkpoint if that fits.
pack() {
  local name=$1 archive="$OUT/paper-$1.tar.gz" files=()
  for f in "$name" "$name.log"; do [ -e "$RUNS/$f" ] && files+=("$f"); done
  [ ${#files[@]} -gt 0 ] || return 0
  tar -czf "$archive" -C "$RUNS" "${files[@]}"
  if [ "$(stat -c %s "$archive")" -gt "$RETURN_LIMIT" ]; then
    tar -czf "$archive" -C "$RUNS" --exclude checkpoint.pt "${files[@]}"
    echo "(checkpoint of $name too large to return: $(du -h "$RUNS/$name/checkpoint.pt" | cut -f1))"
  fi
}

# epochs NAME: "finished/planned" epochs of a run directory, from its metrics and config.
epochs() {
  "$PY" - "$RUNS/$1" <<'PYTHON'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
planned = json.loads((run / "config.json").read_text()).get("epochs", "?") if (run / "config.json").exists() else "?"
last = json.loads(lines[-1]) if lines else {}
errors = ", ".join(f"{k} {v:.2%}" for k, v in last.items() if "error" in k and isinstance(v, float))
print(f"{last.get('epoch', 0)}/{planned} epochs{': ' + errors if errors else ''}")
PYTHON
}

# train NAME DATA_SUBDIR RECIPE ARGS...: run or resume one schedule within what is left.
train() {
  local name=$1 data=$2
  shift 2
  local dir="$RUNS/$name"
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ -n "${RESUME_FROM:-}" ] && [ -d "$RESUME_FROM/$name" ] && [ ! -e "$dir" ]; then
    cp -r "$RESUME_FROM/$name" "$dir"
  fi
  if [ -f "$dir/summary.json" ]; then
    STATUS+=("$(printf '%-15s finished earlier, %s' "$name" "$(epochs "$name")")")
    return
  fi
  if [ ! -d "$DATA_ROOT/$data" ]; then
    STATUS+=("$(printf '%-15s SKIPPED: no %s' "$name" "$DATA_ROOT/$data")")
    return
  fi
  local left=$((START + BUDGET_S - $(date +%s)))
  if [ "$left" -lt "$MIN_RUN_S" ]; then
    STATUS+=("$(printf '%-15s SKIPPED (budget spent)' "$name")")
    return
  fi
  local resume=()
  # A run stopped before its first checkpoint leaves only its config and metrics: start it afresh.
  if [ -f "$dir/checkpoint.pt" ]; then resume=(--resume); elif [ -d "$dir" ]; then resume=(--overwrite); fi
  echo "== $name: ${left}s left${resume:+, resuming}"
  local t0 rc
  t0=$(date +%s)
  timeout -s TERM -k 30 "$left" "$PY" -m ff_kernels "$@" --device "$DEVICE" --data-dir "$DATA_ROOT/$data" \
    --run-dir "$dir" "${resume[@]}" --no-progress "${EXTRA[@]}" >>"$RUNS/$name.log" 2>&1
  rc=$?
  tail -n 3 "$RUNS/$name.log"
  local how
  case $rc in
    0) how="finished" ;;
    124 | 137) how="stopped by the budget, resumable" ;;
    *) how="FAILED (exit $rc), see $name.log" ;;
  esac
  STATUS+=("$(printf '%-15s %s, %s (%ss)' "$name" "$how" "$(epochs "$name")" "$(($(date +%s) - t0))")")
  pack "$name"
  print_status >"$OUT/status.txt"
}

train supervised mnist supervised --epochs 60
train recurrent mnist recurrent --epochs 60
train local mnist local --epochs 60
train jitter mnist jitter --epochs 500
train cifar cifar10 cifar --depth 2
train cifar-backprop cifar10 cifar-backprop --depth 2

print_status | tee "$OUT/status.txt"
