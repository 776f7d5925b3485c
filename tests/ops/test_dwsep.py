"""QLA's DW-separable down path as one op: reference == the adapter module, Triton == reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.nn.adapters import DWSepAdapter

from ..conftest import examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _adapter(dim, rank, grid, prefix, seed=0):
    torch.manual_seed(seed)
    adapter = DWSepAdapter(dim, rank, grid, prefix_tokens=prefix)
    torch.nn.init.normal_(adapter.depthwise.weight, std=0.3)
    return adapter.to(DEVICE)


def _op_args(adapter, h):
    height, width = adapter.grid
    return (h, height, width, adapter.prefix_tokens, adapter.depthwise.weight.to(h.dtype),
            adapter.depthwise.bias.to(h.dtype), adapter.down.weight.to(h.dtype), adapter.down.bias.to(h.dtype))


@pytest.mark.parametrize("grid, prefix", [((4, 4), 1), ((3, 5), 2), ((2, 7), 0)])
def test_reference_is_the_adapter_down_path(grid, prefix):
    adapter = _adapter(24, 8, grid, prefix)
    h = torch.randn(3, prefix + grid[0] * grid[1], 24, device=DEVICE)
    expected = adapter.down_path(h)[0].reshape(-1, 8)
    with qk.use_backend("reference"):
        actual = ops.dwsep_down(*_op_args(adapter, h))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not qk.backends()["triton"].available, reason=str(qk.backends()["triton"]))
@examples(20)
@given(batch=st.integers(1, 3), height=st.integers(1, 6), width=st.integers(1, 6), prefix=st.integers(0, 3),
       dim=st.integers(1, 80), rank=st.integers(1, 40), biases=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 1000))
def test_triton_matches_reference(batch, height, width, prefix, dim, rank, biases, dtype, seed):
    adapter = _adapter(dim, rank, (height, width), prefix, seed)
    h = torch.randn(batch, prefix + height * width, dim, device=DEVICE).to(dtype)
    args = list(_op_args(adapter, h))
    if not biases:
        args[5] = args[7] = None
    with qk.use_backend("reference"):
        expected = ops.dwsep_down(*args).float()
    with qk.use_backend("triton"):
        actual = ops.dwsep_down(*args).float()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * max(1.0, float(expected.abs().max())))


def test_custom_ops_pass_opcheck():
    adapter = _adapter(16, 4, (3, 3), 1)
    args = _op_args(adapter, torch.randn(2, 10, 16, device=DEVICE))
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    args = (*args[:4], args[4].reshape(16, 9).contiguous(), *args[5:])
    torch.library.opcheck(torch.ops.qla.dwsep_down.default, args)
    if qk.backends()["triton"].available:
        torch.library.opcheck(torch.ops.qla.dwsep_down_triton.default, args)


@pytest.mark.parametrize("change, match", [
    (dict(height=4), "expected prefix_tokens"),
    (dict(h=torch.randn(10, 16)), "3-D"),
    (dict(dw_weight=torch.randn(16, 3, 3)), "dw_weight must have shape"),
    (dict(down_weight=torch.randn(4, 15)), "down_weight must have shape"),
    (dict(prefix_tokens=-1), "prefix_tokens must be a non-negative int"),
])
def test_bad_arguments_are_named(change, match):
    adapter = _adapter(16, 4, (3, 3), 1)
    names = ("h", "height", "width", "prefix_tokens", "dw_weight", "dw_bias", "down_weight", "down_bias")
    args = dict(zip(names, _op_args(adapter, torch.randn(2, 10, 16, device=DEVICE))))
    args.update({key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in change.items()})
    with pytest.raises(ValueError, match=match):
        ops.dwsep_down(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim, prefix, rank", [(768, 1, 8), (384, 2, 16), (192, 1, 64)])
def test_vit_shapes_on_gpu(dtype, dim, prefix, rank):
    adapter = _adapter(dim, rank, (14, 14), prefix)
    h = torch.randn(64, prefix + 196, dim, device=DEVICE, dtype=dtype)
    with qk.use_backend("reference"):
        expected = ops.dwsep_down(*_op_args(adapter, h)).float()
    with qk.use_backend("triton"):
        actual = ops.dwsep_down(*_op_args(adapter, h)).float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
