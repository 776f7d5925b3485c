"""The integer convolution (ops/conv.py) against an int64 convolution of its codes, and every
backend against the reference.

Exactness by construction: with power-of-two activation and weight scales, no bias and the
activation "none", every value the kernels produce is an integer accumulator times 2^-e, exact
in fp32 while |acc| < 2^24, so backends must agree with the int64 convolution bit for bit. With
arbitrary scales and an epilogue the fp32 parts may be contracted differently (FMA), so those
comparisons allow a few ulps of the output's magnitude.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.formats.int4 import pack_int4
from qla_kernels.formats.weights import QuantizedWeight
from qla_kernels.ops.conv import ConvGeometry, ConvPlan, conv_weight_matrix, conv_weight_tensor, gather_windows
from qla_kernels.ops.triton.kernel_launch import kernel_name, recording
from qla_kernels.quant.primitives import absmax_scale, quantize_with_scale

from ..conftest import examples

BACKENDS = [name for name in ("cpu", "triton") if qk.backends()[name].available]
S_X, S_W = 2.0 ** -4, 2.0 ** -6
# The Triton backend runs CPU tensors only in the interpreter; on a GPU machine its kernels run compiled.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _conv(backend, *args, **kwargs):
    """ops.quantized_conv2d on `backend`, its tensors on that backend's device; the result on the CPU."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    move = lambda value: value.to(device) if isinstance(value, (torch.Tensor, QuantizedWeight)) else value  # noqa: E731
    with qk.use_backend(backend):
        return ops.quantized_conv2d(*map(move, args), **{key: move(value) for key, value in kwargs.items()}).cpu()


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
        y = _conv(backend, x, weight, geometry, bits, static_scale=scale, zero_point=zero_point)
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
        y = _conv(backend, x, weight, geometry, 8)
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
        y = _conv(backend, x, weight, geometry, 8, bias=bias, activation=activation, residual=residual)
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


# ---------------------------------------------------------------- the implicit-GEMM kernel

TRITON = "triton" in BACKENDS


def _conv_launches(launches):
    return [kernel_name(launch.kernel) for launch in launches]


implicit_geometries = st.builds(
    lambda kh, kw, s, p, d: ConvGeometry((kh, kw), (s, s + (kh == 1)), (p, min(p + 1, 2)), (d, 1)),
    st.sampled_from([1, 3, 5]), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(0, 2),
    st.sampled_from([1, 2]))


@pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
@examples(20)
@given(implicit_geometries, st.sampled_from([1, 2]), st.sampled_from([32, 64]), st.integers(3, 9), st.integers(3, 8),
       st.sampled_from(["dynamic", "static", "static_zero"]), st.sampled_from([4, 8]), st.booleans(),
       st.integers(0, 2 ** 16))
def test_implicit_gemm_convolution_is_the_reference_bit_for_bit(geometry, groups, group_channels, height, width,
                                                                scales, bits, packed, seed):
    """The Triton convolution gathers its windows in the K loop (`implicit_conv_kernel`, one
    launch per group, no windows in memory): for every geometry, groups, int8 / int4 weights and
    every scale kind it equals the reference bit for bit (dequantization only: the same fp32
    products in the same order, FP contraction off)."""
    geometry = ConvGeometry(geometry.kernel, geometry.stride, geometry.padding, geometry.dilation, groups)
    out_h, out_w = geometry.output_size(height, width)
    if out_h < 1 or out_w < 1:
        return
    generator = torch.Generator().manual_seed(seed)
    channels, out_channels = groups * group_channels, 16 * groups
    zero = 5 if scales == "static_zero" else None
    _, weight = _weight(out_channels, geometry.taps * group_channels, 4 if packed else 8, generator, packed=packed,
                        zero_point=zero)
    weight = QuantizedWeight(weight.data, weight.format, torch.rand(out_channels, generator=generator) * 0.01 + 1e-3,
                             colsum=weight.colsum)
    x = torch.randn(2, height, width, channels, generator=generator)
    static = {} if scales == "dynamic" else dict(
        static_scale=torch.tensor([0.04]), zero_point=None if zero is None else torch.tensor([zero], dtype=torch.int8))
    expected = _conv("reference", x, weight, geometry, bits, **static)
    with recording() as launches:
        y = _conv("triton", x, weight, geometry, bits, **static)
    assert _conv_launches(launches).count("implicit_conv_kernel") == groups
    assert torch.equal(y, expected)


@pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
@pytest.mark.parametrize("scales", ["dynamic", "static"])
def test_implicit_gemm_convolution_epilogue(scales):
    """A residual block's last convolution on the implicit kernel: bias, ReLU after the residual,
    QLA's low-rank T·Uᵀ and QwT's full-rank segment after it, and per-pixel re-quantization, within
    a few fp32 ulps of the reference (contraction may differ); the codes within one step."""
    generator = torch.Generator().manual_seed(3)
    geometry = ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1), 1)
    x = torch.randn(2, 9, 8, 32, generator=generator)
    _, weight = _weight(24, 9 * 32, 8, generator)
    weight = QuantizedWeight(weight.data, "int8", torch.rand(24, generator=generator) * 0.01 + 1e-3)
    rows = 2 * 5 * 4
    plan = ConvPlan(weight, geometry, 8, torch.tensor([0.05]) if scales == "static" else None, None,
                    bias=torch.randn(24, generator=generator), lowrank_u=torch.randn(24, 4, generator=generator),
                    fullrank_w=torch.randn(24, 6, generator=generator) * 0.1, activation="relu",
                    residual_before_activation=True).frozen()
    lowrank_t, fullrank_x = torch.randn(rows, 4, generator=generator), torch.randn(rows, 6, generator=generator)
    residual = torch.randn(2, 5, 4, 24, generator=generator)
    results = {}
    for backend in ("reference", "triton"):
        device = TRITON_DEVICE if backend == "triton" else "cpu"
        on_device = plan if device == "cpu" else dataclasses.replace(
            plan, weight=plan.weight.to(device), group_weights=tuple(w.to(device) for w in plan.group_weights),
            **{name: getattr(plan, name).to(device) for name in ("input_scale", "bias", "lowrank_u", "fullrank_w")
               if getattr(plan, name) is not None})
        inputs = [tensor.to(device) for tensor in (x, lowrank_t, fullrank_x, residual)]
        with qk.use_backend(backend), recording() as launches:
            y = on_device.run(*inputs)
            q, q_scale = on_device.run(*inputs, requant_bits=8)
        results[backend] = y.cpu(), q.cpu(), q_scale.cpu()
        assert ("implicit_conv_kernel" in _conv_launches(launches)) == (backend == "triton")
    (y_ref, q_ref, s_ref), (y, q, s) = results["reference"], results["triton"]
    assert float((y - y_ref).abs().max()) <= 1e-5 * float(y_ref.abs().max())
    assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)
    assert int((q.int() - q_ref.int()).abs().max()) <= 1


@pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
def test_implicit_gemm_convolution_routing_and_non_finite_windows():
    """Narrow channel groups (a 3-channel stem, 16 channels) gather their windows for the fused
    linear instead; a NaN pixel makes every window holding it NaN on both paths (its scale is NaN,
    its codes 0) and leaves the other windows exact."""
    generator = torch.Generator().manual_seed(4)
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1), 1)
    for channels, implicit in ((3, False), (16, False), (32, True)):
        _, weight = _weight(8, 9 * channels, 8, generator)
        x = torch.randn(1, 6, 5, channels, generator=generator)
        x[0, 2, 3, 0] = float("nan")
        expected = _conv("reference", x, weight, geometry, 8)
        with recording() as launches:
            y = _conv("triton", x, weight, geometry, 8)
        assert ("implicit_conv_kernel" in _conv_launches(launches)) == implicit, channels
        torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
        assert int(y.isnan().any(dim=3).sum()) == 9  # the 3×3 windows around (2, 3)


@pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
@examples(12)
@given(implicit_geometries, st.sampled_from([1, 2]), st.integers(2, 40), st.integers(3, 9),
       st.sampled_from(["dynamic", "static", "static_zero"]), st.sampled_from([4, 8]), st.integers(0, 2 ** 16))
def test_depthwise_kernel_is_the_reference_bit_for_bit(geometry, multiplier, channels, size, scales, bits, seed):
    """Depthwise convolutions (int8 weights) run `depthwise_conv_kernel`, a direct tap sum over
    [pixels, channels] tiles, equal to the reference bit for bit for every geometry, channel
    multiplier and scale kind, with bias and ReLU in the epilogue."""
    geometry = ConvGeometry(geometry.kernel, geometry.stride, geometry.padding, geometry.dilation, channels)
    if min(geometry.output_size(size, size + 2)) < 1:
        return
    generator = torch.Generator().manual_seed(seed)
    out_channels = multiplier * channels
    zero = -3 if scales == "static_zero" else None
    _, weight = _weight(out_channels, geometry.taps, 8, generator, zero_point=zero)
    weight = QuantizedWeight(weight.data, "int8", torch.rand(out_channels, generator=generator) * 0.01 + 1e-3,
                             colsum=weight.colsum)
    x = torch.randn(2, size, size + 2, channels, generator=generator)
    static = {} if scales == "dynamic" else dict(
        static_scale=torch.tensor([0.04]), zero_point=None if zero is None else torch.tensor([zero], dtype=torch.int8))
    epilogue = dict(bias=torch.randn(out_channels, generator=generator), activation="relu")
    expected = _conv("reference", x, weight, geometry, bits, **static, **epilogue)
    with recording() as launches:
        y = _conv("triton", x, weight, geometry, bits, **static, **epilogue)
    assert "depthwise_conv_kernel" in _conv_launches(launches)
    assert torch.equal(y, expected)
