"""ops.hadamard_rotate: the cpu kernel (signs, a fast Walsh-Hadamard transform per power-of-two
chunk, the Paley factor across chunks) and the reference against an fp64 product with R."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops import cpu
from qla_kernels.quant.hadamard import kernel_factors, rotation_matrix

from ..conftest import examples
from .helpers import at_thread_counts

CPU_PATHS = cpu.supported_isas() if qk.backends()["cpu"].available else []
# Powers of two (one transform) and Paley orders × powers of two (12·8, 20·4, 12·32 as MiniLM, 28·2).
SIZES = (1, 2, 64, 256, 96, 80, 384, 56)


def _bound(x: torch.Tensor) -> torch.Tensor:
    """Per output: every |R_ij| is 1/√K, so an fp32 evaluation of Σ_i x_i·R_ij by any order of its
    log2 P transform levels, m chunk sums and the two scalings is within γ_n·‖x‖₁/√K, n = log2 P + m + 3
    rounding steps on each path (γ_n = n·u/(1 − n·u), u = 2⁻²⁴); plus the output dtype's rounding."""
    k = x.shape[-1]
    _, dense, chunk = kernel_factors(k)
    steps = int(math.log2(chunk)) + dense.shape[0] + 3
    unit = 2.0 ** -24
    gamma = steps * unit / (1 - steps * unit)
    l1 = x.double().abs().sum(-1, keepdim=True) / math.sqrt(k)
    return gamma * l1 + 1e-30


@pytest.mark.skipif(not CPU_PATHS, reason=str(qk.backends()["cpu"]))
@examples(40)
@given(k=st.sampled_from(SIZES), rows=st.integers(0, 9), dtype=st.sampled_from([torch.float32, torch.float16,
                                                                                  torch.bfloat16]),
       strided=st.booleans(), path=st.sampled_from(CPU_PATHS or ["none"]), seed=st.integers(0, 1000))
def test_kernel_and_reference_within_the_bound_of_the_fp64_product(k, rows, dtype, strided, path, seed):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(rows, 2 * k if strided else k, generator=generator) * 3
    x = (source[:, ::2] if strided else source).to(dtype)
    expected = x.double() @ rotation_matrix(k)
    bound = _bound(x)
    if dtype != torch.float32:  # the result is rounded to x's dtype: half an ulp of it more
        bound = bound + expected.abs() * {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    with qk.use_backend("cpu"), cpu.using_isa(path):
        assert ops.implementation("hadamard_rotate", x.device, x).backend == "cpu"
        actual = ops.hadamard_rotate(x)
    with qk.use_backend("reference"):
        reference = ops.hadamard_rotate(x)
    for result in (actual, reference):
        assert result.shape == x.shape and result.dtype == dtype
        excess = (result.double() - expected).abs() - bound
        assert bool((excess <= 0).all()), float(excess.max())


@pytest.mark.skipif(not CPU_PATHS, reason=str(qk.backends()["cpu"]))
@examples(15)
@given(k=st.sampled_from(SIZES), rows=st.integers(1, 5), seed=st.integers(0, 1000))
def test_every_instruction_set_path_gives_the_same_bits(k, rows, seed):
    """By construction (csrc/cpu/isa_common.h): one rounding for x·(±1/√K), then butterflies and
    ±1 sums in the same order whatever the lane width, so the paths agree bit for bit."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 3
    results = []
    for path in CPU_PATHS:
        with qk.use_backend("cpu"), cpu.using_isa(path):
            results.append(ops.hadamard_rotate(x))
    assert all(torch.equal(result, results[0]) for result in results[1:])


@pytest.mark.skipif(not CPU_PATHS, reason=str(qk.backends()["cpu"]))
@pytest.mark.parametrize("path", CPU_PATHS)
def test_kernel_is_the_same_at_any_thread_count_and_for_any_batch(path):
    """Rows are independent: 1 and 2 threads, and a row rotated alone, give the same bits."""
    x = torch.randn(64 * 21, 1536, generator=torch.Generator().manual_seed(2))
    with qk.use_backend("cpu"), cpu.using_isa(path):
        one, two = at_thread_counts(lambda: ops.hadamard_rotate(x))
        alone = ops.hadamard_rotate(x[5:6])
    assert torch.equal(one, two) and torch.equal(alone, one[5:6])


def test_the_reference_is_differentiable_and_the_kernel_refuses_backward():
    x = torch.randn(3, 96, requires_grad=True)
    with qk.use_backend("simulate"):
        ops.hadamard_rotate(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), rotation_matrix(96).sum(1).expand(3, 96), rtol=1e-5, atol=1e-6)
    if CPU_PATHS:
        with qk.use_backend("cpu"), pytest.raises(ValueError, match="has no gradient"):
            ops.hadamard_rotate(x).sum().backward()


@pytest.mark.parametrize("x, message", [(torch.zeros(3, 11), "has no Hadamard rotation"),
                                        (torch.zeros(3, 64, dtype=torch.int32), "must be a float tensor"),
                                        (torch.tensor(1.0), "feature dimension")])
def test_bad_input_is_a_value_error_on_every_backend(x, message):
    for backend in ["reference"] + (["cpu"] if CPU_PATHS else []):
        with qk.use_backend(backend), pytest.raises(ValueError, match=message):
            ops.hadamard_rotate(x)


def test_opcheck():
    if not CPU_PATHS:
        pytest.skip(str(qk.backends()["cpu"]))
    torch.library.opcheck(torch.ops.qla.hadamard_rotate_cpu, (torch.randn(5, 384),),
                          test_utils=("test_schema", "test_faketensor"))
