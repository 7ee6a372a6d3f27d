"""The extension reports its build and refuses to load under another torch with a clear message."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import tandem_rt


def test_build_info():
    info = tandem_rt.build_info()
    assert info["version"] == tandem_rt.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_linked"], bool)
    assert info["cuda_linked"] == (torch.version.cuda is not None and info["cuda_mode"] != "OFF")
    assert all(isinstance(a, str) for a in info["cuda_archs"])
    assert info["cxx_compiler"]


def test_cpu_parallel_backend_matches_torch():
    """The extension's at::parallel_for is compiled for torch's backend (with OpenMP: -fopenmp)."""
    backend = "openmp" if "parallel backend: OpenMP" in torch.__config__.parallel_info() else "native"
    assert tandem_rt.build_info()["cpu_parallel"] == backend


def test_cpu_kernels_run_on_several_threads():
    """at::parallel_for in the extension forks onto torch's threads (it silently ran on one thread
    when the sources were compiled without -fopenmp)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert tandem_rt._C.parallel_threads_used(64) == 2
        torch.set_num_threads(1)
        assert tandem_rt._C.parallel_threads_used(64) == 1
    finally:
        torch.set_num_threads(old)


def test_one_openmp_runtime_in_process():
    """The extension shares torch's OpenMP runtime (no second libgomp / libomp mapped)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        import pytest
        pytest.skip("no /proc/self/maps on this platform")
    libs = {line.split()[-1] for line in maps.read_text().splitlines() if "omp" in line.split()[-1]}
    libs = {Path(p).name for p in libs if p.endswith((".so", ".1", ".5")) or ".so" in p}
    assert len(libs) <= 1, f"several OpenMP runtimes loaded: {sorted(libs)}"


def test_ops_registered():
    for op in ("copy_pages",):
        assert hasattr(torch.ops.tandem_rt, op)


def test_mismatched_torch_is_refused_with_rebuild_instructions(tmp_path):
    pkg = Path(tandem_rt.__file__).parent
    copy = tmp_path / "tandem_rt"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    sidecar = copy / "_C_build.json"
    data = json.loads(sidecar.read_text())
    data["torch_version"] = "1.0.0"
    sidecar.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-c", "import tandem_rt"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "ImportError" in last and "built against torch 1.0.0" in last
    assert torch.__version__ in last and "pip install --no-build-isolation -e ." in last
