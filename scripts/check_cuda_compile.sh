#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_90 with nvcc (no torch, no GPU needed) to catch compile errors
# on machines without a GPU. Exits nonzero on the first compile error; skips without nvcc.
# NVCC and ARCH override the compiler and the target (default sm_90, H100 / H200).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
ARCH="${ARCH:-sm_90}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "nvcc not found, skipping"
  exit 0
fi
out="$(mktemp -d /tmp/ff_cuda_check.XXXXXX)"
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
sources=(csrc/*.cu)
for src in "${sources[@]}"; do
  echo "nvcc -arch=$ARCH $src"
  "$NVCC" -arch="$ARCH" -std=c++17 -O3 -Werror all-warnings -c -o "$out/$(basename "$src").o" "$src"
done
echo "compiled ${#sources[@]} CUDA source(s) for $ARCH"
