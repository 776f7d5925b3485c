import copy

import pytest
import torch
from torch import nn

import qla_kernels as qk
from qla_kernels.methods import ptq
from qla_kernels.quant.observers import ActivationObserver, static_scale

from ..conftest import kl_divergence


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def test_calibrate_sets_static_scales_for_every_layer():
    model = qk.quantize_(_model(), qk.W8A8())
    batches = [torch.randn(16, 32) for _ in range(3)]
    chosen = ptq.calibrate(model, batches, method="minmax", progress=False)
    assert set(chosen) == {"0", "2"}
    x = torch.cat(batches)
    assert chosen["0"].scale == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    assert chosen["0"].rows_seen == 48
    for name in chosen:
        layer = model.get_submodule(name)
        assert layer.input_scale is not None and "static" in repr(layer)


def test_asymmetric_zero_point_for_positive_inputs():
    """The GELU output feeding layer 2 is nearly all positive: an asymmetric range uses the codes
    better, and its zero point sits near the bottom of the signed range."""
    model = qk.quantize_(_model(), qk.W4A4())
    chosen = ptq.calibrate(model, [torch.randn(64, 32)], method="minmax", symmetric=False, progress=False)
    assert chosen["2"].zero_point <= -5
    assert model[2].input_zero_point is not None
    x = torch.randn(8, 32)
    out_integer = model(x)
    with qk.use_backend("simulate"):
        torch.testing.assert_close(model(x), out_integer, rtol=1e-5, atol=1e-5)


def test_percentile_never_worse_than_minmax_on_the_output():
    torch.manual_seed(0)
    observer = ActivationObserver()
    x = torch.randn(512, 64)
    x[0, 0] = 40.0  # one outlier stretches the min-max range
    observer.observe(x)
    weight = torch.randn(16, 64)
    minmax = static_scale(observer, 4, "minmax")
    percentile = static_scale(observer, 4, "percentile", weight=weight)
    mse = static_scale(observer, 4, "mse")
    assert percentile[0] < minmax[0] and mse[0] < minmax[0]

    def output_error(scale):
        q = torch.clamp(torch.round(x / scale), -8, 7) * scale
        return float((q @ weight.t() - x @ weight.t()).square().sum())

    assert output_error(percentile[0]) <= output_error(minmax[0])


def test_observer_keeps_a_bounded_sample():
    observer = ActivationObserver(max_rows=100)
    for _ in range(5):
        observer.observe(torch.randn(64, 8))
    assert observer.rows.shape == (100, 8) and observer.seen == 320


def test_static_ptq_on_digits(digits_vit):
    fp = digits_vit.model
    dynamic = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    static = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    ptq.calibrate(static, digits_vit.calibration_batches(), method="percentile", progress=False)
    with torch.no_grad():
        reference = fp(digits_vit.test_x)
        assert kl_divergence(reference, static(digits_vit.test_x)) < 0.01
        assert kl_divergence(reference, dynamic(digits_vit.test_x)) < 0.01
    assert digits_vit.accuracy(static) > digits_vit.accuracy(fp) - 0.02


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        ptq.calibrate(qk.quantize_(_model(), qk.W8A8()), [torch.randn(2, 32)], method="kl")
    with pytest.raises(ValueError, match="no QuantLinear or QuantConv2d with activation quantization"):
        ptq.calibrate(qk.quantize_(_model(), qk.W4A16(group_size=32)), [torch.randn(2, 32)])
    with pytest.raises(ValueError, match="pass the layer's weight"):
        observer = ActivationObserver()
        observer.observe(torch.randn(4, 4))
        static_scale(observer, 8, "percentile")
