"""The GPU benchmarks' bookkeeping runs on CPU (interpreter kernels, timing stubbed), so a GPU
session spends its minutes measuring, not debugging the script."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import qla_kernels as qk

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not qk.backends()["triton"].available, reason="needs the Triton backend")
def test_bench_gemm_rows_and_plot(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    bench = _load("bench_gemm")
    calls = []

    def fake_bench(fn):
        fn()
        calls.append(1)
        return 1.0 + 0.01 * len(calls)

    monkeypatch.setattr(bench, "bench", fake_bench)
    monkeypatch.setattr(bench, "RANK", 16)
    monkeypatch.setattr(bench, "L2_FLUSH_BYTES", 1)
    ceilings = {"fp16_tflops": 1.0, "int8_tops": 2.0, "copy_gbps": 3.0}
    device = torch.device("cpu")
    rows = [bench.bench_shape("tiny", "fc", 40, 48, 128, tuple(bench.CONFIGS), ceilings, device),
            bench.bench_shape("tiny", "decode", 8, 48, 128, bench.SMALL_M_CONFIGS, ceilings, device)]
    first = rows[0]
    timings = [first[f"{name}_{variant}_ms"] for name in bench.CONFIGS
               for variant in ("bare", "+bias", "+lowrank", "+residual", "full")]
    # Every variant got its own bench call: distinct stub timings, each one the stub returned.
    assert len(set(timings)) == len(timings)
    assert all(any(t == pytest.approx(1.0 + 0.01 * i) for i in range(1, len(calls) + 1)) for t in timings)
    for name in bench.CONFIGS:
        assert first[f"{name}_rel_error_vs_fp16"] < 0.5
        assert first[f"{name}_bound"] in ("compute", "memory")
    assert first["W8A8_rel_error_vs_fp16"] < 0.05
    assert "int_mm_eager_full_ms" in first and "int_mm_eager_full_ms" not in rows[1]
    json.dumps(rows)
    bench.plot(rows, tmp_path / "plot.png", "cpu")
    assert (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.skipif(not qk.backends()["triton"].available, reason="needs the Triton backend")
def test_bench_w4a16_rows_and_plot(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    bench = _load("bench_w4a16")
    monkeypatch.setattr(bench, "bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "SHAPES", [("tiny", 48, 256)])
    monkeypatch.setattr(bench, "L2_FLUSH_BYTES", 1)
    rows = bench.bench_shape("tiny", 48, 256, (1, 3), 1000.0, torch.device("cpu"))
    assert [row["M"] for row in rows] == [1, 3]
    for row in rows:
        assert row["ours_rel_error"] < 1e-2 and row["ours_bare_ms"] > 0 and "lora_overhead" in row
        assert "tinygemm_ms" in row or row["tinygemm_unavailable"]
    json.dumps(rows)
    bench.plot(rows, tmp_path / "w4a16.png", "cpu")
    assert (tmp_path / "w4a16.png").stat().st_size > 0


def test_bench_gplq_memory_accounting():
    """GPLQ stage 1 keeps what fp32 training keeps: its autograd graph saves as much as fp32
    training's (the fused LSQ+ linear saves only its input) and its optimizer holds the same state;
    the teacher's weights are the one extra. Frozen weights need no gradients or Adam state."""
    timm = pytest.importorskip("timm")
    bench = _load("bench_gplq")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    labels = [torch.randint(0, 1000, (4,)) for _ in range(2)]
    result = bench.run(model, batches, labels)
    fp32, stage1, frozen = result["fp32_training"], result["gplq_stage1"], result["gplq_stage1_frozen_weights"]
    assert 0 < stage1["saved_activation_bytes"] <= 1.1 * fp32["saved_activation_bytes"]
    assert stage1["optimizer_bytes"] <= fp32["optimizer_bytes"]
    assert stage1["peak_bytes"] <= fp32["peak_bytes"] + bench.model_bytes(model)
    assert frozen["peak_bytes"] < fp32["peak_bytes"] and frozen["optimizer_bytes"] < 0.01 * fp32["optimizer_bytes"]
    assert result["stage1_steps"] == 2 and result["gplq_stage2"]["seconds"] > 0
    json.dumps(result)
