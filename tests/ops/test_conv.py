"""The integer convolution (ops/conv.py) against an int64 convolution of its codes, and every
backend against the reference.

Exactness by construction: with power-of-two activation and weight scales, no bias and the
activation "none", every value the kernels produce is an integer accumulator times 2^-e, exact
in fp32 while |acc| < 2^24, so backends must agree with the int64 convolution bit for bit. With
arbitrary scales and an epilogue the fp32 parts may be contracted differently (FMA), so those
comparisons allow a few ulps of the output's magnitude.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.formats.int4 import pack_int4
from qla_kernels.formats.weights import QuantizedWeight
from qla_kernels.ops.conv import ConvGeometry, conv_weight_matrix, conv_weight_tensor, gather_windows
from qla_kernels.quant.primitives import absmax_scale, quantize_with_scale

from ..conftest import examples

BACKENDS = [name for name in ("cpu", "triton") if qk.backends()[name].available]
S_X, S_W = 2.0 ** -4, 2.0 ** -6


def _weight(out_channels, in_features, bits, generator, packed=False, zero_point=None):
    limit = 2 ** (bits - 1)
    codes = torch.randint(-limit, limit, (out_channels, in_features), generator=generator, dtype=torch.int8)
    data = pack_int4(codes, signed=True) if packed else codes
    colsum = codes.to(torch.int32).sum(dim=1, dtype=torch.int32) if zero_point is not None else None
    return codes, QuantizedWeight(data, "int4" if packed else "int8", torch.full((out_channels,), S_W), colsum=colsum)


def _int_conv(codes_nhwc, weight_codes, geometry):
    """The int64 convolution of integer codes (zero padding), NHWC out."""
    x = codes_nhwc.double().permute(0, 3, 1, 2)
    w = conv_weight_tensor(weight_codes.double(), geometry)
    y = F.conv2d(x, w, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
    return y.permute(0, 2, 3, 1)


geometries = st.builds(
    lambda k, s, p, d, g: (ConvGeometry((k, max(1, k - 2 * (k > 3))), s, p, d, 1), g),
    st.sampled_from([1, 3, 5, 7]), st.sampled_from([1, 2]), st.integers(0, 3), st.sampled_from([1, 2]),
    st.sampled_from(["one", "two", "depthwise"]))


def _with_groups(geometry, kind, channels):
    groups = {"one": 1, "two": 2, "depthwise": channels}[kind]
    return ConvGeometry(geometry.kernel, geometry.stride, geometry.padding, geometry.dilation, groups)


@examples(20)
@given(geometries, st.integers(1, 2), st.integers(5, 11), st.integers(5, 9), st.sampled_from([2, 4, 6]),
       st.sampled_from([4, 8]), st.sampled_from([None, 3, -2]), st.sampled_from([4, 8]), st.integers(0, 2 ** 16))
def test_static_convolution_is_the_int64_convolution_of_its_codes(geometry_kind, batch, height, width, channels,
                                                                  out_per_group, zero, bits, seed):
    """Static per-tensor scale (and zero point): out = (int64 conv of q − z, zero padded)·s_x·s_w
    exactly, at ragged sizes, stride 2, padding, dilation, groups and depthwise, on the
    reference and every backend built here."""
    geometry = _with_groups(*geometry_kind, channels)
    out_h, out_w = geometry.output_size(height, width)
    if out_h < 1 or out_w < 1:
        return
    generator = torch.Generator().manual_seed(seed)
    out_channels = out_per_group * geometry.groups
    in_features = geometry.taps * channels // geometry.groups
    weight_codes, weight = _weight(out_channels, in_features, bits, generator, zero_point=zero)
    x = torch.randn(batch, height, width, channels, generator=generator) * 0.5
    zero_point = None if zero is None else torch.tensor([zero], dtype=torch.int8)
    scale = torch.tensor([S_X])
    codes = quantize_with_scale(x, scale, bits, zero_point)
    expected = _int_conv(codes.double() - (zero or 0), weight_codes, geometry) * (S_X * S_W)
    for backend in ["reference", *BACKENDS]:
        with qk.use_backend(backend):
            y = ops.quantized_conv2d(x, weight, geometry, bits, static_scale=scale, zero_point=zero_point)
        assert y.dtype == torch.float32 and y.shape == (batch, out_h, out_w, out_channels)
        assert torch.equal(y.double(), expected), backend


@examples(15)
@given(geometries, st.integers(5, 9), st.sampled_from([2, 4]), st.booleans(), st.integers(0, 2 ** 16))
def test_dynamic_scales_are_per_output_window(geometry_kind, size, channels, packed, seed):
    """Dynamic activations: one scale per output pixel, max(absmax of its window, eps)/qmax, and
    the window's codes against it: out = acc·s_window·s_w, the reference's order, bit for bit;
    packed int4 weights (even K) the same as their int8 codes."""
    geometry = _with_groups(*geometry_kind, channels)
    if min(geometry.output_size(size, size + 1)) < 1:
        return
    in_features = geometry.taps * channels // geometry.groups
    packed = packed and in_features % 2 == 0
    generator = torch.Generator().manual_seed(seed)
    out_channels = 2 * geometry.groups
    weight_codes, weight = _weight(out_channels, in_features, 4, generator, packed=packed)
    x = torch.randn(2, size, size + 1, channels, generator=generator)
    windows = gather_windows(x, geometry).float()  # [M, taps, C]
    scale = absmax_scale(windows.abs().amax(dim=(1, 2)), 8)
    codes = quantize_with_scale(windows.reshape(len(windows), -1), scale, 8).reshape(windows.shape)
    groups, step_in, step_out = geometry.groups, channels // geometry.groups, out_channels // geometry.groups
    acc = torch.cat([codes[:, :, g * step_in:(g + 1) * step_in].reshape(len(codes), -1).double()
                     @ weight_codes[g * step_out:(g + 1) * step_out].double().t() for g in range(groups)], dim=1)
    expected = acc.float() * scale[:, None] * weight.scale[None]
    for backend in ["reference", *BACKENDS]:
        with qk.use_backend(backend):
            y = ops.quantized_conv2d(x, weight, geometry, 8)
        assert torch.equal(y.reshape(-1, out_channels), expected), backend


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("groups", [1, 3])
def test_epilogue_on_every_backend(activation, groups):
    """Bias, activation and a channels-last residual in the epilogue: every backend within a few
    fp32 ulps of the output (contraction of the scale, bias and residual may differ)."""
    generator = torch.Generator().manual_seed(1)
    geometry = ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1), groups)
    x = torch.randn(2, 9, 7, 6, generator=generator)
    _, weight = _weight(12, 9 * 6 // groups, 8, generator)
    weight = QuantizedWeight(weight.data, "int8", torch.rand(12, generator=generator) * 0.01 + 1e-3)
    bias = torch.randn(12, generator=generator)
    residual = torch.randn(2, 5, 4, 12, generator=generator)
    with qk.use_backend("reference"):
        expected = ops.quantized_conv2d(x, weight, geometry, 8, bias=bias, activation=activation, residual=residual)
    with qk.use_backend("simulate"):
        simulated = ops.quantized_conv2d(x, weight, geometry, 8, bias=bias, activation=activation, residual=residual)
    tolerance = 1e-5 * float(expected.abs().max())
    assert float((simulated - expected).abs().max()) <= tolerance
    for backend in BACKENDS:
        with qk.use_backend(backend):
            y = ops.quantized_conv2d(x, weight, geometry, 8, bias=bias, activation=activation, residual=residual)
        assert float((y - expected).abs().max()) <= tolerance, backend


def test_simulate_is_the_integer_path_in_floating_point():
    """The fake-quantized twin uses the same window scales and codes; only the summation order
    differs: within (K + 2)·2^-24·Σ|terms| per output, and differentiable."""
    generator = torch.Generator().manual_seed(2)
    geometry = ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2), 1)
    x = torch.randn(2, 8, 8, 5, generator=generator, requires_grad=True)
    codes, weight = _weight(7, 45, 8, generator)
    weight = QuantizedWeight(weight.data, "int8", torch.rand(7, generator=generator) * 0.01 + 1e-3)
    with qk.use_backend("reference"), torch.no_grad():
        expected = ops.quantized_conv2d(x.detach(), weight, geometry, 8)
    with qk.use_backend("simulate"):
        simulated = ops.quantized_conv2d(x, weight, geometry, 8)
    simulated.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    windows = gather_windows(x.detach(), geometry).reshape(-1, 45)
    magnitude = (windows.abs() @ weight.dequantize().abs().t()).reshape(expected.shape)
    assert bool(((simulated.detach() - expected).abs() <= 47 * 2.0 ** -24 * magnitude + 1e-30).all())


def test_conv_weight_layout_round_trips():
    weight = torch.randn(6, 2, 3, 5)
    geometry = ConvGeometry((3, 5), groups=2)
    assert torch.equal(conv_weight_tensor(conv_weight_matrix(weight), geometry), weight)


@pytest.mark.parametrize("call, message", [
    (lambda x, w: ops.quantized_conv2d(x.permute(0, 3, 1, 2)[:, :1], w, ConvGeometry((3, 3)), 8), "channels"),
    (lambda x, w: ops.quantized_conv2d(x[:, :2, :2], w, ConvGeometry((3, 3)), 8), "smaller than the window"),
    (lambda x, w: ops.quantized_conv2d(x, w, ConvGeometry((3, 3)), 9), "act_bits"),
    (lambda x, w: ops.quantized_conv2d(x, w, ConvGeometry((3, 3)), 8, activation="swiglu"), "gated"),
    (lambda x, w: ops.quantized_conv2d(x, w, ConvGeometry((5, 5)), 8), "taps"),
    (lambda x, w: ops.quantized_conv2d(x, w, (3, 3), 8), "ConvGeometry"),
    (lambda x, w: ops.quantized_conv2d(x.int(), w, ConvGeometry((3, 3)), 8), "dtype"),
    (lambda x, w: ops.quantized_conv2d(x, w, ConvGeometry((3, 3)), 8, residual=torch.zeros(1, 5, 6, 8)), "residual"),
    (lambda x, w: ops.quantized_conv2d(x, w, ConvGeometry((3, 3)), 8, static_scale=torch.ones(1),
                                       zero_point=torch.ones(1, dtype=torch.int8)), "colsum"),
    (lambda x, w: ConvGeometry((3, 3), stride=0), "stride"),
    (lambda x, w: ConvGeometry((3, 3), groups=0), "groups"),
])
def test_bad_arguments_are_value_errors(call, message):
    x = torch.randn(1, 8, 8, 4)
    weight = QuantizedWeight(torch.ones(8, 36, dtype=torch.int8), "int8", torch.ones(8))
    with pytest.raises(ValueError, match=message):
        call(x, weight)
