#!/usr/bin/env bash
# All GPU checks in one command, for a machine with a CUDA GPU and a python3 that has torch,
# triton, timm, transformers, pybind11, pytest, hypothesis and matplotlib (the lent H100 has them).
#
#   scripts/gpu_check.sh [tests|bench|e2e|all]     (default: all)
#
# tests: builds _C, runs the GPU-marked tests (real shapes, bf16, the CUDA kernel) and then the
#        whole suite on the GPU (the Triton tests run compiled kernels there, not the interpreter).
# bench: benchmarks/bench_gemm.py, bench_w4a16.py, bench_qwt.py and bench_gplq.py -> benchmarks/results/ (JSON + PNG),
#        copied to $OUT too.
# e2e:   benchmarks/bench_e2e.py (whole models vs fp16 eager/compiled, decode) -> benchmarks/results/, $OUT.
# Each of tests, bench and e2e is meant to fit one 10-minute device call; `all` runs the three.
# Logs go to ${OUT:-gpu_check_out}/. A failing step is logged and the others still run; the exit
# status is non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee "$out/install.log"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python3 -c "import qla_kernels as qk; [print(b) for b in qk.backends().values()]" | tee "$out/backends.txt"
failed=0
if [[ $what == tests || $what == all ]]; then
    # The CUDA kernels first, each file on its own: a kernel fault poisons the CUDA context of the
    # process it happens in, and the later runs should still report.
    for file in tests/ops/test_cuda.py tests/ops/test_dwsep.py; do
        QLA_AUTOTUNE=0 python3 -m pytest -q -m gpu "$file" 2>&1 | tee "$out/pytest_gpu_$(basename "$file" .py).log" \
            || failed=1
    done
    QLA_AUTOTUNE=0 python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest_gpu.log" || failed=1
    QLA_AUTOTUNE=0 HYPOTHESIS_PROFILE=wide python3 -m pytest -q tests 2>&1 | tee "$out/pytest_all.log" || failed=1
fi
if [[ $what == bench || $what == all ]]; then
    python3 benchmarks/bench_gemm.py 2>&1 | tee "$out/bench_gemm.log" || failed=1
    python3 benchmarks/bench_w4a16.py 2>&1 | tee "$out/bench_w4a16.log" || failed=1
    python3 benchmarks/bench_qwt.py 2>&1 | tee "$out/bench_qwt.log" || failed=1
    python3 benchmarks/bench_gplq.py 2>&1 | tee "$out/bench_gplq.log" || failed=1
    cp benchmarks/results/gemm_*.json benchmarks/results/gemm_*.png benchmarks/results/qwt_*.json benchmarks/results/w4a16_* \
        benchmarks/results/gplq_*.json "$out/" 2>/dev/null || true
fi
if [[ $what == e2e || $what == all ]]; then
    python3 benchmarks/bench_e2e.py 2>&1 | tee "$out/bench_e2e.log" || failed=1
    cp benchmarks/results/e2e_* "$out/" 2>/dev/null || true
fi
exit $failed
