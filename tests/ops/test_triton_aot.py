"""Ahead-of-time checks of what the Triton kernels compile to on sm_90 and sm_80, without a GPU.

Compiling needs the real JIT (the interpreter, set for the CPU tests, replaces kernels by Python
functions), so each test runs a script in a subprocess without TRITON_INTERPRET and reads its
JSON. `make aot-check` checks the whole launch table; here a fixed sample of it, plus the launches
that each of the defects below was found in: every one of these tests failed before its fix.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ENV = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def _compile(script: str, tmp_path, timeout=600) -> list:
    """Runs `script` (which plans launches into `planned` per target) and returns the check rows."""
    program = textwrap.dedent("""
        import json, sys, torch
        from qla_kernels import ops
        from qla_kernels.ops.triton.aot import check_launches, for_targets
        from qla_kernels.ops.triton.kernel_launch import A100, H100, planning
        META = torch.device("meta")
        planned = {}
        for target in (H100, A100):
            with planning(target) as launches, torch.no_grad():
                plan()
            planned[target] = launches
        rows = check_launches(for_targets(planned), cache=False)
        json.dump(rows, open(sys.argv[1], "w"), default=str)
    """)
    path = tmp_path / "rows.json"
    body = "def plan():\n" + textwrap.indent(textwrap.dedent(script), "    ")
    code = program.replace("planned = {}", body + "\nplanned = {}")
    result = subprocess.run([sys.executable, "-c", code, str(path)], env=ENV, capture_output=True, text=True,
                            timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(path.read_text())


_WEIGHT = """
    from tests.ops.helpers import random_weight
    def weight(fmt, n, k):
        return random_weight(fmt, n, k, group=128).to(META)
"""


def test_exact_epilogues_are_not_contracted(tmp_path):
    """acc·s_x·s_w + bias (+ residual) contracted to fma.rn.f32 rounds once where the reference
    rounds twice: the bit-exact epilogue tests would fail on hardware, not in the interpreter."""
    rows = _compile(_WEIGHT + """
    a, scale = torch.empty(12608, 3072, device=META, dtype=torch.int8), torch.empty(12608, device=META)
    bias, residual = torch.empty(768, device=META, dtype=torch.float16), torch.empty(12608, 768, device=META, dtype=torch.float16)
    for fmt in ("int8", "int4", "int4_int8_groups"):
        ops.fused_linear(a, scale, weight(fmt, 768, 3072), bias=bias, residual=residual, activation="relu")
        ops.fused_linear(a, scale, weight(fmt, 768, 3072), bias=bias, requant_bits=8)
    ops.quantize_activation(torch.empty(12608, 768, device=META, dtype=torch.float16), 8, norm_kind="layernorm",
                            norm_weight=torch.empty(768, device=META), norm_bias=torch.empty(768, device=META))
    """, tmp_path)
    assert {row["kernel"] for row in rows} == {"fused_linear_kernel", "requantize_rows_kernel",
                                              "quantize_activation_kernel"}
    for row in rows:
        assert row["fma"] == 0 and not row["problems"], (row["kernel"], row["meta"], row["problems"])


def test_pre_kernel_fits_shared_memory_at_a_rank_128_fp32_t(tmp_path):
    """QwT's T = x·V_r at rank 128 with an fp32 V_r, K = 4096: Triton's default 3 stages at
    BLOCK_K 256 needed ~297 KB of shared memory (OutOfResources on every call); fp16 spilled, and
    after that fix fp16 at BLOCK_K 64 still spilled 8 B on sm_90 at 4 warps (128 registers)."""
    rows = _compile("""
    x = torch.empty(2048, 4096, device=META, dtype=torch.float16)
    for dtype in (torch.float32, torch.float16):
        ops.quantize_activation(x.to(dtype), 8, norm_kind="rmsnorm", norm_weight=torch.empty(4096, device=META),
                                down_proj=torch.empty(4096, 128, device=META, dtype=dtype), down_from_input=True)
    ops.dwsep_down(torch.empty(64, 197, 768, device=META, dtype=torch.float16), 14, 14, 1,
                   torch.empty(768, 9, device=META), None, torch.empty(128, 768, device=META), None)
    """, tmp_path)
    assert len(rows) == 6
    for row in rows:
        assert not row["problems"], (row["kernel"], row["meta"], row["problems"])
        assert row["shared_bytes"] <= 166912


def test_rotating_pre_kernel_compiles_at_real_widths(tmp_path):
    """The rotating pre-kernel at ViT/BERT/MiniLM/LLaMA widths (tiles [16, 64], [32, 64] with
    H_12 ⊗ H_2, [16, 256], [1, 4096]), its codes launch and its T + normalized-rows launch, and
    fc1's requant_rotate: within shared memory, no spills (8 warps at most: 16 spilled on sm_80),
    no contraction."""
    rows = _compile(_WEIGHT + """
    for k in (768, 1536, 3072, 4096):
        x = torch.empty(12608, k, device=META, dtype=torch.float16)
        ops.quantize_activation(x, 4, rotate=True)
        ops.normalize_quantize_activation(x, 8, "layernorm", torch.empty(k, device=META), torch.empty(k, device=META),
                                          static_scale=torch.empty(1, device=META),
                                          zero_point=torch.empty(1, device=META, dtype=torch.int8),
                                          down_proj=torch.empty(k, 24, device=META, dtype=torch.float16), rotate=True)
    q, scale = torch.empty(12608, 768, device=META, dtype=torch.int8), torch.empty(12608, device=META)
    ops.fused_linear(q, scale, weight("int4", 3072, 768), activation="gelu", requant_bits=4, requant_rotate=True)
    """, tmp_path)
    assert sum(row["kernel"] == "rotate_quantize_kernel" for row in rows) >= 2 * 4 * 3
    for row in rows:  # (fc1's GELU epilogue holds erf's fused polynomial: `failures` allows it there)
        assert not row["problems"], (row["kernel"], row["meta"], row["problems"])
        assert row["fma"] == 0 or row["kernel"] == "fused_linear_kernel", (row["kernel"], row["meta"])


def test_row_offsets_are_64_bit_where_products_pass_two_to_the_31(tmp_path):
    """An LM head's output at prefill (M = 16,745 rows of 128,256) has more than 2**31 elements:
    row × stride must not be a 32-bit multiply (mul.lo.s32) in any kernel."""
    rows = _compile(_WEIGHT + """
    head = weight("int8", 128256, 4096)
    q, scale = torch.empty(16745, 4096, device=META, dtype=torch.int8), torch.empty(16745, device=META)
    ops.fused_linear(q, scale, head, out_dtype=torch.float16)
    ops.fused_linear(q, scale, head, requant_bits=8)
    ops.quantize_activation(torch.empty(16745, 4096, device=META, dtype=torch.float16), 8)
    ops.quantize_activation(torch.empty(16745, 4096, device=META, dtype=torch.float16), 8, rotate=True)
    """, tmp_path)
    for row in rows:
        assert row["narrow_row_products"] == 0 and row["wide_row_products"] > 0, (row["kernel"], row["meta"])


def test_sample_of_the_launch_table_compiles_and_passes(tmp_path):
    """`python -m qla_kernels.launch_table --ci --sample 80`: the CI subset of model conversions is
    planned (every key it plans must be in the committed table, else the table is stale), and a
    sample spread over every kernel, architecture and constexpr value (52 launches cover them all)
    compiles within each
    architecture's shared memory, without spills, with wgmma on sm_90 and exact epilogues."""
    report = tmp_path / "sample.json"
    env = dict(ENV, QLA_AOT_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "qla_kernels.launch_table", "--ci", "--sample", "80", "--json",
                             str(report)], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    data = json.loads(report.read_text())
    rows = data["rows"]
    assert data["stale"] == 0 and data["checked"] == len(rows) == 80 and data["planned"] > 1000
    assert {row["arch"] for row in rows} == {80, 90}
    assert {row["kernel"] for row in rows} == {"fused_linear_kernel", "requantize_rows_kernel",
                                              "quantize_activation_kernel", "dwsep_down_kernel",
                                              "quantized_attention_kernel", "rotate_quantize_kernel",
                                              "implicit_conv_kernel"}
    assert {row["meta"]["QUANTIZE_IN_LOOP"] for row in rows if row["kernel"] == "implicit_conv_kernel"} == {True, False}
    metas = [row["meta"] for row in rows if row["kernel"] == "fused_linear_kernel"]
    for flag in ("MAIN_FP32", "LOWRANK_FP32", "FULLRANK_FP32", "GATHER", "SCATTER", "ZERO_PER_ROW", "REQUANT"):
        assert any(meta[flag] for meta in metas), flag
    assert {meta["SPLIT_PHASE"] for meta in metas} == {0, 1, 2}
    assert {meta["BLOCK_R"] for meta in metas} >= {16, 32}
    assert any("bf16" in str(row["args"]) for row in rows)


def test_implicit_convolution_compiles_clean_at_resnet_shapes(tmp_path):
    """The implicit-GEMM convolution at ResNet-50 batch-64 shapes (3×3 at stride 1 and 2, a 1×1
    downsample at stride 2; int8 and int4 weights; dynamic scales quantized in the K loop, static
    codes with a zero point; ReLU after the residual, QwT's full-rank segment): every tile
    candidate compiles without spills, wgmma on sm_90, no contraction, 64-bit row offsets.
    Quantizing in the loop at BLOCK_K 128 spilled on sm_90 and at 64 on sm_80 before its cap."""
    rows = _compile("""
    from qla_kernels.formats.weights import QuantizedWeight
    from qla_kernels.ops.conv import ConvGeometry
    def weight(fmt, o, k):
        data = torch.empty(o, k if fmt == "int8" else k // 2, dtype=torch.int8 if fmt == "int8" else torch.uint8,
                           device=META)
        return QuantizedWeight(data, fmt, torch.empty(o, device=META),
                               colsum=torch.empty(o, dtype=torch.int32, device=META))
    static = dict(static_scale=torch.empty(1, device=META), zero_point=torch.empty(1, dtype=torch.int8, device=META))
    for fmt in ("int8", "int4"):
        x = torch.empty(64, 56, 56, 64, device=META, dtype=torch.float16)
        for scales in ({}, static):
            ops.quantized_conv2d(x, weight(fmt, 64, 576), ConvGeometry((3, 3), padding=(1, 1)), 8,
                                 bias=torch.empty(64, device=META), activation="relu", **scales)
        x = torch.empty(64, 28, 28, 128, device=META, dtype=torch.float16)
        ops.quantized_conv2d(x, weight(fmt, 128, 1152), ConvGeometry((3, 3), (2, 2), (1, 1)), 4,
                             bias=torch.empty(128, device=META), activation="relu")
        x = torch.empty(64, 28, 28, 256, device=META, dtype=torch.float16)
        ops.quantized_conv2d(x, weight(fmt, 512, 256), ConvGeometry((1, 1), (2, 2)), 8, **static)
    from qla_kernels.ops.conv import ConvPlan
    plan = ConvPlan(weight("int8", 256, 2304), ConvGeometry((3, 3), padding=(1, 1)), 8,
                    bias=torch.empty(256, device=META), fullrank_w=torch.empty(256, 256, device=META, dtype=torch.float16),
                    activation="relu", residual_before_activation=True).frozen()
    x = torch.empty(64, 14, 14, 256, device=META, dtype=torch.float16)
    plan.run(x, fullrank_x=torch.empty(64 * 14 * 14, 256, device=META, dtype=torch.float16), residual=x)
    """, tmp_path)
    implicit = [row for row in rows if row["kernel"] == "implicit_conv_kernel"]
    assert {row["meta"]["QUANTIZE_IN_LOOP"] for row in implicit} == {True, False}
    assert {row["arch"] for row in implicit} == {80, 90} and len(implicit) >= 50
    for row in implicit:
        assert not row["problems"], (row["arch"], row["meta"], row["problems"])
        assert row["narrow_row_products"] == 0 and row["wide_row_products"] > 0, (row["arch"], row["meta"])


def test_depthwise_convolution_compiles_clean(tmp_path):
    """The depthwise kernel at MobileNetV2 (3×3, stride 1 and 2) and ConvNeXt (7×7) batch-64
    shapes, dynamic and static with a zero point, ReLU6 and a residual: no spills, no
    contraction, 64-bit row offsets, on sm_90 and sm_80."""
    rows = _compile("""
    from qla_kernels.formats.weights import QuantizedWeight
    from qla_kernels.ops.conv import ConvGeometry
    def weight(o, taps):
        return QuantizedWeight(torch.empty(o, taps, dtype=torch.int8, device=META), "int8", torch.empty(o, device=META),
                               colsum=torch.empty(o, dtype=torch.int32, device=META))
    static = dict(static_scale=torch.empty(1, device=META), zero_point=torch.empty(1, dtype=torch.int8, device=META))
    for scales in ({}, static):
        x = torch.empty(64, 112, 112, 96, device=META, dtype=torch.float16)
        ops.quantized_conv2d(x, weight(96, 9), ConvGeometry((3, 3), (2, 2), (1, 1), groups=96), 8,
                             bias=torch.empty(96, device=META), activation="relu6", **scales)
        x = torch.empty(64, 56, 56, 96, device=META, dtype=torch.float16)
        ops.quantized_conv2d(x, weight(96, 49), ConvGeometry((7, 7), padding=(3, 3), groups=96), 4,
                             bias=torch.empty(96, device=META), residual=x, **scales)
    """, tmp_path)
    depthwise = [row for row in rows if row["kernel"] == "depthwise_conv_kernel"]
    assert {row["arch"] for row in depthwise} == {80, 90} and len(depthwise) == 8
    for row in depthwise:
        assert not row["problems"], (row["arch"], row["meta"], row["problems"])
        assert row["narrow_row_products"] == 0 and row["wide_row_products"] > 0, (row["arch"], row["meta"])
