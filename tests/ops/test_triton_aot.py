"""Every shipped Triton configuration compiles for sm_90 and sm_80 without a GPU, uses wgmma on
sm_90, and does not spill (ptxas -v). Runs qla_kernels.ops.triton.aot in a subprocess because the
interpreter (TRITON_INTERPRET=1, set for the CPU tests) replaces kernels by Python functions."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_configuration_compiles_for_hopper_and_ampere(tmp_path):
    report = tmp_path / "aot.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "qla_kernels.ops.triton.aot", "--json", str(report)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(report.read_text())
    gemms = [row for row in rows if row["kernel"] == "fused_linear"]
    assert {row["arch"] for row in gemms} == {80, 90}
    assert len({row["epilogue"] for row in gemms}) >= 4
    for row in rows:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert 0 < row["registers"] <= 255, row
    for row in gemms:
        if row["arch"] == 90:
            assert row["wgmma"], row
        else:
            assert not row["wgmma"], row
    assert any(row["kernel"] == "quantize_activation" for row in rows)
    assert any(row["kernel"] == "requantize_rows" for row in rows)
    assert any(row["kernel"] == "normalize_activation" for row in rows)
    assert any(row["kernel"] == "normalize_quantize_activation" for row in rows)
    assert {row["epilogue"] for row in gemms} >= {"w8a8_swiglu_zero_point", "w8a8_geglu_tanh_requant", "w4a16_swiglu"}
    assert any(row.get("epilogue") == "w4a16_full_epilogue" for row in rows)
    assert {row["epilogue"] for row in gemms} >= {"w4a16_split_k_partial_sums", "w4a16_split_k_reduce_full_epilogue"}
    assert {row["arch"] for row in rows if row["kernel"] == "dwsep_down"} == {80, 90}
