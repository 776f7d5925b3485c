#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU and a python3 that has torch, triton, timm,
# transformers, pybind11, pytest, hypothesis and matplotlib (the lent H100/H200 have them).
#
#   scripts/gpu_check.sh quick                   the first thing to run on a GPU: one call of <= 8 min
#   scripts/gpu_check.sh [tests|bench|e2e|all]   the longer checks, each one 10-minute device call
#
# quick: install + _C for this GPU's architecture only, then, most informative first, each step
#        under its own timeout so that a hang costs only that step:
#          1. kernels: every op test on the GPU (real shapes, the bit-exact ones), autotuning on;
#             rotation: bench_rotation --device cuda (the rotating pre-kernel's cost, target <= 3%)
#          2. gemm: bench_gemm --quick (ViT-B/16 b64 qkv/fc1/fc2, LLaMA-8B decode M = 1, 16) vs
#             cuBLAS fp16/bf16 and torch._int_mm
#          3. e2e: ViT-B/16 b64 W8A8 with and without QLA + QwT vs fp16 eager and torch.compile;
#             LLaMA-shaped W4A16 decode at batch 1
#          4. launches: every launch the real models of step 3 made (QLA_LAUNCH_LOG) against the
#             ahead-of-time table (benchmarks/results/aot_launch_table.json)
#        and writes to ${OUT:-gpu_check_out}/: summary.md, results.json, logs.tar.gz (3 files).
# tests: builds _C, runs the GPU-marked tests (real shapes, bf16, the CUDA kernel) and then the
#        whole suite on the GPU (the Triton tests run compiled kernels there, not the interpreter).
# bench: benchmarks/bench_gemm.py, bench_w4a16.py, bench_qwt.py, bench_gplq.py, bench_conv.py --device cuda
#        (ResNet-50 vs cuDNN fp16 and torch.compile) and bench_attention.py --device cuda (the
#        quantized attention core vs fp16 SDPA) -> benchmarks/results/ (JSON + PNG),
#        copied to $OUT too.
# e2e:   benchmarks/bench_e2e.py (whole models vs fp16 eager/compiled, decode) -> benchmarks/results/, $OUT.
# A failing step is logged and the others still run; the exit status is non-zero if any failed.
#
# For testing this script's plumbing on a CPU: PYTHON (default python3), QLA_GPU_CHECK_SKIP_INSTALL=1,
# QLA_GPU_CHECK_TIMEOUT=<seconds> (caps every quick step).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-gpu_check_out}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

case $what in quick|tests|bench|e2e|all) ;; *) echo "usage: $0 [quick|tests|bench|e2e|all]" >&2; exit 2 ;; esac

if [[ $what == quick ]]; then
    logs=$out/logs
    rm -rf "$logs" "$out/summary.md" "$out/results.json" "$out/logs.tar.gz"
    mkdir -p "$logs"
    steps=$logs/steps.tsv
    : > "$steps"
    started=$(date +%s)
    # step NAME SECONDS COMMAND...: runs COMMAND under `timeout`, its output in logs/NAME.log, and
    # records name, status (ok | failed | timeout), exit code and seconds in logs/steps.tsv.
    step() {
        local name=$1 limit=$2
        shift 2
        if [[ -n ${QLA_GPU_CHECK_TIMEOUT:-} && ${QLA_GPU_CHECK_TIMEOUT} -lt $limit ]]; then
            limit=$QLA_GPU_CHECK_TIMEOUT
        fi
        local begin=$(date +%s) rc status
        echo "== $name (timeout ${limit}s): $*"
        timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
        rc=$?
        if [[ $rc == 124 || $rc == 137 ]]; then status=timeout; elif [[ $rc == 0 ]]; then status=ok; else status=failed; fi
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - begin ))" "$limit" >> "$steps"
        tail -n 3 "$logs/$name.log"
        echo "== $name: $status"
    }
    nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || true
    if [[ -z ${QLA_GPU_CHECK_SKIP_INSTALL:-} ]]; then
        # _C for this GPU only (seconds instead of four architectures' worth of nvcc).
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
        if [[ $cap == 90 ]]; then cap=90a; fi
        step install 240 env ${cap:+QLA_CUDA_ARCHS=$cap} "$python" -m pip install -q --no-deps --no-build-isolation -e .
    fi
    step backends 60 "$python" -c "import qla_kernels as qk; [print(b) for b in qk.backends().values()]"
    : > "$logs/launches.jsonl"
    step kernels 200 "$python" -m pytest -q -x --durations=15 -p no:cacheprovider \
        tests/ops/test_triton.py tests/ops/test_cuda.py tests/ops/test_dwsep.py tests/ops/test_kernel_launch.py \
        tests/ops/test_conv.py tests/ops/test_attention.py tests/ops/test_log2_attention.py \
        tests/ops/test_rotated_quantization.py
    step rotation 90 "$python" benchmarks/bench_rotation.py --device cuda --runs 11 --out "$logs"
    step gemm 90 "$python" benchmarks/bench_gemm.py --quick --out "$logs"
    step e2e 150 env QLA_LAUNCH_LOG="$logs/launches.jsonl" "$python" benchmarks/bench_e2e.py --models vit_b16 \
        --batches 64 --variants fp16_eager,fp16_compile,w8a8,w8a8_qla_qwt --decode-batches 1 --llama-layers 2 \
        --no-bert --no-breakdown --out "$logs"
    step launches 60 "$python" -m qla_kernels.launch_table --compare-log "$logs/launches.jsonl"
    "$python" scripts/gpu_check_summary.py "$logs" "$out" "$(( $(date +%s) - started ))"
    summary_rc=$?
    tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
    cat "$out/summary.md" 2>/dev/null
    exit $summary_rc
fi

"$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee "$out/install.log"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$python" -c "import qla_kernels as qk; [print(b) for b in qk.backends().values()]" | tee "$out/backends.txt"
failed=0
if [[ $what == tests || $what == all ]]; then
    # The CUDA kernels first, each file on its own: a kernel fault poisons the CUDA context of the
    # process it happens in, and the later runs should still report.
    for file in tests/ops/test_cuda.py tests/ops/test_dwsep.py; do
        QLA_AUTOTUNE=0 "$python" -m pytest -q -m gpu "$file" 2>&1 | tee "$out/pytest_gpu_$(basename "$file" .py).log" \
            || failed=1
    done
    QLA_AUTOTUNE=0 "$python" -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest_gpu.log" || failed=1
    QLA_AUTOTUNE=0 HYPOTHESIS_PROFILE=wide "$python" -m pytest -q tests 2>&1 | tee "$out/pytest_all.log" || failed=1
fi
if [[ $what == bench || $what == all ]]; then
    "$python" benchmarks/bench_gemm.py 2>&1 | tee "$out/bench_gemm.log" || failed=1
    "$python" benchmarks/bench_w4a16.py 2>&1 | tee "$out/bench_w4a16.log" || failed=1
    "$python" benchmarks/bench_qwt.py 2>&1 | tee "$out/bench_qwt.log" || failed=1
    "$python" benchmarks/bench_gplq.py 2>&1 | tee "$out/bench_gplq.log" || failed=1
    "$python" benchmarks/bench_conv.py --device cuda 2>&1 | tee "$out/bench_conv.log" || failed=1
    "$python" benchmarks/bench_attention.py --device cuda 2>&1 | tee "$out/bench_attention.log" || failed=1
    cp benchmarks/results/gemm_*.json benchmarks/results/gemm_*.png benchmarks/results/qwt_*.json benchmarks/results/w4a16_* \
        benchmarks/results/gplq_*.json benchmarks/results/conv_NVIDIA* benchmarks/results/attention_NVIDIA* \
        "$out/" 2>/dev/null || true
fi
if [[ $what == e2e || $what == all ]]; then
    "$python" benchmarks/bench_e2e.py 2>&1 | tee "$out/bench_e2e.log" || failed=1
    cp benchmarks/results/e2e_* "$out/" 2>/dev/null || true
fi
exit $failed
