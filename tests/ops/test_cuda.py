"""The `_C` CUDA module: built wherever nvcc is (CI included), bit-exact with the reference on a GPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import qla_kernels
from qla_kernels import ops
from qla_kernels.ops import reference


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc: the package is built without _C")
def test_extension_was_built_for_every_target_arch():
    from qla_kernels import _C

    info = json.loads((Path(qla_kernels.__file__).parent / "_build_info.json").read_text())
    assert info["cuda_extension"] and info["archs"] == ["80", "89", "90a"]
    assert _C.CUDA_ARCHS == "sm_80,sm_89,sm_90a"
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
