"""Rotation inside the quantization points (`rotate` of quantize_activation and
normalize_quantize_activation, `requant_rotate` of fused_linear): on the cpu kernels the row is
rotated in a row buffer as it is quantized, and the codes are exactly those of quantizing the
kernel's own `hadamard_rotate` of it (the same rotation code, then the same quantizer); the
reference composes its rotation with its quantizer the same way, and so does the Triton rotating
pre-kernel (its FLOAT_OUTPUT launch is hadamard_rotate), except that its norm statistics come from
a launch of another shape than normalize_activation's. Between backends, the rotations differ in
fp32 order (tests/ops/test_hadamard_rotate.py bounds them), so a code moves by at most one step
where a rotated value sits on a rounding edge."""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops.triton.kernel_launch import kernel_name, recording
from qla_kernels.ops import cpu
from qla_kernels.quant.hadamard import rotate

from ..conftest import examples
from .helpers import at_thread_counts, random_int8, random_weight

CPU_PATHS = cpu.supported_isas() if qk.backends()["cpu"].available else []
TRITON = qk.backends()["triton"].available
# Powers of two, and Paley orders × powers of two (P < 16 runs the cpu kernel's scalar Paley
# stage; on Triton 192, 320, 384, 1536 and 3072 run the rotating pre-kernel, the rest the reference).
SIZES = (2, 64, 96, 80, 384, 56, 1536, 192, 320, 3072)
BACKENDS = ["reference"] + (["cpu"] if CPU_PATHS else []) + (["triton"] if TRITON else [])
# The Triton kernels run compiled on a GPU, in the interpreter on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _rotating_launches(launches):
    return [launch for launch in launches if kernel_name(launch.kernel) == "rotate_quantize_kernel"]


@contextlib.contextmanager
def _on(backend: str, path: str = "none"):
    """The backend (and cpu path) selected; yields the Triton launches made inside."""
    with qk.use_backend(backend), cpu.using_isa(path) if backend == "cpu" else contextlib.nullcontext(), \
            (recording() if backend == "triton" else contextlib.nullcontext([])) as launches:
        yield launches


def _inputs(rows: int, k: int, seed: int, outliers: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator)
    if outliers:  # the channels rotation is for
        x[:, torch.randperm(k, generator=generator)[: max(1, k // 32)]] *= 40
    return x


def _quantize_cases(draw_static: bool, bits: int, zero: bool):
    if not draw_static:
        return {}
    arguments = {"static_scale": torch.tensor([0.05])}
    if zero:
        arguments["zero_point"] = torch.tensor([3 if bits > 3 else 1], dtype=torch.int8)
    return arguments


@examples(40)
@given(k=st.sampled_from(SIZES), rows=st.integers(0, 9), bits=st.sampled_from([8, 4, 3]), static=st.booleans(),
       zero=st.booleans(), norm=st.sampled_from(["none", "layernorm", "rmsnorm"]), rank=st.sampled_from([0, 4, 20]),
       from_input=st.booleans(), outliers=st.booleans(), path=st.sampled_from(CPU_PATHS or ["none"]),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 1000))
def test_codes_are_those_of_the_rotated_rows(k, rows, bits, static, zero, norm, rank, from_input, outliers, path,
                                             backend, seed):
    """quantize_activation(x, rotate=True) == quantize_activation(hadamard_rotate(norm(x))) bit for
    bit on each backend, T from the unrotated rows; normalize_quantize_activation's normalized
    output is unrotated."""
    x = _inputs(rows, k, seed, outliers)
    arguments = _quantize_cases(static, bits, zero)
    generator = torch.Generator().manual_seed(seed + 1)
    if norm != "none":
        arguments.update(norm_kind=norm, norm_weight=torch.rand(k, generator=generator) + 0.5)
        if norm == "layernorm":
            arguments["norm_bias"] = torch.randn(k, generator=generator) * 0.1
    down = torch.randn(k, rank, generator=generator) if rank else None
    device = _device(backend)
    x, down = x.to(device), None if down is None else down.to(device)
    arguments = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in arguments.items()}
    with _on(backend, path) as launches:
        q, scale, t = ops.quantize_activation(x, bits, down_proj=down, down_from_input=from_input, rotate=True,
                                              **arguments)
        on_reference_instead = backend == "triton" and k not in (192, 320, 384, 1536, 3072)
        assert bool(_rotating_launches(launches)) == (backend == "triton" and rows > 0 and not on_reference_instead)
        _, _, t_unrotated = ops.quantize_activation(x, bits, down_proj=down, down_from_input=from_input,
                                                    **arguments)
        normed = x
        if norm != "none":
            normed, q_fused, scale_fused, _ = ops.normalize_quantize_activation(
                x, bits, arguments["norm_kind"], arguments["norm_weight"], arguments.get("norm_bias"),
                static_scale=arguments.get("static_scale"), zero_point=arguments.get("zero_point"), rotate=True)
            assert torch.equal(q_fused, q) and torch.equal(scale_fused, scale)
            plain = ops.normalize_activation(x, norm, arguments["norm_weight"], arguments.get("norm_bias"))[0]
            if on_reference_instead:  # normalized by the reference, the plain op by the Triton kernel
                torch.testing.assert_close(normed, plain, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(normed, plain)
        quantizer = {key: value for key, value in arguments.items() if not key.startswith("norm")}
        q_expected, scale_expected, _ = ops.quantize_activation(ops.hadamard_rotate(normed), bits, **quantizer)
    if backend == "triton" and norm != "none":  # statistics of another launch shape: within a step
        torch.testing.assert_close(scale, scale_expected, rtol=1e-5, atol=0)
        assert q.numel() == 0 or int((q.int() - q_expected.int()).abs().max()) <= 1
    else:
        assert torch.equal(q, q_expected) and torch.equal(scale, scale_expected)
    if on_reference_instead:
        torch.testing.assert_close(t, t_unrotated, rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(t, t_unrotated)


@pytest.mark.skipif(not CPU_PATHS, reason=str(qk.backends()["cpu"]))
@examples(25)
@given(k=st.sampled_from(SIZES), rows=st.integers(1, 9), bits=st.sampled_from([8, 4]), outliers=st.booleans(),
       path=st.sampled_from(CPU_PATHS or ["none"]), seed=st.integers(0, 1000))
def test_kernel_codes_within_one_step_of_the_reference(k, rows, bits, outliers, path, seed):
    """The two rotations differ by fp32 order only: scales within a few ulps, codes within a step,
    and the dequantized rows as close to the exact x·R as the quantizer allows."""
    x = _inputs(rows, k, seed, outliers)
    with qk.use_backend("cpu"), cpu.using_isa(path):
        q, scale, _ = ops.quantize_activation(x, bits, rotate=True)
    with qk.use_backend("reference"):
        q_reference, scale_reference, _ = ops.quantize_activation(x, bits, rotate=True)
    torch.testing.assert_close(scale, scale_reference, rtol=1e-5, atol=0)
    assert int((q.int() - q_reference.int()).abs().max()) <= 1
    exact = x.double() @ qk.quant.hadamard.rotation_matrix(k)
    error = (q.double() * scale.double()[:, None] - exact).abs()
    assert bool((error <= scale.double()[:, None] * 0.5 * (1 + 1e-4)).all())


@pytest.mark.skipif(not TRITON, reason=str(qk.backends()["triton"]))
@examples(20)
@given(k=st.sampled_from([192, 320, 384, 1536, 3072, 4096]), rows=st.integers(1, 6), bits=st.sampled_from([8, 4]),
       static=st.booleans(), zero=st.booleans(), norm=st.sampled_from(["none", "layernorm", "rmsnorm"]),
       rank=st.sampled_from([0, 8]), outliers=st.booleans(), seed=st.integers(0, 1000))
def test_triton_codes_within_one_step_of_the_reference(k, rows, bits, static, zero, norm, rank, outliers, seed):
    """The rotating pre-kernel's rotation (tensor-core dots of ±1 factors) differs from the
    reference's tensordots in fp32 order only: scales within a few ulps, codes within a step, T and
    the normalized rows as the unrotated pre-kernel forms them."""
    x = _inputs(rows, k, seed, outliers).to(TRITON_DEVICE)
    arguments = {key: value.to(TRITON_DEVICE) for key, value in _quantize_cases(static, bits, zero).items()}
    generator = torch.Generator().manual_seed(seed + 1)
    norm_arguments = {}
    if norm != "none":
        norm_arguments = dict(norm_kind=norm, norm_weight=(torch.rand(k, generator=generator) + 0.5).to(TRITON_DEVICE))
    down = torch.randn(k, rank, generator=generator).to(TRITON_DEVICE) if rank else None
    results = {}
    for backend in ("triton", "reference"):
        with _on(backend) as launches:
            results[backend] = ops.quantize_activation(x, bits, down_proj=down, rotate=True, **arguments,
                                                       **norm_arguments)
            if norm != "none":
                results[backend] += ops.normalize_quantize_activation(x, bits, rotate=True, **arguments,
                                                                      **norm_arguments)[:1]
        assert bool(_rotating_launches(launches)) == (backend == "triton")
    (q, scale, t, *normed), (q_reference, scale_reference, t_reference, *normed_reference) = results.values()
    torch.testing.assert_close(scale, scale_reference, rtol=1e-5, atol=0)
    assert int((q.int() - q_reference.int()).abs().max()) <= 1
    torch.testing.assert_close(t, t_reference, rtol=1e-4, atol=1e-4 * float(x.abs().max()) * k ** 0.5)
    for value, expected in zip(normed, normed_reference):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_row_quantizes_to_zero_codes(backend):
    """A NaN spreads over its rotated row (scale NaN); one infinity makes every rotated value
    infinite (scale inf; on Triton NaN, the ∞ − ∞ of `_signed_dot`'s split, which the GEMM's
    0 · scale turns into the same NaN row); both rows' codes are 0, the finite row unaffected."""
    x = _inputs(3, 384, 0, False)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    with _on("reference"):
        q_reference, scale_reference, _ = ops.quantize_activation(x, 4, rotate=True)
    with _on(backend, CPU_PATHS[0] if backend == "cpu" else "none"):
        q, scale, _ = ops.quantize_activation(x.to(_device(backend)), 4, rotate=True)
    q, scale = q.cpu(), scale.cpu()
    assert not q_reference[1:].any() and not q[1:].any()
    assert int((q[0].int() - q_reference[0].int()).abs().max()) <= (1 if backend == "triton" else 0)
    assert bool(scale[1].isnan()) and bool(scale_reference[1].isnan()) and float(scale_reference[2]) == float("inf")
    assert bool(scale[2].isnan()) if backend == "triton" else float(scale[2]) == float("inf")


@pytest.mark.skipif(not TRITON, reason=str(qk.backends()["triton"]))
def test_triton_rotates_each_width_it_holds_and_leaves_the_rest_to_the_reference():
    """hadamard_rotate on Triton: the kernel where `rotation_of` gives a tile (within fp32 order of
    the reference), the reference's own products elsewhere (bit for bit)."""
    from qla_kernels.ops.triton.launch import rotation_of

    for k in (128, 192, 256, 768, 1536, 2048, 4096, 5120, 14336):
        x = _inputs(3, k, k, True).to(TRITON_DEVICE)
        with _on("triton") as launches:
            rotated = ops.hadamard_rotate(x)
        expected = rotate(x)
        if rotation_of(k) is None:
            assert not launches and torch.equal(rotated, expected), k
        else:
            assert len(_rotating_launches(launches)) == 1, k
            torch.testing.assert_close(rotated, expected, rtol=0, atol=1e-5 * float(x.abs().max()))
    assert rotation_of(128) is None and rotation_of(14336) is None and rotation_of(16384) is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation, n", [("gelu", 96), ("gelu", 192), ("swiglu", 2 * 384), ("relu", 64)])
@pytest.mark.parametrize("m", [5, 197])  # split by columns, then by whole rows
def test_requant_rotate_quantizes_the_rotated_output(backend, activation, n, m):
    """fused_linear(..., requant_bits, requant_rotate=True) == quantizing the rotated fp32 output
    of the same GEMM (the epilogue's values, then the rotation, then the quantizer)."""
    device = _device(backend)
    weight = random_weight("int8", n, 64).to(device)
    a, a_scale = (tensor.to(device) for tensor in random_int8(m, 64))
    t, u = torch.randn(m, 16, device=device), torch.randn(n, 16, device=device) * 0.1
    segments = dict(lowrank_t=t, lowrank_u=u, activation=activation)
    with qk.use_backend(backend):
        q, scale = ops.fused_linear(a, a_scale, weight, requant_bits=4, requant_rotate=True, **segments)
        y = ops.fused_linear(a, a_scale, weight, out_dtype=torch.float32, **segments)
        q_expected, scale_expected, _ = ops.quantize_activation(ops.hadamard_rotate(y), 4)
    assert torch.equal(q, q_expected) and torch.equal(scale, scale_expected)
    if backend == "reference":
        assert torch.equal(q_expected, ops.quantize_activation(rotate(y), 4)[0])


@pytest.mark.skipif(not CPU_PATHS, reason=str(qk.backends()["cpu"]))
@pytest.mark.parametrize("path", CPU_PATHS)
def test_the_same_bits_at_any_thread_count(path):
    x = _inputs(64 * 21, 1536, 3, True)
    weight = random_weight("int8", 384, 64)
    a, a_scale = random_int8(300, 64)
    with qk.use_backend("cpu"), cpu.using_isa(path):
        one, two = at_thread_counts(lambda: ops.quantize_activation(x, 4, rotate=True)[:2])
        gemm_one, gemm_two = at_thread_counts(
            lambda: ops.fused_linear(a, a_scale, weight, activation="gelu", requant_bits=4, requant_rotate=True))
    assert all(torch.equal(p, r) for p, r in zip(one + gemm_one, two + gemm_two))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rotation_arguments_are_value_errors(backend):
    device = _device(backend)
    x = torch.randn(3, 100, device=device)
    weight = random_weight("int8", 100, 64).to(device)
    a, a_scale = (tensor.to(device) for tensor in random_int8(3, 64))
    with qk.use_backend(backend):
        with pytest.raises(ValueError, match="x.shape\\[1\\]=100 has no Hadamard rotation"):
            ops.quantize_activation(x, 8, rotate=True)
        with pytest.raises(ValueError, match="has no Hadamard rotation"):
            ops.normalize_quantize_activation(x, 8, "rmsnorm", rotate=True)
        with pytest.raises(ValueError, match="rotate must be a bool"):
            ops.quantize_activation(torch.randn(3, 64, device=device), 8, rotate="hadamard")
        with pytest.raises(ValueError, match="the output's width=100 has no Hadamard rotation"):
            ops.fused_linear(a, a_scale, weight, requant_bits=8, requant_rotate=True)
        with pytest.raises(ValueError, match="requant_rotate .* needs requant_bits"):
            ops.fused_linear(a, a_scale, random_weight("int8", 64, 64).to(device), requant_rotate=True)


def test_opcheck():
    if not CPU_PATHS:
        pytest.skip(str(qk.backends()["cpu"]))
    x = torch.randn(5, 384)
    torch.library.opcheck(torch.ops.qla.quantize_activation_cpu, (x, 4, None, None, "none", None, None, 1e-5, None,
                                                                  False, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.qla.normalize_quantize_activation_cpu,
                          (x, 4, None, None, "layernorm", None, None, 1e-5, None, False, True),
                          test_utils=("test_schema", "test_faketensor"))
