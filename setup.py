"""Build tandem_rt and its C++/CUDA extension ``tandem_rt._C`` with CMake + Ninja.

Install against the torch that is already installed::

    pip install --no-build-isolation -e .

Build options (environment variables):

* ``TANDEM_RT_CUDA``: ``AUTO`` (default: link CUDA kernels when torch has CUDA, otherwise only
  compile-check the ``.cu`` files when nvcc exists), ``ON`` (require a CUDA torch), ``OFF``
  (CPU only, no nvcc), ``CHECK`` (compile-check every ``.cu`` with nvcc, fail if nvcc is missing).
* ``TANDEM_RT_CUDA_ARCHS``: CMake CUDA architectures, default ``80;90a``.
* ``TANDEM_RT_BUILD_DIR``: the persistent CMake build directory (default
  ``build/py<ver>-torch<ver>-<mode>``, so that rebuilds are incremental).
* ``MAX_JOBS``: parallel compile jobs.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "tandem_rt" / "version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build the extension with CMake, then copy it where Python finds it."""

    def build_extension(self, ext: Extension) -> None:
        import torch  # imported here: the build uses the installed torch

        mode = os.environ.get("TANDEM_RT_CUDA", "AUTO").upper()
        if mode not in ("AUTO", "ON", "OFF", "CHECK"):
            raise SystemExit(f"TANDEM_RT_CUDA must be AUTO, ON, OFF or CHECK, got {mode!r}")
        archs = os.environ.get("TANDEM_RT_CUDA_ARCHS", "80;90a")
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{mode}"
        build_dir = Path(os.environ.get("TANDEM_RT_BUILD_DIR", ROOT / "build" / tag))
        build_dir.mkdir(parents=True, exist_ok=True)
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTANDEM_RT_CUDA={mode}",
            f"-DTANDEM_RT_CUDA_ARCHS={archs}",
            f"-DTANDEM_RT_VERSION={read_version()}",
        ]
        subprocess.run(cfg, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        built = next(build_dir.glob("_C*.so"), None)
        if built is None:
            raise SystemExit(f"CMake produced no _C*.so in {build_dir}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # a new file renamed over the old one: a process that has the old library mapped keeps it
        # (copying over it in place changes the code under a running process, which then crashes)
        tmp = out_path.with_name(out_path.name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, out_path)
        # Sidecar read at import time: lets tandem_rt refuse a mismatched torch with a clear message.
        shutil.copy2(build_dir / "_C_build.json", out_path.parent / "_C_build.json")
        if getattr(self, "editable_mode", False) or self.inplace:
            shutil.copy2(build_dir / "_C_build.json", ROOT / "tandem_rt" / "_C_build.json")


setup(
    name="tandem_rt",
    version=read_version(),
    description="Fast LLM decoding with Tandem Transformers on a paged KV cache",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tandem_rt", "tandem_rt.*"]),
    package_data={"tandem_rt": ["_C_build.json", "bundled/*/*"]},
    include_package_data=True,
    ext_modules=[CMakeExtension("tandem_rt._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.11", "numpy", "safetensors", "tokenizers", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers", "gguf", "accelerate", "httpx", "starlette", "uvicorn"],
        "train": ["matplotlib"],
        "serve": ["starlette", "uvicorn"],
    },
    entry_points={"console_scripts": ["tandem-rt=tandem_rt.cli:main"]},
    zip_safe=False,
)
