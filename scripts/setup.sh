#!/usr/bin/env bash
# Create .venv (if missing) with torch, the dev tools and ff_kernels installed in editable mode.
# On a CPU machine torch is pinned to the local CPU wheel; a torch that is already present
# (a GPU machine's CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv ${VENV_FLAGS:-} .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -r requirements-dev.txt
CFLAGS="-g0 ${CFLAGS:-}" .venv/bin/pip install -q --no-build-isolation --no-deps -e .
