import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from qla_kernels import ops
from qla_kernels.ops import RowMap
from qla_kernels.ops import reference

from .helpers import INTEGER_FORMATS, oracle_main_segment, random_int8, random_weight

ALL_FORMATS = INTEGER_FORMATS + ("uint4_asym_groups",)


def _unit_scales(weight):
    return dataclasses.replace(weight, scale=torch.ones_like(weight.scale))


@pytest.mark.parametrize("fmt", INTEGER_FORMATS)
@pytest.mark.parametrize("m", [1, 7, 33])
def test_integer_accumulator_is_exact(fmt, m):
    """Unit scales and fp32 output expose the raw int32 accumulator: it must equal int64 math."""
    weight = _unit_scales(random_weight(fmt, 24, 64, group=32))
    a, _ = random_int8(m, 64)
    y = ops.fused_linear(a, torch.ones(1), weight, out_dtype=torch.float32)
    expected = (a.long() @ weight.integer().long().t()).float()
    assert torch.equal(y, expected)


def test_accumulator_exact_at_extreme_values():
    weight = _unit_scales(random_weight("int8", 4, 4096))
    weight = dataclasses.replace(weight, data=torch.full((4, 4096), -128, dtype=torch.int8))
    a = torch.full((2, 4096), -128, dtype=torch.int8)
    y = ops.fused_linear(a, torch.ones(2), weight, out_dtype=torch.float32)
    assert torch.equal(y, torch.full((2, 4), 128.0 * 128 * 4096))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_main_segment_matches_fp64_oracle(fmt):
    weight = random_weight(fmt, 40, 96, group=32)
    if fmt == "uint4_asym_groups":
        a, a_scale = torch.randn(9, 96), None
    else:
        a, a_scale = random_int8(9, 96)
    y = ops.fused_linear(a, a_scale, weight, out_dtype=torch.float32)
    torch.testing.assert_close(y.double(), oracle_main_segment(a, a_scale, weight), rtol=1e-5, atol=1e-6)


def test_zero_point_term_equals_centered_activations():
    weight = random_weight("int8", 16, 64)
    weight = dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32))
    a, a_scale = random_int8(5, 64)
    zero = torch.tensor([-37], dtype=torch.int8)
    y = ops.fused_linear(a, a_scale, weight, a_zero_point=zero, out_dtype=torch.float32)
    expected = oracle_main_segment(a, a_scale, weight, a_zero_point=zero)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation, torch_fn", [
    ("none", lambda y: y),
    ("gelu", F.gelu),
    ("gelu_tanh", lambda y: F.gelu(y, approximate="tanh")),
    ("relu", F.relu),
    ("quick_gelu", lambda y: y * torch.sigmoid(1.702 * y)),
    ("swiglu", lambda y: F.silu(y[:, :y.shape[1] // 2]) * y[:, y.shape[1] // 2:]),
    ("geglu", lambda y: F.gelu(y[:, :y.shape[1] // 2]) * y[:, y.shape[1] // 2:]),
    ("geglu_tanh", lambda y: F.gelu(y[:, :y.shape[1] // 2], approximate="tanh") * y[:, y.shape[1] // 2:]),
])
def test_full_epilogue(activation, torch_fn):
    m, n, k, r, kc = 6, 32, 64, 16, 24
    weight = random_weight("int8", n, k)
    a, a_scale = random_int8(m, k)
    t, u = torch.randn(m, r, dtype=torch.float16), torch.randn(n, r, dtype=torch.float16) * 0.1
    xc, wc = torch.randn(m, kc, dtype=torch.float16), torch.randn(n, kc, dtype=torch.float16) * 0.1
    bias = torch.randn(n)
    n_out = n // 2 if activation in reference.GATED_ACTIVATIONS else n
    residual = torch.randn(m, n_out, dtype=torch.float16)
    y = ops.fused_linear(a, a_scale, weight, lowrank_t=t, lowrank_u=u, fullrank_x=xc, fullrank_w=wc, bias=bias,
                         activation=activation, residual=residual, out_dtype=torch.float32)
    pre = oracle_main_segment(a, a_scale, weight) + t.double() @ u.double().t() + xc.double() @ wc.double().t() + bias.double()
    expected = torch_fn(pre) + residual.double()
    assert y.shape == (m, n_out)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_is_one_rounding_of_fp32(out_dtype):
    weight = random_weight("int4", 16, 32)
    a, a_scale = random_int8(3, 32)
    y32 = ops.fused_linear(a, a_scale, weight, out_dtype=torch.float32)
    y = ops.fused_linear(a, a_scale, weight, out_dtype=out_dtype)
    assert y.dtype == out_dtype and torch.equal(y, y32.to(out_dtype))


@pytest.mark.parametrize("bits", [8, 4])
def test_requantized_output(bits):
    weight = random_weight("int8", 16, 32)
    a, a_scale = random_int8(5, 32)
    y32 = ops.fused_linear(a, a_scale, weight, activation="gelu", out_dtype=torch.float32)
    q, scale = ops.fused_linear(a, a_scale, weight, activation="gelu", requant_bits=bits)
    qmax = (1 << (bits - 1)) - 1
    assert q.dtype == torch.int8 and scale.shape == (5,)
    torch.testing.assert_close(scale, y32.abs().amax(dim=1) / qmax)
    assert bool(((q.float() * scale[:, None] - y32).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all())


def test_per_tensor_activation_scale_broadcasts():
    weight = random_weight("int8", 8, 32)
    a, _ = random_int8(4, 32)
    y = ops.fused_linear(a, torch.tensor([0.5]), weight, out_dtype=torch.float32)
    assert torch.equal(y, ops.fused_linear(a, torch.full((4,), 0.5), weight, out_dtype=torch.float32))


# ---------------------------------------------------------------- activation pre-op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dynamic_per_token_quantization(dtype):
    x = torch.randn(7, 48).to(dtype)
    q, scale, t = ops.quantize_activation(x, 8)
    assert t.shape == (7, 0)
    torch.testing.assert_close(scale, x.float().abs().amax(dim=1) / 127, rtol=0, atol=0)
    assert torch.equal(q, torch.round(x.float() / scale[:, None]).to(torch.int8))


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
def test_norm_then_quantize_then_down_projection(norm_kind):
    x = torch.randn(5, 64) * 3 + 1
    w, b = torch.randn(64), torch.randn(64) if norm_kind == "layernorm" else None
    down = torch.randn(64, 16, dtype=torch.float16)
    q, scale, t = ops.quantize_activation(x, 8, norm_kind=norm_kind, norm_weight=w, norm_bias=b, norm_eps=1e-6,
                                          down_proj=down)
    if norm_kind == "layernorm":
        normed = F.layer_norm(x, (64,), w, b, eps=1e-6)
    else:
        normed = F.rms_norm(x, (64,), w, eps=1e-6)
    torch.testing.assert_close(q.float() * scale[:, None], normed, atol=float(scale.max()) / 2 + 1e-5, rtol=0)
    torch.testing.assert_close(t.float(), normed.half().float() @ down.float(), rtol=2e-3, atol=2e-3)
    assert t.dtype == x.dtype


def test_static_scale_and_zero_point():
    x = torch.randn(6, 32) + 0.5
    scale = torch.tensor([0.02])
    zero = torch.tensor([-20], dtype=torch.int8)
    q8, s8, _ = ops.quantize_activation(x, 8, static_scale=scale, zero_point=zero)
    assert torch.equal(s8, torch.full((6,), 0.02))
    raw = torch.clamp(torch.round(x / 0.02) - 20, -128, 127)
    assert torch.equal(q8, raw.to(torch.int8))
    q4, _, _ = ops.quantize_activation(x, 4, static_scale=scale, zero_point=torch.tensor([-3], dtype=torch.int8))
    centered = torch.clamp(torch.round(x / 0.02) - 3, -8, 7) + 3
    assert torch.equal(q4, centered.to(torch.int8))


def test_zero_rows_and_non_finite_rows():
    x = torch.zeros(3, 16)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    q, scale, _ = ops.quantize_activation(x, 8)
    assert torch.equal(q[0], torch.zeros(16, dtype=torch.int8)) and scale[0] > 0
    assert scale[1].isnan() and scale[2].isinf()
    weight = random_weight("int8", 8, 16)
    y = ops.fused_linear(q, scale, weight, out_dtype=torch.float32)
    assert torch.equal(y[0], torch.zeros(8))
    assert not bool(torch.isfinite(y[1:]).any())


# ---------------------------------------------------------------- custom op registration


def test_opcheck_quantize_activation():
    x = torch.randn(5, 32, dtype=torch.float16)
    args = (x, 8, None, None, "layernorm", torch.ones(32), torch.zeros(32), 1e-5, torch.randn(32, 16, dtype=torch.float16))
    torch.library.opcheck(torch.ops.qla.quantize_activation.default, args)
    torch.library.opcheck(torch.ops.qla.quantize_activation.default, (*args, True))  # T from the raw input
    torch.library.opcheck(torch.ops.qla.quantize_activation.default,
                          (x, 4, torch.tensor([0.1]), torch.tensor([1], dtype=torch.int8), "none", None, None, 1e-5, None))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_opcheck_fused_linear(fmt):
    weight = random_weight(fmt, 16, 32)
    a, a_scale = (torch.randn(4, 32, dtype=torch.float16), None) if fmt == "uint4_asym_groups" else random_int8(4, 32)
    args = (a, a_scale, None, weight.data, weight.format, weight.scale, weight.group_scale, weight.zero,
            weight.k_group, None, torch.randn(4, 16, dtype=torch.float16), torch.randn(16, 16, dtype=torch.float16),
            None, None, torch.randn(16), "swiglu", torch.randn(4, 8, dtype=torch.float16), torch.float16, 0,
            None, None, 4)
    torch.library.opcheck(torch.ops.qla.fused_linear.default, args)
    requant = args[:18] + (8,) + args[19:]
    torch.library.opcheck(torch.ops.qla.fused_linear.default, requant)


# ---------------------------------------------------------------- property test


@given(
    m=st.integers(1, 20), n_half=st.integers(1, 12), k_groups=st.integers(1, 4),
    fmt=st.sampled_from(ALL_FORMATS), rank=st.sampled_from([0, 16, 32]), fullrank=st.booleans(),
    use_bias=st.booleans(), activation=st.sampled_from(reference.ACTIVATIONS), use_residual=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_fused_linear_property(m, n_half, k_groups, fmt, rank, fullrank, use_bias, activation, use_residual, seed):
    n, k = 2 * n_half, 32 * k_groups
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    weight = random_weight(fmt, n, k, group=32, seed=seed)
    if fmt == "uint4_asym_groups":
        a, a_scale = rand(m, k).half(), None
    else:
        a, a_scale = random_int8(m, k, seed=seed)
    t, u = (rand(m, rank).half(), (rand(n, rank) * 0.1).half()) if rank else (None, None)
    xc, wc = (rand(m, 8).half(), (rand(n, 8) * 0.1).half()) if fullrank else (None, None)
    bias = rand(n) if use_bias else None
    n_out = n // 2 if activation in reference.GATED_ACTIVATIONS else n
    residual = rand(m, n_out).half() if use_residual else None
    y = ops.fused_linear(a, a_scale, weight, lowrank_t=t, lowrank_u=u, fullrank_x=xc, fullrank_w=wc, bias=bias,
                         activation=activation, residual=residual, out_dtype=torch.float32)
    pre = oracle_main_segment(a, a_scale, weight)
    if rank:
        pre = pre + t.double() @ u.double().t()
    if fullrank:
        pre = pre + xc.double() @ wc.double().t()
    if use_bias:
        pre = pre + bias.double()
    expected = reference.apply_activation(pre, activation)
    if use_residual:
        expected = expected + residual.double()
    assert y.shape == (m, n_out)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_row_maps_equal_explicit_gather_and_scatter():
    """Swin-style: 6 tokens in spatial order, GEMM rows in a window order with 2 padding rows."""
    weight = random_weight("int8", 16, 32)
    a, a_scale = random_int8(6, 32)
    gather = RowMap.build(torch.tensor([3, 0, -1, 5, 1, 4, -1, 2]), 6)
    scatter = RowMap.build(torch.tensor([3, 0, -1, 5, 1, 4, -1, 2]), 6)
    t, u = torch.randn(6, 16), torch.randn(16, 16)
    residual = torch.randn(6, 16)
    y = ops.fused_linear(a, a_scale, weight, lowrank_t=t, lowrank_u=u, residual=residual, gather_rows=gather,
                         scatter_rows=scatter, out_rows=6, out_dtype=torch.float32)
    expected = ops.fused_linear(a, a_scale, weight, lowrank_t=t, lowrank_u=u, residual=residual,
                                out_dtype=torch.float32)
    assert torch.equal(y, expected)
    q, scale = ops.fused_linear(a, a_scale, weight, gather_rows=gather, scatter_rows=scatter, out_rows=6,
                                requant_bits=8)
    q_expected, scale_expected = ops.fused_linear(a, a_scale, weight, requant_bits=8)
    assert torch.equal(q, q_expected) and torch.equal(scale, scale_expected)


def test_gather_padding_rows_are_zero():
    weight = random_weight("int4", 8, 32)
    a, a_scale = random_int8(2, 32)
    y = ops.fused_linear(a, a_scale, weight, gather_rows=RowMap.build(torch.tensor([1, -1, 0]), 2),
                         out_dtype=torch.float32)
    assert y.shape == (3, 8) and torch.equal(y[1], torch.zeros(8))
    assert torch.equal(y[0], ops.fused_linear(a[1:], a_scale[1:], weight, out_dtype=torch.float32)[0])
    # A padding row is the value zero also under a per-tensor scale and zero point (codes q - z).
    zero_point = torch.tensor([5], dtype=torch.int8)
    weight = random_weight("int8", 8, 32)
    weight = dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32))
    y = ops.fused_linear(a, torch.tensor([0.1]), weight, a_zero_point=zero_point, bias=torch.ones(8),
                         gather_rows=RowMap.build(torch.tensor([1, -1]), 2), out_dtype=torch.float32)
    assert torch.equal(y[1], torch.ones(8))


def test_row_map_arguments_are_checked():
    weight = random_weight("int8", 8, 32)
    a, a_scale = random_int8(4, 32)
    with pytest.raises(ValueError, match="gather_rows must be a RowMap"):
        ops.fused_linear(a, a_scale, weight, gather_rows=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="gather_rows indexes 5 rows, but a has 4"):
        ops.fused_linear(a, a_scale, weight, gather_rows=RowMap.build(torch.tensor([0, 4]), 5))
    with pytest.raises(ValueError, match="scatter_rows indexes 2 rows, but out_rows is 3"):
        ops.fused_linear(a, a_scale, weight, scatter_rows=RowMap.build(torch.tensor([0, 1, -1, -1]), 2), out_rows=3)
    with pytest.raises(ValueError, match=r"scatter_rows must have shape \(4,\)"):
        ops.fused_linear(a, a_scale, weight, scatter_rows=RowMap.build(torch.tensor([0, 1]), 2), out_rows=2)
    with pytest.raises(ValueError, match="out_rows=3 must equal"):
        ops.fused_linear(a, a_scale, weight, out_rows=3)


def test_normalize_and_quantize_is_the_norm_and_quantize_activation():
    x = torch.randn(6, 40) * 2
    weight, bias = torch.randn(40), torch.randn(40)
    down = torch.randn(40, 8)
    normed, q, scale, t = ops.normalize_quantize_activation(x.half(), 8, "layernorm", weight, bias, 1e-6,
                                                            down_proj=down.half())
    norm = torch.nn.functional.layer_norm(x.half().float(), (40,), weight, bias, 1e-6)
    torch.testing.assert_close(normed, norm.half(), rtol=1e-3, atol=1e-3)
    expected = ops.quantize_activation(x.half(), 8, norm_kind="layernorm", norm_weight=weight, norm_bias=bias,
                                       norm_eps=1e-6, down_proj=down.half())
    assert torch.equal(q, expected[0]) and torch.equal(scale, expected[1]) and torch.equal(t, expected[2])
    with pytest.raises(ValueError, match="norm_kind must be 'layernorm' or 'rmsnorm'"):
        ops.normalize_quantize_activation(x, 8, "none")
