#!/usr/bin/env bash
# Every check that needs a GPU, in one call on a lent device (which has torch, triton, nvcc,
# pytest and no network): build the CUDA extension in place, run the tests on the GPU, run the
# GPU benchmarks and print their tables. Results also go to $OUT (or /tmp/ff_gpu_check).
#
#     bash scripts/gpu_check.sh            # about 5 minutes on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ff_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== build (CUDA extension, in place)"
if ! CFLAGS=-g0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; status=1
fi

echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_fftriton.py tests/test_ops_linear.py tests/test_nn_linear.py \
  tests/test_local2d.py tests/test_local2d_parts.py tests/test_recurrent_local.py 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
for bench in benchmarks/bench_linear_step.py benchmarks/bench_local2d.py; do
  [ -f "$bench" ] || continue
  python3 "$bench" --device cuda --min-run-time 0.5 --csv "$OUT/results.csv" 2>&1 | tee -a "$OUT/bench.log" || status=1
done
# the CIFAR-10 net of Table 1: one training batch and one evaluation, compiled kernels vs the reference
python3 benchmarks/bench_recurrent_local.py --device cuda --depth 2 --batch 100 --min-run-time 0.5 \
  --csv "$OUT/results.csv" 2>&1 | tee -a "$OUT/bench.log" || status=1
exit $status
