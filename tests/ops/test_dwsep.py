"""QLA's DW-separable down path as one op: reference == the adapter module, Triton == reference,
the CPU kernel within a bound of an fp64 evaluation (as the reference is)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.nn.adapters import DWSepAdapter
from qla_kernels.ops import cpu

from ..conftest import examples
from .helpers import at_thread_counts

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
       dim=st.integers(1, 80), rank=st.integers(1, 40), biases=st.booleans(), one_dimensional=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 1000))
def test_triton_matches_reference(batch, height, width, prefix, dim, rank, biases, one_dimensional, dtype, seed):
    """On grids, and on sequences as 1 × W grids with a 1-D conv's 3 taps; a token mask runs on the
    reference (the kernel reads none yet)."""
    if one_dimensional:
        height = 1
    adapter = _adapter(dim, rank, (height, width), prefix, seed)
    h = torch.randn(batch, prefix + height * width, dim, device=DEVICE).to(dtype)
    args = list(_op_args(adapter, h))
    if one_dimensional:
        args[4] = args[4].reshape(dim, 9)[:, 3:6]
    if not biases:
        args[5] = args[7] = None
    with qk.use_backend("reference"):
        expected = ops.dwsep_down(*args).float()
    with qk.use_backend("triton"):
        assert ops.implementation("dwsep_down", h.device, *args, None).backend == "triton"
        masked = (*args, torch.ones(batch, height * width))
        assert ops.implementation("dwsep_down", h.device, *masked).backend == "reference"
        actual = ops.dwsep_down(*args).float()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * max(1.0, float(expected.abs().max())))


def test_custom_ops_pass_opcheck():
    adapter = _adapter(16, 4, (3, 3), 1)
    args = _op_args(adapter, torch.randn(2, 10, 16, device=DEVICE))
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    args = (*args[:4], args[4].reshape(16, 9).contiguous(), *args[5:], torch.ones(2, 9))
    torch.library.opcheck(torch.ops.qla.dwsep_down.default, args)
    if qk.backends()["triton"].available:
        torch.library.opcheck(torch.ops.qla.dwsep_down_triton.default, args)
    if qk.backends()["cpu"].available and DEVICE == "cpu":
        torch.library.opcheck(torch.ops.qla.dwsep_down_cpu.default, args)


@pytest.mark.parametrize("change, match", [
    (dict(height=4), "expected prefix_tokens"),
    (dict(h=torch.randn(10, 16)), "3-D"),
    (dict(dw_weight=torch.randn(16, 3, 3)), "dw_weight must have shape"),
    (dict(down_weight=torch.randn(4, 15)), "down_weight must have shape"),
    (dict(prefix_tokens=-1), "prefix_tokens must be a non-negative int"),
    (dict(dw_weight=torch.randn(16, 3)), "needs height 1"),
    (dict(token_mask=torch.ones(2, 10)), "token_mask must have shape"),
])
def test_bad_arguments_are_named(change, match):
    adapter = _adapter(16, 4, (3, 3), 1)
    names = ("h", "height", "width", "prefix_tokens", "dw_weight", "dw_bias", "down_weight", "down_bias", "token_mask")
    args = dict(zip(names, _op_args(adapter, torch.randn(2, 10, 16, device=DEVICE))))
    args.update({key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in change.items()})
    with pytest.raises(ValueError, match=match):
        ops.dwsep_down(**args)


def test_reference_is_the_sequence_adapter_down_path():
    """A 1-D adapter (text) on the op: its sequence as a 1 × L grid, the padding mask as the op's
    token mask, prefix tokens bypassing the conv; against the module's own conv1d path (autograd on)."""
    torch.manual_seed(3)
    adapter = DWSepAdapter(24, 8, None, prefix_tokens=1)
    torch.nn.init.normal_(adapter.depthwise.weight, std=0.3)
    h = torch.randn(3, 9, 24, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = mask[2, 3:] = 0
    for token_mask in (None, mask):
        expected = adapter.down_path(h, token_mask)[0]  # grad on: the torch path
        with torch.no_grad(), qk.use_backend("reference"):
            actual = adapter.down_path(h.detach(), token_mask)[0]
        torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)


_U = 2.0 ** -24  # fp32's unit roundoff


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def _fp64_down_path_and_bound(h, height, width, prefix, dw_weight, dw_bias, down_weight, down_bias, token_mask):
    """(T in fp64, the bound on an fp32 evaluation's error). The conv: at most 10 roundings per
    value (the masked input, 9 multiply-adds; bias) → γ_10·Σ|terms|; GELU passes that on at most
    1.13× and adds its erf's 1.5e-7 (Abramowitz & Stegun, halved by GELU) plus ~10 roundings of
    erfc/2 ≤ 1/2, both times |x| (4e-7·|x| in all) and one rounding of the result; the down
    product γ_{D+2}·Σ|terms| plus Σ|W|·the GELU error."""
    batch, tokens, dim = h.shape
    taps = torch.nn.functional.pad(dw_weight, (3, 3)) if dw_weight.shape[1] == 3 else dw_weight
    x = h.double()
    body = x[:, prefix:]
    if token_mask is not None:
        body = body * token_mask.double()[:, :, None]
    grid = body.transpose(1, 2).reshape(batch, dim, height, width)
    weight = taps.double().reshape(dim, 1, 3, 3)
    conv = torch.nn.functional.conv2d(grid, weight, None if dw_bias is None else dw_bias.double(), padding=1, groups=dim)
    magnitude = torch.nn.functional.conv2d(grid.abs(), weight.abs(), None if dw_bias is None else dw_bias.double().abs(),
                                           padding=1, groups=dim)
    conv = conv.reshape(batch, dim, height * width).transpose(1, 2)
    magnitude = magnitude.reshape(batch, dim, height * width).transpose(1, 2)
    before = torch.cat([x[:, :prefix], conv], dim=1)
    conv_error = torch.cat([torch.zeros_like(x[:, :prefix]), _gamma(10) * magnitude], dim=1)
    mixed = torch.nn.functional.gelu(before)
    gelu_error = 1.13 * conv_error + 4e-7 * before.abs() + _U * mixed.abs()
    w = down_weight.double()
    t = mixed @ w.t() + (0 if down_bias is None else down_bias.double())
    bound = (gelu_error @ w.abs().t() + _gamma(dim + 2) * (mixed.abs() @ w.abs().t()
                                                           + (0 if down_bias is None else down_bias.double().abs())))
    rank = down_weight.shape[0]
    return t.reshape(batch * tokens, rank), bound.reshape(batch * tokens, rank)


CPU_PATHS = cpu.supported_isas() if qk.backends()["cpu"].available else []


@pytest.mark.skipif(not CPU_PATHS, reason=str(qk.backends()["cpu"]))
@examples(30)
@given(batch=st.integers(0, 3), height=st.integers(1, 5), width=st.integers(1, 7), prefix=st.integers(0, 2),
       dim=st.integers(1, 70), rank=st.integers(1, 20), one_dimensional=st.booleans(), biases=st.booleans(),
       masked=st.booleans(), path=st.sampled_from(CPU_PATHS or ["none"]), seed=st.integers(0, 1000))
def test_cpu_kernel_within_its_bound(batch, height, width, prefix, dim, rank, one_dimensional, biases, masked, path,
                                     seed):
    """The CPU kernel (and the reference) within the fp32 bound of the fp64 down path, on grids and
    on 1-D sequences (3 taps, height 1), with and without biases and a padding mask."""
    generator = torch.Generator().manual_seed(seed)
    if one_dimensional:
        height = 1
    h = torch.randn(batch, prefix + height * width, dim, generator=generator) * 2
    dw = torch.randn(dim, 3 if one_dimensional else 9, generator=generator) * 0.5
    args = [h, height, width, prefix, dw, torch.randn(dim, generator=generator), torch.randn(rank, dim, generator=generator) * 0.2,
            torch.randn(rank, generator=generator),
            (torch.rand(batch, height * width, generator=generator) > 0.3).long() if masked else None]
    if not biases:
        args[5] = args[7] = None
    expected, bound = _fp64_down_path_and_bound(*args)
    with qk.use_backend("cpu"), cpu.using_isa(path):
        assert ops.implementation("dwsep_down", h.device, *args).backend == "cpu"
        actual = ops.dwsep_down(*args)
    with qk.use_backend("reference"):
        reference = ops.dwsep_down(*args)
    for result in (actual, reference):
        assert result.shape == (batch * h.shape[1], rank)
        assert bool(((result.double() - expected).abs() <= bound).all()), float(((result.double() - expected).abs() - bound).max())


@pytest.mark.skipif(not CPU_PATHS, reason=str(qk.backends()["cpu"]))
@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_kernel_is_the_same_at_any_thread_count(path):
    """Rows are independent: 1 and 2 threads give the same bits (MiniLM's attention adapter shape)."""
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(64, 18, 384, generator=generator)
    args = (h, 1, 18, 0, torch.randn(384, 3, generator=generator), torch.randn(384, generator=generator),
            torch.randn(8, 384, generator=generator), torch.randn(8, generator=generator),
            (torch.rand(64, 18, generator=generator) > 0.2).long())
    with qk.use_backend("cpu"), cpu.using_isa(path):
        one, two = at_thread_counts(lambda: ops.dwsep_down(*args))
    assert torch.equal(one, two)


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sequence_shapes_on_gpu(dtype):
    """BERT-base's attention adapter: 32 sequences of 128 tokens as 1 × 128 grids with a 1-D
    conv's taps (the launch the AOT table plans for it); a padding mask runs on the reference."""
    torch.manual_seed(0)
    adapter = DWSepAdapter(768, 8, None).to(DEVICE)
    torch.nn.init.normal_(adapter.depthwise.weight, std=0.3)
    h = torch.randn(32, 128, 768, device=DEVICE, dtype=dtype)
    args = (h, 1, 128, 0, adapter.depthwise.weight.to(dtype), adapter.depthwise.bias.to(dtype),
            adapter.down.weight.to(dtype), adapter.down.bias.to(dtype))
    with qk.use_backend("reference"):
        expected = ops.dwsep_down(*args).float()
    with qk.use_backend("triton"):
        assert ops.implementation("dwsep_down", h.device, *args, None).backend == "triton"
        actual = ops.dwsep_down(*args).float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
