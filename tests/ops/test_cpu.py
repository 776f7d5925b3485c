"""The `cpu` backend (ops/cpu.py, csrc/cpu/) against the reference, on every instruction-set path
this machine runs: integer parts bit for bit, the fp32 epilogue within its rounding."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.formats.weights import QuantizedWeight
from qla_kernels.ops import cpu, reference
from qla_kernels.ops.row_maps import RowMap

from ..conftest import examples
from .helpers import INTEGER_FORMATS, at_thread_counts, random_int8, random_weight

pytestmark = pytest.mark.skipif(not qk.backends()["cpu"].available, reason=str(qk.backends()["cpu"]))
PATHS = cpu.supported_isas() if qk.backends()["cpu"].available else []


def _both(call, path):
    """(reference result, cpu result on `path`) of one call."""
    with qk.use_backend("reference"):
        expected = call()
    with qk.use_backend("cpu"), cpu.using_isa(path):
        actual = call()
    return expected, actual


def _small_weight(n, k, limit, seed=0):
    """An "int8"-format weight with values in [-limit, limit] (W4A4 carries -8..7 this way)."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(-limit, limit + 1, (n, k), generator=generator, dtype=torch.int8)
    return QuantizedWeight(data, "int8", torch.rand(n, generator=generator) * 0.01 + 1e-3)


WEIGHTS = {
    **{fmt: (lambda n, k, fmt=fmt: random_weight(fmt, n, k, group=16 if k % 16 == 0 else k)) for fmt in INTEGER_FORMATS},
    "int8_w4_values": lambda n, k: _small_weight(n, k, 8),  # the AVX2 u8 × s8 kernel, 8 int16 steps
    "int8_w7_values": lambda n, k: _small_weight(n, k, 64),  # its bound: one step
    "int8_w65_values": lambda n, k: _small_weight(n, k, 65),  # just past it: the int16 kernel
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", sorted(WEIGHTS))
@pytest.mark.parametrize("m", [1, 7, 197])
@pytest.mark.parametrize("n, k", [(33, 48), (100, 130), (17, 6)])
def test_integer_sum_and_dequantization_are_exact(path, kind, m, n, k):
    if kind in INTEGER_FORMATS and kind != "int8" and k % 2:
        pytest.skip("int4 packs two k per byte")
    if kind == "int4_int8_groups" and k % 16:
        pytest.skip("groups of 16")
    weight = WEIGHTS[kind](n, k)
    a, a_scale = random_int8(m, k, seed=m + n)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, out_dtype=torch.float32), path)
    assert torch.equal(actual, expected)
    # Packed once (a frozen plan's panels) or per call: the same numbers.
    packed = cpu.with_panels(weight)
    assert packed.panels is not None
    with qk.use_backend("cpu"), cpu.using_isa(path):
        assert torch.equal(ops.fused_linear(a, a_scale, packed, out_dtype=torch.float32), expected)


@pytest.mark.parametrize("path", PATHS)
def test_extreme_codes_and_zero_points_are_exact(path):
    """All codes at -128 / 127 against weights at ±127 and zero points at both ends: the u8 sum and
    the 128·colsum term each near 2^31 at large K, their difference exact."""
    k = 4096
    for code, zero in ((-128, 127), (127, -128), (-128, -128)):
        a = torch.full((3, k), code, dtype=torch.int8)
        data = torch.full((20, k), 127, dtype=torch.int8)
        data[1::2] = -127
        weight = QuantizedWeight(data, "int8", torch.full((20,), 1e-3), colsum=data.sum(1, dtype=torch.int32))
        zero_point = torch.tensor([zero], dtype=torch.int8)
        expected, actual = _both(lambda: ops.fused_linear(a, torch.full((3,), 1e-2), weight, a_zero_point=zero_point,
                                                          out_dtype=torch.float32), path)
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_epilogue_term(path, activation, dtype):
    """T·Uᵀ, X_c·W_cᵀ, bias, activation and residual (in `dtype`, as is the output): fp32 sums in
    another order than torch's, and the activations through their own exp / erf (errors of a few
    ulps), then one rounding to `dtype`, which may round the other way (one ulp of `dtype`)."""
    m, n, k = 37, 48, 96
    weight = random_weight("int4_int8_groups", n, k, group=32)
    a, a_scale = random_int8(m, k)
    n_out = n // 2 if activation in reference.GATED_ACTIVATIONS else n
    kwargs = dict(lowrank_t=torch.randn(m, 20).to(dtype), lowrank_u=(torch.randn(n, 20) * 0.1).to(dtype),
                  fullrank_x=torch.randn(m, 24), fullrank_w=torch.randn(n, 24) * 0.1, bias=torch.randn(n).to(dtype),
                  activation=activation, residual=torch.randn(m, n_out).to(dtype), out_dtype=dtype)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, **kwargs), path)
    assert actual.shape == (m, n_out) and actual.dtype == dtype
    ulp = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=ulp, atol=ulp * float(expected.abs().max()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", [a for a in reference.ACTIVATIONS if a not in reference.GATED_ACTIVATIONS])
def test_residual_before_the_activation(path, activation):
    """act(y + bias + residual) + T·Uᵀ + X_c·W_cᵀ: a residual block's output (ResNet's relu after
    the add) with the corrections beside the block added after it."""
    m, n, k = 29, 40, 72
    weight = random_weight("int8", n, k)
    a, a_scale = random_int8(m, k)
    corrections = dict(lowrank_t=torch.randn(m, 12), lowrank_u=torch.randn(n, 12) * 0.1,
                       fullrank_x=torch.randn(m, 20), fullrank_w=torch.randn(n, 20) * 0.1)
    kwargs = dict(bias=torch.randn(n), activation=activation, residual=torch.randn(m, n) * 3,
                  residual_before_activation=True, out_dtype=torch.float32, **corrections)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, **kwargs), path)
    with qk.use_backend("reference"):
        block = reference.apply_activation(ops.fused_linear(a, a_scale, weight, bias=kwargs["bias"],
                                                            out_dtype=torch.float32) + kwargs["residual"], activation)
    unfused = (block + corrections["lowrank_t"] @ corrections["lowrank_u"].t()
               + corrections["fullrank_x"] @ corrections["fullrank_w"].t())
    torch.testing.assert_close(expected, unfused, rtol=1e-5, atol=1e-5 * float(unfused.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu", "swiglu", "relu6", "silu"])
def test_activations_over_their_whole_range(path, activation):
    """The kernels' exp and erf against torch's from -100 to 100 (the saturated tails included):
    through an identity weight, y is the activation of the bias that sweeps the range. NaN and ±inf
    give non-finite outputs as torch's do (not always the same ones: torch's GELU(inf) is NaN)."""
    n = 16
    values = torch.linspace(-100, 100, 4001)
    weight = QuantizedWeight(torch.eye(n, dtype=torch.int8), "int8", torch.ones(n))
    if activation in reference.GATED_ACTIVATIONS:
        weight = QuantizedWeight(torch.cat([torch.eye(n // 2, n), torch.eye(n // 2, n)]).to(torch.int8), "int8",
                                 torch.ones(n))
    a = torch.zeros((1, n), dtype=torch.int8)
    for start in range(0, len(values), n):
        bias = values[start:start + n]
        bias = torch.nn.functional.pad(bias, (0, n - len(bias)))
        expected, actual = _both(lambda: ops.fused_linear(a, torch.ones(1), weight, bias=bias, activation=activation,
                                                          out_dtype=torch.float32), path)
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-6)
    bias = torch.tensor([float("nan"), float("inf"), -float("inf")] * 6)[:n]
    expected, actual = _both(lambda: ops.fused_linear(a, torch.ones(1), weight, bias=bias, activation=activation,
                                                      out_dtype=torch.float32), path)
    if activation == "relu6":  # bounded: ±inf clamp to 6 and 0, NaN stays NaN
        torch.testing.assert_close(actual, expected, equal_nan=True)
    else:
        assert not actual.isfinite().any() and not expected.isfinite().any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("m", [5, 197])  # split by columns, then by whole rows
def test_requantized_output(path, bits, activation, m):
    """Re-quantization is exact given y; the epilogue's ulps move a value across a rounding edge
    now and then (one code), or a row's absmax (its scale by an ulp)."""
    weight = random_weight("int8", 64, 64)
    a, a_scale = random_int8(m, 64)
    t, u = torch.randn(m, 16), torch.randn(64, 16) * 0.1
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, lowrank_t=t, lowrank_u=u,
                                                      activation=activation, requant_bits=bits), path)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=0)
    assert int((actual[0].int() - expected[0].int()).abs().max()) <= 1
    assert float((actual[0] != expected[0]).float().mean()) < 0.01
    # Without the fp32 terms whose order differs, the codes and scales are the reference's.
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, activation="relu", requant_bits=bits), path)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("path", PATHS)
def test_row_maps(path):
    """Window order with padding rows: GEMM row m reads A row gather[m], writes row scatter[m]."""
    weight = random_weight("int4", 32, 64)
    a, a_scale = random_int8(10, 64)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).int()
    padded = RowMap.build(torch.cat([order[:6], torch.tensor([-1, -1], dtype=torch.int32), order[6:]]), 10)
    residual = torch.randn(10, 32)
    call = lambda **kw: ops.fused_linear(a, a_scale, weight, gather_rows=padded, scatter_rows=padded,  # noqa: E731
                                         out_rows=10, residual=residual, **kw)
    expected, actual = _both(lambda: call(out_dtype=torch.float32), path)
    assert torch.equal(actual, expected)
    expected, actual = _both(lambda: call(requant_bits=8), path)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    # Dropped rows: some output rows nothing maps to are zero (and re-quantize as zero rows).
    dropping = RowMap.build(torch.tensor([3, -1, 0, 7, -1, 9, 1, 2, -1, 5], dtype=torch.int32), 10)
    for kwargs in (dict(out_dtype=torch.float32), dict(requant_bits=8)):
        expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, scatter_rows=dropping, out_rows=10,
                                                          **kwargs), path)
        for e, x in zip(expected if isinstance(expected, tuple) else (expected,),
                        actual if isinstance(actual, tuple) else (actual,)):
            assert torch.equal(x, e)
    # T·Uᵀ is read at the destination rows: a dropped row's (computed, never stored) reads nothing past T.
    t, u = torch.randn(10, 4), torch.randn(32, 4)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, scatter_rows=dropping, out_rows=10,
                                                      lowrank_t=t, lowrank_u=u, out_dtype=torch.float32), path)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # Padding rows under a per-tensor scale and zero point are the value zero: the bias alone.
    weight = random_weight("int8", 32, 64)
    weight = dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32))
    per_tensor = dict(a_zero_point=torch.tensor([7], dtype=torch.int8), bias=torch.randn(32), gather_rows=padded,
                      out_dtype=torch.float32)
    expected, actual = _both(lambda: ops.fused_linear(a, torch.tensor([0.05]), weight, **per_tensor), path)
    assert torch.equal(actual, expected) and torch.equal(actual[6], per_tensor["bias"])


@pytest.mark.parametrize("path", PATHS)
def test_results_do_not_depend_on_the_thread_count(path):
    """Work is split by rows and columns, never K: 1 and 2 threads give the same bits."""
    weight = random_weight("int8", 200, 96)
    a, a_scale = random_int8(300, 96)
    kwargs = dict(lowrank_t=torch.randn(300, 8), lowrank_u=torch.randn(200, 8), bias=torch.randn(200),
                  activation="gelu", residual=torch.randn(300, 200), out_dtype=torch.float32)
    with qk.use_backend("cpu"), cpu.using_isa(path):
        results = at_thread_counts(lambda: (ops.fused_linear(a, a_scale, weight, **kwargs),
                                            ops.fused_linear(a, a_scale, weight, activation="swiglu", requant_bits=8)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(x, y) for x, y in zip(results[0][1], results[1][1]))
    # W4A16 decode: columns split between threads (on AVX-512 pairs of weight rows, and an odd
    # range's last column alone), row blocks of 4 and a remainder.
    w4a16 = random_weight("uint4_asym_groups", 37, 256, group=64)
    for rows in (1, 2, 3, 5, 16):
        x = torch.randn(rows, 256)
        with qk.use_backend("cpu"), cpu.using_isa(path):
            one, two = at_thread_counts(lambda: ops.fused_linear(x, None, w4a16, out_dtype=torch.float32))
        assert torch.equal(one, two)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 5), (7, 64), (197, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_activation_is_exact(path, shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    x[0, 0] = 0.0
    if shape[0] > 2:
        x[1] = 0.0  # an all-zero row: the eps scale
        x[2, -1] = float("nan")
    for bits in (8, 4):
        static = dict(static_scale=torch.tensor([0.02]))
        for kwargs in ({}, static, dict(static, zero_point=torch.tensor([5], dtype=torch.int8)),
                       dict(static, zero_point=torch.tensor([-128], dtype=torch.int8))):
            if bits == 4 and "zero_point" in kwargs:
                kwargs = dict(kwargs, zero_point=torch.tensor([-3], dtype=torch.int8))
            expected, actual = _both(lambda: ops.quantize_activation(x, bits, **kwargs), path)
            for e, r in zip(expected, actual):  # a NaN row's scale is NaN
                torch.testing.assert_close(r, e, rtol=0, atol=0, equal_nan=True)
    inf = torch.tensor([[1.0, float("inf"), -2.0]])
    expected, actual = _both(lambda: ops.quantize_activation(inf), path)
    assert all(torch.equal(e, r) for e, r in zip(expected, actual))


@given(exponent=st.integers(-60, 60), mantissa=st.floats(1.0, 2.0, exclude_max=True), bits=st.sampled_from([8, 4]),
       zero=st.integers(-8, 7), seed=st.integers(0, 10_000))
@examples(40)
def test_quantize_activation_is_exact_at_half_integer_quotients(exponent, mantissa, bits, zero, seed):
    """The kernels round v·(1/s) and divide only near k + 1/2 (csrc/cpu quantize_values): values a
    few ulps either side of (k + 1/2)·s, and exactly on it, at scales from 2^-60 to 2^60, give the
    reference's codes (rint(v / s): round half to even of the fp32 quotient), static and dynamic."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([mantissa * 2.0 ** exponent], dtype=torch.float32)
    halves = torch.randint(-140, 140, (4, 64), generator=generator).float() + 0.5
    x = halves * scale
    for ulps in (1, 2, 3):  # nudged ulps at a time, up and down, in place of some of them
        x[:, ulps::8] = torch.nextafter(x[:, ulps::8], torch.full_like(x[:, ulps::8], float("inf")))
        x[:, 4 + ulps::8] = torch.nextafter(x[:, 4 + ulps::8], torch.full_like(x[:, 4 + ulps::8], -float("inf")))
    x[3] = torch.randn(64, generator=generator) * scale * 60
    for path in PATHS:
        for kwargs in (dict(static_scale=scale), dict(static_scale=scale, zero_point=torch.tensor([zero], dtype=torch.int8)),
                       {}):
            expected, actual = _both(lambda: ops.quantize_activation(x, bits, **kwargs), path)
            for e, r in zip(expected, actual):
                assert torch.equal(r, e)


@given(n=st.integers(1, 40), k=st.integers(1, 80), kind=st.sampled_from(sorted(WEIGHTS)), seed=st.integers(0, 10_000))
@examples(30)
def test_the_extension_packs_panels_as_pack_panels_specifies(n, k, kind, seed):
    """`_cpu.pack_panels` (what every plan and calibration-form call packs with) against the
    Python layout, byte for byte, at ragged N and K and weights at both ends of int8."""
    if kind in INTEGER_FORMATS and kind != "int8":
        k = 16 * (1 + k // 16)
    weight = WEIGHTS[kind](n, k)
    if kind == "int8":
        generator = torch.Generator().manual_seed(seed)
        data = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
        data[0, 0] = -128
        weight = dataclasses.replace(weight, data=data)
    assert torch.equal(cpu.weight_panels(weight), cpu.pack_panels(weight.integer().to(torch.int8)))


@given(m=st.integers(1, 70), n_half=st.integers(1, 40), k=st.integers(1, 200),
       kind=st.sampled_from(sorted(WEIGHTS)), rank=st.sampled_from([0, 5, 40]), fullrank=st.booleans(),
       zero=st.booleans(), activation=st.sampled_from(reference.ACTIVATIONS), use_residual=st.booleans(),
       requant=st.booleans(), path=st.sampled_from(PATHS or ["none"]), seed=st.integers(0, 10_000))
@examples(40)
def test_fused_linear_property(m, n_half, k, kind, rank, fullrank, zero, activation, use_residual, requant, path,
                               seed):
    n = 2 * n_half
    if kind != "int8" and not kind.startswith("int8_"):
        k = 16 * (1 + k // 16)
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    weight = WEIGHTS[kind](n, k)
    weight = dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32))
    a, a_scale = random_int8(m, k, seed=seed)
    n_out = n // 2 if activation in reference.GATED_ACTIVATIONS else n
    kwargs = dict(
        a_zero_point=torch.tensor([seed % 200 - 100], dtype=torch.int8) if zero else None,
        lowrank_t=rand(m, rank) if rank else None, lowrank_u=rand(n, rank) * 0.1 if rank else None,
        fullrank_x=rand(m, 8) if fullrank else None, fullrank_w=rand(n, 8) * 0.1 if fullrank else None,
        bias=rand(n), activation=activation, residual=rand(m, n_out) if use_residual else None,
        out_dtype=torch.float32, requant_bits=8 if requant else 0)
    expected, actual = _both(lambda: ops.fused_linear(a, a_scale, weight, **kwargs), path)
    if requant:
        # The fp32 terms' rounding (1e-5 of the largest pre-activation value, generously) moves a
        # row's absmax by at most that much times the activation's slope (<= 1.13): a row of
        # small outputs (a GELU tail) sees it relative to its own tiny scale.
        with qk.use_backend("reference"):
            before = ops.fused_linear(a, a_scale, weight, **dict(kwargs, activation="none", requant_bits=0,
                                                                      residual=None))
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1.2e-5 * float(before.abs().max()) / 127)
        assert int((actual[0].int() - expected[0].int()).abs().max()) <= 1
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("rank", [1, 8, 17])
def test_frozen_plan_packs_u_once_and_runs_as_the_unpacked_call(rank):
    """A frozen plan holds U in the epilogue's panels (up to the epilogue's rank; above it sgemm
    forms T·Uᵀ and there is nothing to pack): its calls equal the op's, which packs per call, bit
    for bit; a plan given another U packs its own."""
    from qla_kernels.ops.linear_plan import LinearPlan
    generator = torch.Generator().manual_seed(rank)
    weight = random_weight("int8", 40, 64)
    a, a_scale = random_int8(9, 64)
    u, t = torch.randn(40, rank, generator=generator), torch.randn(9, rank, generator=generator)
    plan = LinearPlan(weight, 8, lowrank_u=u).frozen()
    if rank > cpu.EPILOGUE_MAX_RANK:
        assert plan.lowrank_u_panels is None
    else:
        assert torch.equal(plan.lowrank_u_panels, cpu.lowrank_panels(u))
    with qk.use_backend("cpu"), torch.no_grad():
        expected = ops.fused_linear(a, a_scale, plan.weight, lowrank_t=t, lowrank_u=u, out_dtype=torch.float32)
        assert torch.equal(plan.fused(a, a_scale, None, lowrank_t=t, out_dtype=torch.float32), expected)
        other = dataclasses.replace(plan, lowrank_u=-u, lowrank_u_panels=cpu.lowrank_panels(-u))
        assert torch.equal(other.fused(a, a_scale, None, lowrank_t=t, out_dtype=torch.float32),
                           ops.fused_linear(a, a_scale, plan.weight, lowrank_t=t, lowrank_u=-u, out_dtype=torch.float32))
        stale = dataclasses.replace(plan, lowrank_u=u[:, :1].contiguous(), lowrank_u_panels=cpu.lowrank_panels(u))
        if rank > 1 and rank <= cpu.EPILOGUE_MAX_RANK:
            with pytest.raises(ValueError, match="lowrank_u_panels must have shape"):
                stale.check()


def test_bad_input_is_a_value_error():
    weight = random_weight("int8", 16, 32)
    a, a_scale = random_int8(4, 32)
    wrong = dataclasses.replace(weight, panels=cpu.pack_panels(torch.zeros(16, 36, dtype=torch.int8)))
    with qk.use_backend("cpu"):
        with pytest.raises(ValueError, match="weight_panels must have shape"):
            ops.fused_linear(a, a_scale, wrong)
        with pytest.raises(ValueError, match="a has 31 features"):
            ops.fused_linear(a[:, :31].contiguous(), a_scale, weight)
    with pytest.raises(ValueError, match="not a CPU path this machine runs"):
        with cpu.using_isa("avx1024"):
            pass


def test_path_is_chosen_by_the_environment_variable():
    """QLA_CPU_ISA forces a path in a new process; one this CPU lacks leaves the backend out, saying why."""
    script = ("import qla_kernels as qk; from qla_kernels.ops import cpu; "
              "print(qk.backends()['cpu'].available, cpu.isa() if qk.backends()['cpu'].available else '')")
    for path in PATHS:
        out = subprocess.run([sys.executable, "-c", script], env={**os.environ, cpu.ISA_VARIABLE: path},
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == ["True", path]
    script = "import qla_kernels as qk; print(qk.backends()['cpu'])"
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, cpu.ISA_VARIABLE: "avx1024"},
                         capture_output=True, text=True, check=True).stdout
    assert "unavailable" in out and "QLA_CPU_ISA='avx1024'" in out


def test_auto_runs_the_cpu_backend_on_cpu_tensors():
    with qk.use_backend("auto"):
        assert qk.ops.resolve_backend(torch.device("cpu")) == "cpu"
    with qk.use_backend("cpu"), pytest.raises(ValueError, match="needs CPU tensors"):
        qk.ops.resolve_backend(torch.device("cuda"))


def test_opcheck_cpu_ops():
    """Schemas, fakes and the refusal to differentiate of the two custom ops."""
    weight = cpu.with_panels(random_weight("int8", 32, 48))
    a, a_scale = random_int8(5, 48)
    operands = ops.fused_linear_operands(a, a_scale, weight, bias=torch.randn(32), activation="gelu",
                                         out_dtype=torch.float32)
    torch.library.opcheck(torch.ops.qla.fused_linear_cpu.default, tuple(operands))
    torch.library.opcheck(torch.ops.qla.quantize_activation_cpu.default,
                          (torch.randn(5, 48), 8, None, None, "none", None, None, 1e-5, None, False))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("group", [16, 32, 128])  # AVX-512 reads groups of a multiple of 32 in 16 lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w4a16_decode(path, m, group, dtype):
    """W4A16 at M <= 16 from the stored nibbles, each weight rounded to the activation dtype as the
    reference does: fp32 sums in another order (and for fp32 activations the group scale applied
    once per group), then one rounding to the output dtype, which may go the other way."""
    n, k = 72, 256 + 2 * group  # K not a multiple of the 64 k a column's loop takes at once
    weight = random_weight("uint4_asym_groups", n, k, group=group)
    x = torch.randn(m, k).to(dtype)
    kwargs = dict(lowrank_t=torch.randn(m, 8).to(dtype), lowrank_u=torch.randn(n, 8).to(dtype) * 0.1,
                  bias=torch.randn(n).to(dtype), activation="swiglu", residual=torch.randn(m, n // 2).to(dtype),
                  out_dtype=dtype)
    expected, actual = _both(lambda: ops.fused_linear(x, None, weight, **kwargs), path)
    assert actual.dtype == dtype and actual.shape == (m, n // 2)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance,
                               atol=tolerance * float(expected.abs().max()))
    expected, actual = _both(lambda: ops.fused_linear(x, None, weight, requant_bits=8), path)
    assert int((actual[0].int() - expected[0].int()).abs().max()) <= 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 3, 5])  # 5: four rows, then one that folds z into Σx
@pytest.mark.parametrize("group", [16, 128])
def test_w4a16_fp32_error_bound_with_offset_activations(path, m, group):
    """fp32 W4A16 sums q·x and takes z·Σx per group (the 256-bit form's single rows), sums (q − z)·x
    (its row blocks) or (q − z)·s·x (the lookup form): each within n·eps·Σ(q + z)·s·|x| of exact, n
    the terms of the longest chain (< K): the bound here, 2·K·eps·Σ_k (q + z)·s·|x|, against fp64.
    Activations far from zero (a common offset of 30, as after a shift) make Σq·x and z·Σx cancel."""
    n, k = 24, 512
    weight = random_weight("uint4_asym_groups", n, k, group=group, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)) + 30
    with qk.use_backend("cpu"), cpu.using_isa(path):
        actual = ops.fused_linear(x, None, weight, out_dtype=torch.float32)
    exact = x.double() @ weight.dequantize().double().t()
    codes = qk.formats.int4.unpack_int4(weight.data, signed=False).double()
    zero = weight.zero.double().repeat_interleave(group, dim=1)
    scale = weight.scale.double().repeat_interleave(group, dim=1)
    magnitude = x.double().abs() @ ((codes + zero) * scale).t()
    bound = 2 * k * torch.finfo(torch.float32).eps * magnitude
    assert bool(((actual.double() - exact).abs() <= bound).all())


@given(m=st.integers(1, 16), n=st.integers(1, 40), group=st.sampled_from([16, 32, 64, 128]), groups=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 10_000))
@examples(30)
def test_w4a16_decode_matches_the_reference_within_its_rounding(m, n, group, groups, dtype, seed):
    """The decode kernels on every path against the reference: both multiply the same weights
    ((q − z)·s, rounded to the activation dtype for fp16 / bf16) by the same x, in fp32 sums of
    another order, so each is within K·eps·Σ|x|·|w| of the exact sum (2·K·eps·Σ|x|·|w| apart)."""
    k = group * groups
    weight = random_weight("uint4_asym_groups", n, k, group=group, seed=seed)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)
    with qk.use_backend("reference"):
        expected = ops.fused_linear(x, None, weight, out_dtype=torch.float32)
    magnitude = x.double().abs() @ weight.dequantize().to(dtype).double().abs().t()
    bound = 2 * k * torch.finfo(torch.float32).eps * magnitude
    for path in PATHS:
        with qk.use_backend("cpu"), cpu.using_isa(path):
            actual = ops.fused_linear(x, None, weight, out_dtype=torch.float32)
        assert bool(((actual.double() - expected.double()).abs() <= bound).all()), path


def test_w4a16_beyond_decode_runs_on_the_reference():
    weight = random_weight("uint4_asym_groups", 32, 64, group=16)
    operands = ops.fused_linear_operands(torch.randn(17, 64), None, weight)
    assert qk.ops.dispatch.implementation_for("fused_linear", "cpu", operands).backend == "reference"
    operands = ops.fused_linear_operands(torch.randn(16, 64), None, weight)
    assert qk.ops.dispatch.implementation_for("fused_linear", "cpu", operands).backend == "cpu"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", [(1, 7), (197, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_pre_kernels(path, norm_kind, shape, dtype):
    """LayerNorm / RMSNorm then per-token codes: the norm's sums in 16 lanes, not torch's order
    (a few ulps of the normalized values), so a code on a rounding edge may move by one; the
    quantization of the normalized values is the reference's."""
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    weight = (torch.randn(shape[1]) * 0.5 + 1).to(dtype)
    bias = None if norm_kind == "rmsnorm" else torch.randn(shape[1]).to(dtype)
    norm = dict(norm_weight=weight, norm_bias=bias, norm_eps=1e-6)
    for kwargs in ({}, dict(static_scale=torch.tensor([0.03]), zero_point=torch.tensor([4], dtype=torch.int8))):
        expected, actual = _both(lambda: ops.normalize_quantize_activation(x, 8, norm_kind, **norm, **kwargs), path)
        tolerance = 4e-6 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(actual[0].float(), expected[0].float(), rtol=tolerance, atol=tolerance)
        assert int((actual[1].int() - expected[1].int()).abs().max()) <= 1
        assert float((actual[1] != expected[1]).float().mean()) < 0.01
        torch.testing.assert_close(actual[2], expected[2], rtol=1e-5, atol=0)
    expected, actual = _both(lambda: ops.normalize_activation(x, norm_kind, **norm), path)
    torch.testing.assert_close(actual[0].float(), expected[0].float(), rtol=tolerance, atol=tolerance)
    assert actual[1].shape == (shape[0], 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm_kind", ["none", "layernorm", "rmsnorm"])
@pytest.mark.parametrize("rank", [12, 24])  # in the kernel up to 16; wider by torch's sgemm
def test_pre_ops_with_a_down_projection(path, norm_kind, rank):
    """T = norm(x)·A (LoRA) or x·A (QwT's down_from_input) beside the codes, on the kernels. Up to
    rank 16 the kernel forms it, its sums in another order than the reference's sgemm: each within
    γ_K·Σ|row|·|A| of the exact product; from the normalized rows also within their ulps (times Σ|A|
    of a column). Wider, T is the reference's product of the rows the kernel read or normalized:
    exact from x."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(37, 96, generator=generator) * 2 + 0.3
    down = torch.randn(96, rank, generator=generator) * 0.1
    norm = {} if norm_kind == "none" else dict(norm_kind=norm_kind, norm_weight=torch.rand(96, generator=generator) + 0.5,
                                               norm_bias=None if norm_kind == "rmsnorm" else torch.randn(96))
    gamma = 96 * 2.0 ** -24 / (1 - 96 * 2.0 ** -24)
    ulps_of_norm = 8e-6 * float(x.abs().max()) * float(down.abs().sum(0).max())
    for from_input in (False, True):
        args = dict(norm, down_proj=down, down_from_input=from_input)
        with qk.use_backend("cpu"):
            assert ops.implementation("quantize_activation", x.device, x, 8, None, None, norm.get("norm_kind", "none"),
                                      None, None, 1e-5, down).backend == "cpu"
        from_x = norm_kind == "none" or from_input
        with qk.use_backend("reference"):
            rows = x if from_x else ops.normalize_activation(x, **norm)[0]
        in_kernel = rank <= cpu.EPILOGUE_MAX_RANK
        bound = (2 * gamma * (rows.abs() @ down.abs()) if in_kernel else 0.0) + (0.0 if from_x else ulps_of_norm)
        expected, actual = _both(lambda: ops.quantize_activation(x, 8, **args), path)
        assert bool(((actual[2] - expected[2]).abs() <= bound).all())
        assert int((actual[0].int() - expected[0].int()).abs().max()) <= (0 if norm_kind == "none" else 1)
        if norm_kind != "none":
            expected, actual = _both(lambda: ops.normalize_quantize_activation(x, 8, **args), path)
            assert bool(((actual[3] - expected[3]).abs() <= bound).all())
    if norm_kind != "none":  # T from the normalized rows, without codes
        with qk.use_backend("reference"):
            rows = ops.normalize_activation(x, **norm)[0]
        bound = (2 * gamma * (rows.abs() @ down.abs()) if rank <= cpu.EPILOGUE_MAX_RANK else 0.0) + ulps_of_norm
        expected, actual = _both(lambda: ops.normalize_activation(x, down_proj=down, **norm), path)
        assert bool(((actual[1] - expected[1]).abs() <= bound).all())
