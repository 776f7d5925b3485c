"""QwT and QLA on CNNs: the digits ResNets (tests/digits.py, three seeds) at W4A4 (stem W8A8),
then the corrected model lowered onto the kernels."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods import qla, qwt
from qla_kernels.models.runtime import convert_for_runtime
from qla_kernels.nn.conv_adapters import ConvAdapter, conv_adapters
from qla_kernels.nn.quant_conv import QuantConv2d, quantize_convs_

from ..conftest import kl_divergence


def _w4a4(model):
    """W4A4 convolutions, the stem W8A8 (quantize_convs_'s default, as the papers keep it), the
    head in fp."""
    quantized = quantize_convs_(copy.deepcopy(model), qk.W4A4())
    assert quantized.stem[0].config == qk.W8A8() and quantized.blocks[0].conv1.config == qk.W4A4()
    return quantized


def _kl(reference, model, x):
    with torch.no_grad(), qk.use_backend("simulate"):
        return kl_divergence(reference, model(x))


def test_qwt_then_qla_lower_the_kl_to_fp_and_lower_onto_the_kernels(digits_cnns):
    """PTQ → + QwT (group-wise 1×1 per block) → + QLA (DW-separable adapters, hybrid loss): the KL
    to fp falls at each step on every seed. Measured on this machine's three seeds: PTQ 0.0116 /
    0.0050 / 0.0104, + QwT 0.0041 / 0.0032 / 0.0030, + QLA 0.0033 / 0.0029 / 0.0024; asserted:
    QwT below 0.8× PTQ and QLA below QwT on each seed, QLA below 0.95× QwT on their mean.
    Then convert_for_runtime folds the norms, fuses both blocks with their QwT and adapter in the
    last convolution's epilogue, and the runtime model on the integer kernels equals its
    simulation to fp32 rounding."""
    ratios = []
    for digits in digits_cnns:
        fp, x = digits.model, digits.test_x
        batches = digits.calibration_batches(8, 64)
        with torch.no_grad():
            reference = fp(x)
        model = _w4a4(fp)
        ptq_kl = _kl(reference, model, x)
        qwt.calibrate(fp, model, batches, progress=False)
        qwt_kl = _kl(reference, model, x)
        assert len(qla.add_conv_adapters(model, batches[0], rank=8)) == 2
        assert _kl(reference, model, x) == pytest.approx(qwt_kl, rel=1e-9)  # the zero gate: a no-op
        qla.train(model, fp, batches, epochs=5, lr=4e-3, progress=False)
        qla_kl = _kl(reference, model, x)
        assert qwt_kl < 0.8 * ptq_kl and qla_kl < qwt_kl, (ptq_kl, qwt_kl, qla_kl)
        ratios.append(qla_kl / qwt_kl)
        with torch.no_grad():
            report = convert_for_runtime(model, x[:8])
        assert sorted(report.residual_blocks.values()) == [
            "fused: conv2 + relu (with its QwT compensation and QLA adapter)"] * 2
        assert not conv_adapters(model)  # no hook left: the adapters run inside the convolutions
        _assert_each_convolution_is_its_simulation(model, x)
    assert sum(ratios) / len(ratios) < 0.95, ratios


def _assert_each_convolution_is_its_simulation(model, x):
    """Per op (a whole W4A4 model re-rounds codes between two summation orders): each runtime
    convolution, on the inputs the runtime model gives it (with its residual and block input),
    equals its fake-quantized twin to fp32 rounding."""
    calls = []
    convolutions = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    handles = [m.register_forward_pre_hook(lambda module, args, kwargs: calls.append((module, args, kwargs)),
                                           with_kwargs=True) for m in convolutions]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    assert len(calls) == len(convolutions)
    for module, args, kwargs in calls:
        plan = module.runtime_plan
        module.thaw()  # the calibration form of the same (folded, lowered) operands runs under simulate
        with torch.no_grad(), qk.use_backend("simulate"):
            simulated = module(*args, **kwargs)
        module.freeze()
        with torch.no_grad():
            deployed = module(*args, **kwargs)
        assert plan is not None
        assert float((deployed - simulated).norm() / simulated.norm()) < 1e-5


def test_conv_adapters_save_and_load(tmp_path, digits_cnns):
    digits = digits_cnns[0]
    model = _w4a4(digits.model)
    qla.add_conv_adapters(model, digits.test_x[:4], rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in conv_adapters(model).values():
            for parameter in adapter.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = str(tmp_path / "cnn.safetensors")
    qk.save_quantized(model, path)
    from ..digits import DigitsResNet

    loaded = qk.load_quantized(DigitsResNet().eval(), path)
    with torch.no_grad():
        assert torch.equal(loaded(digits.test_x), model(digits.test_x))
    assert sorted(conv_adapters(loaded)) == ["blocks.0", "blocks.1"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_channels=0, out_channels=4, rank=2, stride=1), "in_channels"),
    (dict(in_channels=4, out_channels=4, rank=2, stride=1, kernel=2), "odd"),
])
def test_bad_adapters_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvAdapter(**kwargs)


def test_adapters_twice_is_a_value_error(digits_cnns):
    model = _w4a4(digits_cnns[0].model)
    qla.add_conv_adapters(model, digits_cnns[0].test_x[:2])
    with pytest.raises(ValueError, match="already has QLA adapters"):
        qla.add_conv_adapters(model, digits_cnns[0].test_x[:2])


def test_whole_random_cnns_run_every_step(tmp_path):
    """ResNet-18 and ConvNeXt (random weights): PTQ → QwT → QLA → save / load → convert runs, and
    the runtime model stays close to its calibration form (re-rounded codes only)."""
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    from qla_kernels.methods import ptq

    for build, quantize_linears in ((lambda: torchvision.models.resnet18(num_classes=10), False),
                                    (lambda: timm.create_model("convnext_atto", num_classes=10), True)):
        torch.manual_seed(0)
        fp = build().eval()
        batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
        model = quantize_convs_(copy.deepcopy(fp), qk.W8A8())
        if quantize_linears:
            qk.quantize_(model, qk.W8A8())
        ptq.calibrate(model, batches, method="minmax", progress=False)
        qwt.calibrate(fp, model, batches, progress=False)
        if not quantize_linears:
            qla.add_conv_adapters(model, batches[0], rank=4)
            qla.train(model, fp, batches, progress=False)
        path = str(tmp_path / "model.safetensors")
        qk.save_quantized(model, path)
        loaded = qk.load_quantized(build().eval(), path)
        with torch.no_grad():
            before = loaded(batches[0])
            assert torch.equal(before, model(batches[0]))
            convert_for_runtime(loaded, batches[0])
            after = loaded(batches[0])
        assert float((after - before).norm() / before.norm()) < 0.05
