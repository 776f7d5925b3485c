"""Triton kernels vs the reference. On CPU they run in Triton's interpreter (TRITON_INTERPRET=1,
set by conftest; fp32/fp16 only, the interpreter's bf16 dot is wrong); on a GPU the same tests run
the compiled kernels, bf16 included.

Integer parts must be bit-exact. The fp epilogue is compared with rtol/atol 1e-4 relative to the
output scale: the low-rank / full-rank dots and erf differ from PyTorch's only in summation order
and last-ulp rounding (fp32 accumulation over r <= 128 terms: ~1e-6 relative), and fp16 outputs
add one rounding (~5e-4 relative), so 1e-4 on fp32 outputs and 2e-3 on fp16 outputs hold with a
wide margin while any indexing or formula error fails by orders of magnitude.
"""

import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops import reference
from qla_kernels.ops import RowMap
from qla_kernels.ops.triton import launch
from qla_kernels.ops.triton.kernel_launch import target_of
from qla_kernels.ops.triton import tuning
from qla_kernels.ops.triton.tuning import gemm_candidates
from qla_kernels.quant import quantize_weight

from ..conftest import examples
from .helpers import INTEGER_FORMATS, random_int8, random_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not qk.backends()["triton"].available, reason=str(qk.backends()["triton"]))


def _to(weight):
    return weight.to(DEVICE)


def _both(fn):
    """(reference result, triton result) of the same call."""
    with qk.use_backend("reference"):
        expected = fn()
    with qk.use_backend("triton"):
        actual = fn()
    return expected, actual


@pytest.mark.parametrize("fmt, k, group", [("int8", 80, 16), ("int4", 80, 16), ("int4_int8_groups", 80, 16),
                                           ("int4_int8_groups", 96, 32)])
@pytest.mark.parametrize("m", [1, 7, 197, 200])
def test_integer_main_loop_is_exact(fmt, k, group, m):
    """Unit scales and an fp32 output expose the int32 accumulator. N=40 and K=80 are not
    multiples of the 32-wide tiles; groups of 16 are narrower than BLOCK_K, groups of 32 not."""
    weight = random_weight(fmt, 40, k, group=group)
    weight = _to(dataclasses.replace(weight, scale=torch.ones_like(weight.scale)))
    a, _ = random_int8(m, k)
    a = a.to(DEVICE)
    with qk.use_backend("triton"):
        y = ops.fused_linear(a, torch.ones(1, device=DEVICE), weight, out_dtype=torch.float32)
    expected = (a.long().cpu() @ weight.integer().long().cpu().t()).float()
    assert torch.equal(y.cpu(), expected)


@pytest.mark.parametrize("fmt", INTEGER_FORMATS)
def test_dequant_bias_residual_is_bit_exact(fmt):
    """Without dots in the epilogue every fp op happens in the same order as the reference."""
    weight = _to(random_weight(fmt, 48, 64, group=32))
    a, a_scale = (t.to(DEVICE) for t in random_int8(13, 64))
    bias, residual = torch.randn(48, device=DEVICE), torch.randn(13, 48, device=DEVICE)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, bias=bias, residual=residual,
                                                      activation="relu", out_dtype=torch.float32))
    assert torch.equal(actual, expected)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, bias=bias, residual=residual, requant_bits=8))
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_zero_point_term_is_exact():
    weight = random_weight("int8", 24, 64)
    weight = _to(dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32)))
    a, a_scale = (t.to(DEVICE) for t in random_int8(9, 64))
    for zero in (torch.tensor([-21], dtype=torch.int8), torch.randint(-128, 127, (9,), dtype=torch.int8)):
        zero = zero.to(DEVICE)
        expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, a_zero_point=zero, out_dtype=torch.float32))
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_full_epilogue(activation, out_dtype):
    m, n, k = 37, 48, 96
    weight = _to(random_weight("int4_int8_groups", n, k, group=32))
    a, a_scale = (t.to(DEVICE) for t in random_int8(m, k))
    n_out = n // 2 if activation in reference.GATED_ACTIVATIONS else n
    kwargs = dict(
        lowrank_t=torch.randn(m, 20, device=DEVICE, dtype=torch.float16),
        lowrank_u=(torch.randn(n, 20, device=DEVICE) * 0.1).half(),
        fullrank_x=torch.randn(m, 24, device=DEVICE), fullrank_w=torch.randn(n, 24, device=DEVICE) * 0.1,
        bias=torch.randn(n, device=DEVICE, dtype=torch.float16), activation=activation,
        residual=torch.randn(m, n_out, device=DEVICE, dtype=torch.float16), out_dtype=out_dtype,
    )
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, **kwargs))
    assert actual.dtype == out_dtype and actual.shape == (m, n_out)
    tolerance = 1e-4 if out_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "silu", "gelu"])
def test_residual_before_the_activation(activation):
    """act(y + bias + residual) + T·Uᵀ + X_c·W_cᵀ: the residual joins before the activation
    (ResNet's block output), the corrections after it."""
    m, n, k = 29, 40, 64
    weight = _to(random_weight("int8", n, k))
    a, a_scale = (t.to(DEVICE) for t in random_int8(m, k))
    kwargs = dict(bias=torch.randn(n, device=DEVICE), activation=activation,
                  residual=torch.randn(m, n, device=DEVICE) * 3, residual_before_activation=True,
                  lowrank_t=torch.randn(m, 16, device=DEVICE), lowrank_u=torch.randn(n, 16, device=DEVICE) * 0.1,
                  fullrank_x=torch.randn(m, 24, device=DEVICE), fullrank_w=torch.randn(n, 24, device=DEVICE) * 0.1,
                  out_dtype=torch.float32)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, **kwargs))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_requantized_output_with_low_rank(bits):
    """The low-rank dot moves y by ulps, so a value on a rounding boundary may round the other way."""
    weight = _to(random_weight("int8", 64, 64))
    a, a_scale = (t.to(DEVICE) for t in random_int8(21, 64))
    t, u = torch.randn(21, 16, device=DEVICE), torch.randn(64, 16, device=DEVICE) * 0.1
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, lowrank_t=t, lowrank_u=u,
                                                      activation="gelu", requant_bits=bits))
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=0)
    assert int((actual[0].int() - expected[0].int()).abs().max()) <= 1
    assert float((actual[0] != expected[0]).float().mean()) < 0.01


def test_row_maps():
    """Window order with padding rows: GEMM row m reads A row gather[m], writes row scatter[m]."""
    weight = _to(random_weight("int4", 32, 64))
    a, a_scale = (t.to(DEVICE) for t in random_int8(10, 64))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).int()
    padded = RowMap.build(torch.cat([order[:6], torch.tensor([-1, -1], dtype=torch.int32), order[6:]]).to(DEVICE), 10)
    t, u = torch.randn(10, 16, device=DEVICE), torch.randn(32, 16, device=DEVICE)
    residual = torch.randn(10, 32, device=DEVICE)
    call = lambda **kw: ops.fused_linear(a, a_scale, weight, gather_rows=padded, scatter_rows=padded, out_rows=10,  # noqa: E731
                                         residual=residual, **kw)
    expected, actual = _both(lambda: call(out_dtype=torch.float32))
    assert torch.equal(actual, expected)
    expected, actual = _both(lambda: call(lowrank_t=t, lowrank_u=u, requant_bits=8))
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=0)
    assert int((actual[0].int() - expected[0].int()).abs().max()) <= 1
    # Padding rows under a per-tensor scale and zero point are the value zero: the bias alone.
    weight = random_weight("int8", 32, 64)
    weight = _to(dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32)))
    per_tensor = dict(a_zero_point=torch.tensor([7], dtype=torch.int8, device=DEVICE),
                      bias=torch.randn(32, device=DEVICE), gather_rows=padded, out_dtype=torch.float32)
    expected, actual = _both(lambda: ops.fused_linear(a, torch.tensor([0.05], device=DEVICE), weight, **per_tensor))
    assert torch.equal(actual, expected) and torch.equal(actual[6], per_tensor["bias"])


def test_opcheck_triton_ops():
    weight = _to(random_weight("int4", 16, 32))
    a, a_scale = (t.to(DEVICE) for t in random_int8(4, 32))
    args = (a, a_scale, None, weight.data, weight.format, weight.scale, None, None, weight.k_group, None,
            None, None, None, None, torch.randn(16, device=DEVICE), "gelu", None, torch.float16, 0, None, None, 4)
    torch.library.opcheck(torch.ops.qla.fused_linear_triton.default, args)
    x = torch.randn(5, 32, device=DEVICE)
    torch.library.opcheck(torch.ops.qla.quantize_activation_triton.default,
                          (x, 8, None, None, "rmsnorm", torch.ones(32, device=DEVICE), None, 1e-6, torch.randn(32, 16, device=DEVICE)))
    for op in (torch.ops.qla.normalize_activation_triton, torch.ops.qla.normalize_activation):
        torch.library.opcheck(op.default, (x, "layernorm", torch.ones(32, device=DEVICE), None, 1e-6,
                                           torch.randn(32, 16, device=DEVICE)))
    for op in (torch.ops.qla.normalize_quantize_activation_triton, torch.ops.qla.normalize_quantize_activation):
        torch.library.opcheck(op.default, (x, 8, None, None, "layernorm", torch.ones(32, device=DEVICE), None, 1e-6,
                                           torch.randn(32, 16, device=DEVICE)))
    for op in (torch.ops.qla.quantize_activation_into_triton, torch.ops.qla.quantize_activation_into):
        torch.library.opcheck(op.default, (x, 8, None, None, "none", None, None, 1e-6, torch.randn(32, 16, device=DEVICE),
                                           torch.empty(5, 16, device=DEVICE)))


# ---------------------------------------------------------------- activation pre-kernel


@pytest.mark.parametrize("shape", [(1, 16), (7, 33), (37, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dynamic_quantization_is_bit_exact(shape, dtype):
    x = (torch.randn(shape) * 5).to(dtype).to(DEVICE)
    x[0, 0] = 0.5
    expected, actual = _both(lambda: ops.quantize_activation(x, 8))
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_static_scale_and_zero_points_are_bit_exact():
    x = (torch.rand(19, 48) * 4 - 1).to(DEVICE)
    scale = torch.tensor([0.03], device=DEVICE)
    for bits, zero in ((8, -40), (4, 3)):
        zero = torch.tensor([zero], dtype=torch.int8, device=DEVICE)
        expected, actual = _both(lambda: ops.quantize_activation(x, bits, static_scale=scale, zero_point=zero))
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_zero_and_non_finite_rows():
    x = torch.randn(4, 40, device=DEVICE)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 1] = float("-inf")
    expected, actual = _both(lambda: ops.quantize_activation(x, 8))
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("rank", [0, 8, 40])
def test_norm_quantize_and_down_projection(norm_kind, rank):
    """Norm statistics are sums in another order: ulp-level changes may flip a rounding by one."""
    k = 200
    x = (torch.randn(23, k) * 2 + 0.5).to(DEVICE)
    weight = torch.randn(k, device=DEVICE)
    bias = torch.randn(k, device=DEVICE) if norm_kind == "layernorm" else None
    down = (torch.randn(k, rank, device=DEVICE) * 0.1).half() if rank else None
    expected, actual = _both(lambda: ops.quantize_activation(x, 8, norm_kind=norm_kind, norm_weight=weight,
                                                             norm_bias=bias, norm_eps=1e-6, down_proj=down))
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=0)
    assert int((actual[0].int() - expected[0].int()).abs().max()) <= 1
    assert float((actual[0] != expected[0]).float().mean()) < 0.01
    assert actual[2].shape == (23, rank)
    if rank:
        torch.testing.assert_close(actual[2].float(), expected[2].float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("norm_kind", ["layernorm", "none"])
def test_down_projection_of_the_raw_input(norm_kind):
    """QwT's T = x·V_r from the pre-kernel's read of x: the raw input, not the normalized one;
    the codes are those without T."""
    k, rank = 96, 12
    x = (torch.randn(29, k) * 3 + 1).to(DEVICE)
    down = (torch.randn(k, rank, device=DEVICE) * 0.1).half()
    norm = dict(norm_kind=norm_kind, norm_weight=torch.randn(k, device=DEVICE)) if norm_kind != "none" else {}
    expected, actual = _both(lambda: ops.quantize_activation(x, 8, down_proj=down, down_from_input=True, **norm))
    plain, _ = _both(lambda: ops.quantize_activation(x, 8, **norm))
    raw = (x.half().float() @ down.float()).half()
    for q, _, t in (expected, actual):
        assert int((q.int() - plain[0].int()).abs().max()) <= 1
        torch.testing.assert_close(t.float(), raw.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(actual[2].float(), expected[2].float(), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="down_from_input must be a bool"):
        ops.quantize_activation(x, 8, down_proj=down, down_from_input=1)


@examples(25)
@given(m=st.integers(1, 40), k=st.integers(1, 300), norm_kind=st.sampled_from(["layernorm", "rmsnorm"]),
       dtype=st.sampled_from([torch.float32, torch.float16]), bits=st.sampled_from([8, 4]),
       static=st.sampled_from([None, "symmetric", "zero_point"]), rank=st.sampled_from([0, 3, 16]),
       from_input=st.booleans(), seed=st.integers(0, 10_000))
def test_normalize_and_quantize_matches_reference(m, k, norm_kind, dtype, bits, static, rank, from_input, seed):
    """Post-norm blocks' pre-kernel (and pre-norm blocks' whose adapter reads norm1(x)): the
    normalized activations and their codes from one read, T from either. Norm statistics are sums
    in another order, so a code may move by one."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(DEVICE)  # noqa: E731
    x = (rand(m, k) * 3 + 0.5).to(dtype)
    weight, bias = rand(k), (rand(k) if norm_kind == "layernorm" else None)
    scale = torch.tensor([0.05], device=DEVICE) if static else None
    zero = torch.tensor([3], dtype=torch.int8, device=DEVICE) if static == "zero_point" else None
    down = (rand(k, rank) * 0.1).to(dtype) if rank else None
    expected, actual = _both(lambda: ops.normalize_quantize_activation(
        x, bits, norm_kind, weight, bias, 1e-6, static_scale=scale, zero_point=zero, down_proj=down,
        down_from_input=from_input))
    atol = 1e-5 if dtype == torch.float32 else 2e-3 * float(expected[0].abs().max())
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-3, atol=atol)
    torch.testing.assert_close(actual[2], expected[2], rtol=1e-5, atol=0)
    assert int((actual[1].int() - expected[1].int()).abs().max()) <= 1
    if rank:
        torch.testing.assert_close(actual[3].float(), expected[3].float(), rtol=5e-3,
                                   atol=5e-3 * float(expected[3].abs().max()) + 1e-6)


# ---------------------------------------------------------------- dispatch and validation


def test_quant_linear_runs_triton_and_matches_reference():
    layer = qk.QuantLinear.from_float(torch.nn.Linear(64, 48), qk.W4A8()).to(DEVICE)
    x = torch.randn(3, 5, 64, device=DEVICE)
    expected, actual = _both(lambda: layer(x))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group, k", [(16, 80), (32, 96), (64, 128), (None, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 70])
def test_w4a16_dequant_in_the_loop(group, k, dtype, m):
    """fp activations × uint4 (groups narrower and wider than BLOCK_K, per channel): each weight
    tile is (q − z)·s rounded once to the activation dtype, as in the reference; only the fp32
    summation order differs."""
    weight = _to(quantize_weight(torch.randn(48, k) * 0.05, qk.W4A16(group_size=group)))
    a = torch.randn(m, k, device=DEVICE).to(dtype)
    kwargs = dict(bias=torch.randn(48, device=DEVICE), lowrank_t=torch.randn(m, 16, device=DEVICE, dtype=dtype),
                  lowrank_u=torch.randn(48, 16, device=DEVICE, dtype=dtype), residual=torch.randn(m, 48, device=DEVICE),
                  activation="gelu", out_dtype=torch.float32)
    expected, actual = _both(lambda: ops.fused_linear(a, None, weight, **kwargs))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_w4a16_quant_linear_runs_triton():
    layer = qk.QuantLinear.from_float(torch.nn.Linear(64, 48), qk.W4A16(group_size=32)).to(DEVICE)
    x = torch.randn(5, 64, device=DEVICE)
    expected, actual = _both(lambda: layer(x))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(a_scale=torch.ones(3)), r"a_scale must have shape"),
    (dict(a=torch.zeros(4, 30, dtype=torch.int8)), "in_features=32"),
    (dict(a=torch.randn(4, 32)), "a must have dtype"),
    (dict(lowrank_t=torch.randn(4, 16), lowrank_u=torch.randn(16, 16, dtype=torch.float16)), "must share a dtype"),
])
def test_bad_input_is_rejected_before_launch(bad, match):
    weight = _to(random_weight("int4", 16, 32))
    a, a_scale = (t.to(DEVICE) for t in random_int8(4, 32))
    args = dict(a=a, a_scale=a_scale)
    args.update({key: value.to(DEVICE) for key, value in bad.items()})
    with qk.use_backend("triton"), pytest.raises(ValueError, match=match):
        ops.fused_linear(args.pop("a"), args.pop("a_scale"), weight, **args)


# ---------------------------------------------------------------- property test


@given(
    m=st.integers(1, 70), n_half=st.integers(1, 40), k_groups=st.integers(1, 3),
    fmt=st.sampled_from(INTEGER_FORMATS + ("uint4_asym_groups",)), group=st.sampled_from([16, 32, 64]),
    rank=st.sampled_from([0, 5, 16, 40]),
    fullrank=st.booleans(), zero=st.booleans(), activation=st.sampled_from(reference.ACTIVATIONS),
    use_residual=st.booleans(), seed=st.integers(0, 10_000),
)
def test_fused_linear_property(m, n_half, k_groups, fmt, group, rank, fullrank, zero, activation, use_residual, seed):
    n, k = 2 * n_half, group * k_groups
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(DEVICE)  # noqa: E731
    weight = random_weight(fmt, n, k, group=group, seed=seed)
    floating = fmt == "uint4_asym_groups"
    zero = zero and not floating
    if zero:
        weight = dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32))
    weight = _to(weight)
    if floating:
        a, a_scale = rand(m, k).half(), None
    else:
        a, a_scale = (t.to(DEVICE) for t in random_int8(m, k, seed=seed))
    n_out = n // 2 if activation in reference.GATED_ACTIVATIONS else n
    kwargs = dict(
        a_zero_point=torch.tensor([seed % 200 - 100], dtype=torch.int8, device=DEVICE) if zero else None,
        lowrank_t=rand(m, rank).half() if rank else None, lowrank_u=(rand(n, rank) * 0.1).half() if rank else None,
        fullrank_x=rand(m, 8) if fullrank else None, fullrank_w=rand(n, 8) * 0.1 if fullrank else None,
        bias=rand(n), activation=activation, residual=rand(m, n_out) if use_residual else None,
        out_dtype=torch.float32,
    )
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, **kwargs))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


# ---------------------------------------------------------------- real shapes on the GPU

REAL_SHAPES = [(12608, 2304, 768), (12608, 768, 768), (12608, 3072, 768), (12608, 768, 3072),
               (4096, 768, 768), (2048, 14336, 4096), (16, 4096, 4096), (1, 4096, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 200, 2048])
@pytest.mark.parametrize("n, k", [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_llama_shapes_on_gpu(m, n, k, dtype):
    weight = _to(quantize_weight(torch.randn(n, k) * 0.02, qk.W4A16(group_size=128)))
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    t, u = torch.randn(m, 16, device=DEVICE, dtype=dtype), (torch.randn(n, 16, device=DEVICE) * 0.05).to(dtype)
    kwargs = dict(lowrank_t=t, lowrank_u=u, residual=torch.randn(m, n, device=DEVICE, dtype=dtype), out_dtype=dtype)
    expected, actual = _both(lambda: ops.fused_linear(a, None, weight, **kwargs))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", REAL_SHAPES)
@pytest.mark.parametrize("fmt", INTEGER_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_shapes_on_gpu(m, n, k, fmt, dtype):
    weight = _to(random_weight(fmt, n, k, group=128))
    a, a_scale = (t.to(DEVICE) for t in random_int8(m, k))
    t, u = torch.randn(m, 32, device=DEVICE, dtype=dtype), (torch.randn(n, 32, device=DEVICE) * 0.05).to(dtype)
    kwargs = dict(lowrank_t=t, lowrank_u=u, bias=torch.randn(n, device=DEVICE, dtype=dtype),
                  residual=torch.randn(m, n, device=DEVICE, dtype=dtype), out_dtype=dtype)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, **kwargs))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2 * float(expected.abs().max()))
    unit = dataclasses.replace(weight, scale=torch.ones_like(weight.scale))
    with qk.use_backend("triton"):
        y = ops.fused_linear(a[:256], torch.ones(1, device=DEVICE), unit, out_dtype=torch.float32)
    assert torch.equal(y, (a[:256].double() @ unit.integer().double().t()).float())


def test_t_written_into_a_column_range_of_a_shared_buffer():
    """Two corrections fill one T buffer (columns 0:8 and 8:24) without copies."""
    x = torch.randn(21, 64, device=DEVICE)
    down_a, down_b = torch.randn(64, 8, device=DEVICE), torch.randn(64, 16, device=DEVICE)
    results = []
    for backend in ("reference", "triton"):
        shared = torch.full((21, 24), float("nan"), device=DEVICE)
        with qk.use_backend(backend):
            q, scale, t = ops.quantize_activation(x, 8, norm_kind="rmsnorm", down_proj=down_a, t_out=shared[:, :8])
            ops.quantize_activation(x, 8, down_proj=down_b, t_out=shared[:, 8:])
        assert t.data_ptr() == shared.data_ptr() and not bool(shared.isnan().any())
        results.append(shared)
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="t_out needs down_proj"):
        ops.quantize_activation(x, 8, t_out=results[0][:, :8])
    with pytest.raises(ValueError, match=r"t_out must have shape \(21, 8\)"):
        ops.quantize_activation(x, 8, down_proj=down_a, t_out=results[0])


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [0, 16])
def test_decode_pre_kernel(norm_kind, dtype, rank):
    """W4A16 decode: norm → activation in x.dtype and T = norm(x)·A from one read of x."""
    x = (torch.randn(3, 200, device=DEVICE) * 2 + 1).to(dtype)
    weight = torch.randn(200, device=DEVICE)
    bias = torch.randn(200, device=DEVICE) if norm_kind == "layernorm" else None
    down = torch.randn(200, rank, device=DEVICE).to(dtype) if rank else None
    expected, actual = _both(lambda: ops.normalize_activation(x, norm_kind, weight, bias, 1e-6, down_proj=down))
    assert actual[0].dtype == dtype and actual[1].shape == (3, rank)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual[0], expected[0], rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        reference = (torch.nn.functional.layer_norm(x, (200,), weight, bias, 1e-6) if norm_kind == "layernorm"
                     else torch.nn.functional.rms_norm(x, (200,), weight, 1e-6))
        torch.testing.assert_close(expected[0], reference, rtol=1e-5, atol=1e-5)
    if rank:
        torch.testing.assert_close(actual[1].float(), expected[1].float(), rtol=5e-3, atol=5e-3 * float(expected[1].abs().max()))
    with pytest.raises(ValueError, match="norm_kind must be 'layernorm' or 'rmsnorm'"):
        ops.normalize_activation(x, "none")


@examples(25)
@given(m=st.integers(1, 40), n_half=st.integers(1, 40), steps=st.integers(8, 24), group=st.sampled_from([16, 32, 64]),
       rank=st.sampled_from([0, 16]), activation=st.sampled_from(reference.ACTIVATIONS), requant=st.booleans(),
       row_maps=st.booleans(), seed=st.integers(0, 10_000))
def test_w4a16_split_k_matches_reference(m, n_half, steps, group, rank, activation, requant, row_maps, seed):
    """Small-M W4A16 splits K across programs (partial sums, then a fixed-order reduction that
    runs the whole epilogue); forced here by pretending the device has many SMs."""
    many_sms = dataclasses.replace(target_of(torch.device(DEVICE)), sm_count=256)
    with mock.patch.object(launch, "target_of", lambda device: many_sms):
        _check_w4a16_split_k(m, n_half, steps, group, rank, activation, requant, row_maps, seed)


def _check_w4a16_split_k(m, n_half, steps, group, rank, activation, requant, row_maps, seed):
    n = 2 * n_half
    block_k = gemm_candidates(target_of(torch.device(DEVICE)), columns=n)[0].block_k
    k = max(group, block_k) * steps
    if DEVICE == "cpu":  # the interpreter's one 16×32 tile configuration does split
        tiles = -(-m // 16) * -(-n // 32)
        assert launch.split_k_plan(tiles, k, min(block_k, group), 256)[0] > 1
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(DEVICE)  # noqa: E731
    weight = _to(random_weight("uint4_asym_groups", n, k, group=group, seed=seed))
    n_out = n // 2 if activation in reference.GATED_ACTIVATIONS else n
    maps = {}
    if row_maps:
        maps = dict(gather_rows=RowMap.build(torch.randperm(m, generator=generator).to(DEVICE), m),
                    scatter_rows=RowMap.build(torch.randperm(m, generator=generator).to(DEVICE), m))
    kwargs = dict(lowrank_t=rand(m, rank).half() if rank else None, lowrank_u=(rand(n, rank) * 0.1).half() if rank else None,
                  bias=rand(n), activation=activation, residual=rand(m, n_out), out_dtype=torch.float32,
                  requant_bits=8 if requant else 0, **maps)
    a = rand(m, k).half()
    expected, actual = _both(lambda: ops.fused_linear(a, None, weight, **kwargs))
    if requant:  # one code may flip where the fp32 sum order moves a value across a rounding edge
        assert (actual[0].int() - expected[0].int()).abs().max() <= 1
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-4, atol=0)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_split_k_reduction_tiles_differ_from_the_split_tiles():
    """The reduction phase runs its own, at most 32-row tiles over the partial sums: with 64-row
    split tiles every output row is still reduced exactly once (gated epilogue included)."""
    tall = tuning.GemmConfig(64, 32, 32, 2, 4, 1)
    many_sms = dataclasses.replace(target_of(torch.device(DEVICE)), sm_count=256)
    with mock.patch.object(launch, "target_of", lambda device: many_sms), \
            mock.patch.object(launch, "gemm_candidates", lambda *args, **kwargs: (tall,)):
        for activation in ("none", "swiglu"):
            _check_w4a16_split_k(70, 24, 8, 32, 16, activation, False, False, seed=1)


def test_split_k_plan_keeps_every_split_nonempty_and_block_aligned():
    assert launch.split_k_plan(4, 4096, 128, 0) == (1, 4096)  # no SMs known: no split
    for tiles, k, block_k in ((64, 4096, 128), (1, 4096, 128), (8, 14336, 128), (300, 4096, 128), (4, 640, 64)):
        splits, per_split = launch.split_k_plan(tiles, k, block_k, 132)
        assert per_split % block_k == 0 and (splits - 1) * per_split < k <= splits * per_split
        assert splits == 1 or per_split >= launch._SPLIT_K_MIN_STEPS * block_k
        assert splits == 1 or tiles * (splits - 1) < launch._SPLIT_K_TILES_PER_SM * 132
