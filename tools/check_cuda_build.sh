#!/usr/bin/env bash
# Build the extension against the CUDA torch (torch==2.14.1, a local ~5.5 GB CUDA 13.0 wheel) in a
# throw-away venv, so that the CUDA dispatch glue (csrc/cuda/*.cpp) and the link with the kernels
# are compiled too. Skips loudly when the disk has too little room. Usage:
#   tools/check_cuda_build.sh            (venv in ${TANDEM_RT_CUDA_VENV:-/tmp/tandem_rt-cuda-venv})
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TANDEM_RT_CUDA_VENV:-/tmp/tandem_rt-cuda-venv}"
need_gb=14
free_gb=$(df -Pk "$(dirname "$venv")" | awk 'NR==2 {print int($4 / 1048576)}')
if [ ! -x "$venv/bin/python" ] && [ "$free_gb" -lt "$need_gb" ]; then
  echo "!!!! check_cuda_build: SKIPPED — only ${free_gb} GB free, the CUDA torch venv needs ~${need_gb} GB. !!!!"
  echo "!!!! The CUDA dispatch glue (csrc/cuda/*.cpp) was NOT compiled in this run.                     !!!!"
  exit 0
fi
if ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.14.1 numpy setuptools wheel
fi
build_dir="build/cuda-check-$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
# Build the whole extension (CPU ops + CUDA glue + kernels) into a separate build dir; the result
# is not installed anywhere: this is a compile-and-link check.
"$venv/bin/python" - "$build_dir" <<'PY'
import subprocess, sys, os
build = sys.argv[1]
cmake = ["cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         f"-DPython_EXECUTABLE={sys.executable}", "-DTANDEM_RT_CUDA=ON",
         f"-DTANDEM_RT_CUDA_ARCHS={os.environ.get('TANDEM_RT_CUDA_ARCHS', '80;90a')}"]
subprocess.run(cmake, check=True)
subprocess.run(["cmake", "--build", build, "-j", os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))], check=True)
PY
so=$(ls "$build_dir"/_C*.so)
echo "check_cuda_build: built $so against torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
# The library must at least resolve its own symbols against libtorch (no GPU needed to load it).
"$venv/bin/python" -c "import torch, ctypes, sys; ctypes.CDLL(sys.argv[1]); print('check_cuda_build: loads OK')" "$so"
