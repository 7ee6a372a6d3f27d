#!/usr/bin/env bash
# Compile every CUDA kernel (csrc/kernels/*.cu) with nvcc for each target architecture.
# Fails when nvcc is missing or any kernel does not compile. Usage:
#   tools/check_cuda_compile.sh [ARCH ...]     (default: 80 90a)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set CUDA_HOME)" >&2
  exit 1
fi
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90a)
gencode=()
for a in "${archs[@]}"; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$NVCC" --version | tail -n 2
shopt -s nullglob
files=(csrc/kernels/*.cu)
[ ${#files[@]} -gt 0 ] || { echo "check_cuda_compile: no .cu files found" >&2; exit 1; }
for f in "${files[@]}"; do
  start=$(date +%s.%N)
  "$NVCC" -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas=-warn-spills -Icsrc \
    "${gencode[@]}" -Xcompiler -fPIC -c "$f" -o "$out/$(basename "$f").o"
  printf 'compiled %-40s for sm_%s in %.1fs\n' "$f" "$(IFS=,; echo "${archs[*]}")" "$(echo "$(date +%s.%N) - $start" | bc)"
done
echo "check_cuda_compile: ${#files[@]} kernel file(s) compiled for ${archs[*]}"
