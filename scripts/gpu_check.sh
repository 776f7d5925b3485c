#!/usr/bin/env bash
# All GPU checks in one command, for a machine with a CUDA GPU and a python3 that has torch,
# triton, timm, transformers, pybind11, pytest and hypothesis (the lent H100 has them).
# Logs go to ${OUT:-gpu_check_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee "$out/install.log"
nvidia-smi | tee "$out/nvidia-smi.txt"
python3 -c "import qla_kernels as qk; [print(b) for b in qk.backends().values()]" | tee "$out/backends.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest_gpu.log"
python3 -m pytest -q -x tests 2>&1 | tee "$out/pytest_all.log"
