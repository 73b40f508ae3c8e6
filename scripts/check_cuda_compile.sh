#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_90 with nvcc (no torch, no GPU needed) to catch compile errors
# on machines without a GPU, and print ptxas's registers and spills of every kernel. Exits
# nonzero on the first compile error or on any spill; skips without nvcc.
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
  "$NVCC" -arch="$ARCH" -std=c++17 -O3 -Werror all-warnings -Xptxas -v -c -o "$out/$(basename "$src").o" "$src" \
    2>"$out/ptxas.log" || { cat "$out/ptxas.log"; exit 1; }
  # ptxas -v: per kernel "Compiling entry function 'NAME'", its stack and spills, its registers.
  awk '/Compiling entry function/ {name = $0; sub(/.*function .\047?/, "", name); sub(/\047.*/, "", name)}
       /spill stores/ {spills = $0} /Used [0-9]+ registers/ {print "  " name ": " $0; print "    " spills}' \
    "$out/ptxas.log" | sed 's/ptxas info *: //'
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$out/ptxas.log"; then
    echo "register spills in $src"
    exit 1
  fi
done
echo "compiled ${#sources[@]} CUDA source(s) for $ARCH"
