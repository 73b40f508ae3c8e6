#!/usr/bin/env bash
# Build the wheel and install it, non-editable, into a fresh venv; then, from outside the source
# tree, import every subpackage, run `python -m ff_kernels --help` and train a tiny supervised run.
#
#     bash scripts/check_wheel.sh [MNIST_DIR]      # default ../shared/data/mnist
#
# Needs .venv (scripts/setup.sh) to build the extension against its torch. The fresh venv gets
# torch from the same pinned CPU wheel (TORCH_VERSION, default 2.13.0; on this machine a local
# file, never a CUDA build from the network) before the ff_kernels wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mnist=$(realpath "${1:-../shared/data/mnist}")
work=$(mktemp -d /tmp/ff_wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== build the wheel"
CFLAGS="-g0 ${CFLAGS:-}" .venv/bin/pip wheel -q --no-build-isolation --no-deps -w "$work/dist" . 2>&1 | grep -v "^WARNING: Location" || true
wheel=$(ls "$work"/dist/ff_kernels-*.whl)
echo "built $(basename "$wheel")"
# the listing first: with pipefail, `unzip | grep -q` fails when grep exits before unzip has written all
listing=$(unzip -l "$wheel")
grep -q "ff_kernels/_C" <<<"$listing" || { echo "the wheel has no compiled extension ff_kernels._C"; exit 1; }

echo "== install it into a fresh venv"
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/pip" install -q "$wheel[triton]" "numpy<2.4" 2>&1 | grep -v "^WARNING: Location" || true

echo "== use it from outside the source tree"
cd "$work"
"$work/venv/bin/python" - "$root" <<'PY'
import importlib, pkgutil, sys
from pathlib import Path

import ff_kernels
root = Path(sys.argv[1]).resolve()
assert root not in Path(ff_kernels.__file__).resolve().parents, f"imported from the source tree: {ff_kernels.__file__}"
names = ["fftriton"] + [m.name for m in pkgutil.walk_packages(ff_kernels.__path__, "ff_kernels.")
         if not m.name.endswith("__main__")]  # __main__ runs ff-train
for name in names:
    importlib.import_module(name)
from ff_kernels.ops import ext_local2d
assert ext_local2d.load_error() is None, ext_local2d.load_error()
print(f"imported {len(names)} modules of ff_kernels {ff_kernels.__version__} from {Path(ff_kernels.__file__).parent}")
PY
"$work/venv/bin/python" -m ff_kernels --help >/dev/null
"$work/venv/bin/ff-train" supervised --help >/dev/null
"$work/venv/bin/python" -m ff_kernels supervised --epochs 1 --width 32 --depth 2 --train-subset 500 \
  --eval-subset 200 --data-dir "$mnist" --run-dir "$work/run" --no-progress
test -s "$work/run/summary.json"
echo "wheel check passed"
