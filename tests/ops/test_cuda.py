"""The `_C` CUDA module: built wherever nvcc is (CI included), bit-exact with the reference on a GPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels
import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops import cuda, dispatch, reference
from qla_kernels.quant import quantize_weight

from ..conftest import examples

NEEDS_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                                reason="no nvcc: the package is built without _C")


@NEEDS_NVCC
def test_extension_was_built_for_every_target_arch():
    from qla_kernels import _C

    info = json.loads((Path(qla_kernels.__file__).parent / "_build_info.json").read_text())
    assert info["cuda_extension"] and info["archs"] == ["80", "89", "90a"]
    assert _C.CUDA_ARCHS == "sm_80,sm_89,sm_90a" and _C.CUDA_PTX == "compute_90"
    for arch in ("sm_80", "sm_89", "sm_90a"):
        assert arch.encode() in Path(_C.__file__).read_bytes(), f"no {arch} cubin in {_C.__file__}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (197, 768), (64, 4097)])
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_per_token_quantization_is_bit_exact(dtype, shape, bits):
    x = (torch.randn(shape) * torch.rand(shape[0], 1) * 10).to(dtype)
    x[0, 0] = 0.5  # a rounding tie on some rows
    if shape[0] > 3:
        x[1] = 0
        x[2, -1] = float("nan")
        x[3, 0] = float("inf")
    q, scale = torch.ops.qla.quantize_per_token_cuda(x.cuda(), bits)
    q_ref, scale_ref, _ = reference.quantize_activation(x, bits, None, None, "none", None, None, 1e-5, None)
    torch.testing.assert_close(scale.cpu(), scale_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q.cpu(), q_ref)


@pytest.mark.gpu
def test_auto_backend_uses_the_cuda_kernel():
    x = torch.randn(16, 64, device="cuda", dtype=torch.float16)
    q, scale, _ = ops.quantize_activation(x, 8)
    with qla_kernels.use_backend("reference"):
        q_ref, scale_ref, _ = ops.quantize_activation(x, 8)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    torch.library.opcheck(torch.ops.qla.quantize_per_token_cuda.default, (x, 8))


# ---------------------------------------------------------------- W4A16 decode kernel


@NEEDS_NVCC
def test_decode_plan_uses_the_kernels_shared_memory_budget():
    from qla_kernels import _C

    assert cuda._DECODE_MAX_STAGED_VALUES == _C.DECODE_MAX_STAGED_VALUES


@examples(200)
@given(rows=st.integers(1, 16), out_features=st.integers(1, 40000), chunks=st.integers(1, 256),
       sm_count=st.integers(1, 200))
def test_decode_split_plan_covers_k_with_nonempty_splits(rows, out_features, chunks, sm_count):
    splits, per_split = cuda.decode_split_plan(rows, out_features, chunks * 128, sm_count)
    assert per_split >= 1 and (splits - 1) * per_split < chunks <= splits * per_split
    assert per_split * 128 * (8 if rows <= 8 else 16) <= cuda._DECODE_MAX_STAGED_VALUES
    column_blocks = -(-out_features // 64)
    if splits < chunks and per_split * 128 * (8 if rows <= 8 else 16) * 2 <= cuda._DECODE_MAX_STAGED_VALUES:
        # Splitting stopped short of one chunk per split only because the GPU was already full.
        assert column_blocks * splits >= cuda._DECODE_BLOCKS_PER_SM * sm_count // 2


def test_decode_split_plan_for_llama_decode_on_h100():
    """The plan at the benchmark's shapes (132 SMs): enough blocks to fill the GPU, 128..2048 of K each."""
    for n, k in ((4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)):
        for rows in (1, 16):
            splits, per_split = cuda.decode_split_plan(rows, n, k, 132)
            assert -(-n // 64) * splits >= 2 * 132, (n, k, rows, splits)


def _decode_case(m, n, k, group, dtype, rank, bias, residual, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = quantize_weight(torch.randn(n, k, generator=generator) * 0.02, qk.W4A16(group_size=group)).to("cuda")
    a = torch.randn(m, k, generator=generator).to("cuda", dtype)
    kwargs = dict(out_dtype=dtype)
    if rank:
        kwargs.update(lowrank_t=torch.randn(m, rank, generator=generator).to("cuda", dtype),
                      lowrank_u=(torch.randn(n, rank, generator=generator) * 0.05).to("cuda", dtype))
    if bias:
        kwargs["bias"] = torch.randn(n, generator=generator).to("cuda", dtype)
    if residual:
        kwargs["residual"] = torch.randn(m, n, generator=generator).to("cuda", dtype)
    return a, weight, kwargs


def _decode_operands(a, weight, activation="none", **kwargs) -> ops.FusedLinearOperands:
    """What ops.fused_linear(a, None, weight, **kwargs) hands its implementations."""
    return ops.FusedLinearOperands(
        a=a, a_scale=None, a_zero_point=None, weight=weight.data, weight_format=weight.format, weight_scale=weight.scale,
        weight_group_scale=None, weight_zero=weight.zero, group_size=weight.k_group, weight_colsum=None,
        lowrank_t=kwargs.get("lowrank_t"), lowrank_u=kwargs.get("lowrank_u"), fullrank_x=None, fullrank_w=None,
        bias=kwargs.get("bias"), activation=activation, residual=kwargs.get("residual"),
        out_dtype=kwargs["out_dtype"], requant_bits=0, gather_rows=None, scatter_rows=None, out_rows=a.shape[0])


def _runs_on(a, weight, kwargs) -> str:
    with qla_kernels.use_backend("cuda"):
        return dispatch.implementation("fused_linear", a.device, _decode_operands(a, weight, **kwargs)).backend


def _assert_decode_matches_reference(a, weight, kwargs):
    with qla_kernels.use_backend("reference"):
        expected = ops.fused_linear(a, None, weight, **kwargs).float()
    assert _runs_on(a, weight, kwargs) == "cuda"
    with qla_kernels.use_backend("cuda"):
        actual = ops.fused_linear(a, None, weight, **kwargs).float()
    # Weights equal the reference's up to fp16's rounding of the scale; the sum order differs.
    rtol = 1e-2 if a.dtype == torch.float16 else 2e-2
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n, k", [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_decode_kernel_at_llama_shapes(m, n, k, dtype):
    _assert_decode_matches_reference(*_decode_case(m, n, k, 128, dtype, rank=16, bias=False, residual=True))


@pytest.mark.gpu
@examples(60)
@given(m=st.integers(1, 16), n=st.integers(1, 300), chunks=st.integers(1, 40), group=st.sampled_from([32, 64, 128, 0]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), rank=st.sampled_from([0, 1, 16, 64]),
       bias=st.booleans(), residual=st.booleans(), seed=st.integers(0, 2**16))
def test_w4a16_decode_kernel_matches_reference(m, n, chunks, group, dtype, rank, bias, residual, seed):
    k = 128 * chunks
    group = group or k  # 0: per channel
    if k % group:
        group = 32
    _assert_decode_matches_reference(*_decode_case(m, n, k, group, dtype, rank, bias, residual, seed))


@pytest.mark.gpu
def test_w4a16_decode_op_and_dispatch_by_rows():
    a, weight, kwargs = _decode_case(16, 256, 512, 128, torch.float16, rank=16, bias=True, residual=True)
    torch.library.opcheck(torch.ops.qla.w4a16_decode_cuda.default,
                          (a, weight.data, weight.scale, weight.zero, 128, kwargs["lowrank_t"], kwargs["lowrank_u"],
                           kwargs["bias"], kwargs["residual"]))
    misaligned = torch.empty(16 * 512 + 1, device="cuda", dtype=torch.float16)[1:].view(16, 512).copy_(a)
    _assert_decode_matches_reference(misaligned, weight, kwargs)
    wide = torch.randn(17, 512, device="cuda", dtype=torch.float16)
    assert _runs_on(wide, weight, dict(out_dtype=torch.float16)) == "triton"  # M = 17



@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_w4a16_decode_swiglu_runs_gate_and_up_as_one_cuda_gemm(residual):
    """Packed gate/up at decode: the CUDA kernel computes both halves, silu(gate)·up follows."""
    a, weight, kwargs = _decode_case(4, 512, 1024, 128, torch.float16, rank=16, bias=True, residual=False)
    kwargs["activation"] = "swiglu"
    if residual:
        kwargs["residual"] = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    assert _runs_on(a, weight, kwargs) == "cuda"
    with qla_kernels.use_backend("reference"):
        expected = ops.fused_linear(a, None, weight, **kwargs).float()
    with qla_kernels.use_backend("cuda"):
        actual = ops.fused_linear(a, None, weight, **kwargs).float()
    assert actual.shape == (4, 256)
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))
