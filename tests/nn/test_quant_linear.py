import pytest
import torch
from torch import nn

import qla_kernels as qk
from qla_kernels.quant import qrange

from ..conftest import sqnr_db

# Quantized-vs-fp SQNR lower bounds for nn.Linear(256, 96) (default uniform weights) on Gaussian
# inputs. Why these numbers: rounding noise has power step²/12 with step = absmax/qmax. Uniform
# weights have absmax = √3σ, so weights sit 4·qmax² above their noise (48 dB at 8 bits, 22.9 dB
# at 4 bits); Gaussian rows of 256 have absmax ≈ 3σ, so activations sit 1.33·qmax² above theirs
# (43.3 dB at 8 bits, 18.1 dB at 4 bits). Noise powers add: W8A8 ≈ 42 dB, 4-bit weights ≈ 23 dB,
# W4A4 ≈ 16.9 dB (measured within 0.5 dB of that). Bounds sit ~3 dB below.
SQNR_BOUNDS = [
    (qk.W8A8(), 39.0),
    (qk.W4A8(), 20.0),
    (qk.W4A8(group_size=64), 20.0),
    (qk.W4A16(group_size=64), 20.5),
    (qk.W4A16(group_size=None), 20.5),
    (qk.W4A4(), 14.0),
]
CONFIGS = [config for config, _ in SQNR_BOUNDS]


@pytest.mark.parametrize("config, bound", SQNR_BOUNDS, ids=str)
def test_close_to_the_float_layer(config, bound):
    linear = nn.Linear(256, 96)
    x = torch.randn(3, 17, 256)
    quantized = qk.QuantLinear.from_float(linear, config)
    y, yq = linear(x), quantized(x)
    assert yq.shape == y.shape and yq.dtype == y.dtype
    assert sqnr_db(y, yq) > bound


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_simulate_equals_the_integer_path(config, dtype):
    """simulate multiplies dequantized floats, the integer path scales an exact int32 sum: they
    differ only by fp32 summation order, far below one fp16 ulp of the output."""
    quantized = qk.QuantLinear.from_float(nn.Linear(128, 48), config).to(dtype)
    x = torch.randn(19, 128).to(dtype)
    y_int = quantized(x)
    with qk.use_backend("simulate"):
        y_sim = quantized(x)
    assert y_sim.dtype == y_int.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y_sim, y_int, **tolerance)


@pytest.mark.parametrize("bits_config, zero", [(qk.W8A8(), -30), (qk.W4A4(), 2)], ids=["8bit", "4bit"])
def test_static_asymmetric_activation(bits_config, zero):
    quantized = qk.QuantLinear.from_float(nn.Linear(64, 32), bits_config)
    x = torch.rand(9, 64) * 3  # all positive: asymmetric range
    quantized.set_static_activation(torch.tensor(0.03), torch.tensor(zero))
    assert "static" in repr(quantized)
    y_int = quantized(x)
    with qk.use_backend("simulate"):
        y_sim = quantized(x)
    torch.testing.assert_close(y_sim, y_int, rtol=1e-5, atol=1e-5)
    weight = quantized.quantized_weight().dequantize()
    lo, hi = qrange(bits_config.act_bits)
    x_hat = (torch.clamp(torch.round(x / 0.03) + zero, lo, hi) - zero) * 0.03
    torch.testing.assert_close(y_int, x_hat @ weight.t() + quantized.bias, rtol=1e-5, atol=1e-5)


def test_static_activation_rejects_bad_values():
    quantized = qk.QuantLinear.from_float(nn.Linear(64, 32), qk.W8A8())
    with pytest.raises(ValueError, match="scale must be a positive finite"):
        quantized.set_static_activation(torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"zero_point must be an integer in \[-128, 127\]"):
        quantized.set_static_activation(torch.tensor(0.1), torch.tensor(300))
    with pytest.raises(ValueError, match="no activation quantization"):
        qk.QuantLinear.from_float(nn.Linear(64, 32), qk.W4A16(group_size=32)).set_static_activation(0.1)


def test_gradients_flow_through_simulate():
    quantized = qk.QuantLinear.from_float(nn.Linear(32, 16), qk.W8A8())
    x = torch.randn(4, 32, requires_grad=True)
    with qk.use_backend("simulate"):
        quantized(x).square().sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_hf_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs, weight [64, 48]
    nn.init.normal_(conv.weight, std=0.05)
    nn.init.normal_(conv.bias, std=0.05)
    quantized = qk.QuantLinear.from_float(conv, qk.W8A8())
    assert (quantized.in_features, quantized.out_features) == (64, 48)
    x = torch.randn(5, 64)
    assert sqnr_db(conv(x), quantized(x)) > 30


def test_half_keeps_fp32_scales():
    quantized = qk.QuantLinear.from_float(nn.Linear(64, 32), qk.W4A16(group_size=32))
    scale = quantized.weight_scale.clone()
    quantized.half()
    assert quantized.weight_scale.dtype == torch.float32 and torch.equal(quantized.weight_scale, scale)
    assert quantized.bias.dtype == torch.float16
    assert quantized(torch.randn(3, 64, dtype=torch.float16)).dtype == torch.float16


def test_repr_shows_the_format():
    text = repr(qk.QuantLinear.from_float(nn.Linear(64, 32), qk.W4A8(group_size=32)))
    assert "W4A8(group_size=32)" in text and "int4_int8_groups" in text and "dynamic per-token" in text


def test_zero_input_rows_give_bias_not_nan():
    quantized = qk.QuantLinear.from_float(nn.Linear(64, 8), qk.W8A8())
    y = quantized(torch.zeros(2, 64))
    assert torch.equal(y, quantized.bias.expand(2, 8))


def test_nan_and_inf_propagate():
    quantized = qk.QuantLinear.from_float(nn.Linear(64, 8), qk.W8A8())
    x = torch.randn(3, 64)
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")
    y = quantized(x)
    assert bool(torch.isfinite(y[0]).all())
    assert not bool(torch.isfinite(y[1]).any()) and not bool(torch.isfinite(y[2]).any())


def test_non_contiguous_input_is_accepted_by_the_module():
    """QuantLinear is a drop-in for nn.Linear (HF passes views like hidden[:, 0]); the op itself
    rejects non-contiguous input, so the module makes its rows contiguous."""
    linear = nn.Linear(32, 8)
    quantized = qk.QuantLinear.from_float(linear, qk.W8A8())
    x = torch.randn(4, 6, 32)[:, 0]
    assert not x.is_contiguous()
    torch.testing.assert_close(quantized(x), quantized(x.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("make_input, match", [
    (lambda: torch.randn(2, 64).to(torch.int32), "x must be a float16/bfloat16/float32"),
    (lambda: torch.randn(2, 63), "expected in_features=64"),
    (lambda: torch.randn(2, 64, device="meta"), "x is on meta but the layer is on cpu"),
    (lambda: torch.randn(2, 64, dtype=torch.float64), "x must be a float16/bfloat16/float32"),
])
def test_bad_input(make_input, match):
    quantized = qk.QuantLinear.from_float(nn.Linear(64, 16), qk.W8A8())
    with pytest.raises(ValueError, match=match):
        quantized(make_input())


def test_unsupported_configs():
    with pytest.raises(ValueError, match="config must be a QuantConfig"):
        qk.QuantLinear.from_float(nn.Linear(64, 16), "w8a8")
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of W4A16.group_size=64"):
        qk.QuantLinear.from_float(nn.Linear(96, 16), qk.W4A16(group_size=64))
    with pytest.raises(ValueError, match="expected nn.Linear or transformers Conv1D"):
        qk.QuantLinear.from_float(nn.Conv2d(3, 3, 1), qk.W8A8())


def test_a_meta_skeleton_quantizes_to_its_shapes_and_materializes():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    qk.quantize_(model, qk.W4A16(group_size=32))
    assert model[0].weight.is_meta and tuple(model[0].weight.shape) == (32, 32)  # two int4 codes per byte
    model.to_empty(device="cpu")
    assert model[0].weight.device.type == "cpu" and model[0].weight_scale.dtype == torch.float32
