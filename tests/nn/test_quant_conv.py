"""QuantConv2d and the CNN conversion: quantize_convs_, static PTQ, BatchNorm and activation
folding by data flow, fused residual blocks, save / load."""

import copy

import pytest
import torch
from torch import nn

import qla_kernels as qk
from qla_kernels.methods import ptq, qwt
from qla_kernels.models.conv_blocks import fuse_residual_convs
from qla_kernels.models.conv_epilogues import fold_conv_epilogues
from qla_kernels.models.runtime import convert_for_runtime
from qla_kernels.nn.compensation import compensated_blocks
from qla_kernels.nn.quant_conv import QuantConv2d, TreatedBy, quantize_convs_

torchvision = pytest.importorskip("torchvision")


def _randomized_norms(model):
    """Random BatchNorm statistics, so that folding them is not the identity."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def _conv_inputs(model, x):
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args[0].clone()))
               for name, m in model.named_modules() if isinstance(m, QuantConv2d)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return inputs


@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A8(), qk.W4A4()])
def test_each_folded_convolution_computes_its_unfolded_chain(config):
    """ResNet-18: all 20 BatchNorms fold, the ReLU after every block's first convolution (and the
    stem's) joins its epilogue, and each folded layer on its own recorded input equals conv → BN
    (→ ReLU) of the calibration form to fp32 rounding. The model's own ReLU, shared with the
    residual adds, still runs there."""
    fp = _randomized_norms(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 48, 48)
    model = quantize_convs_(copy.deepcopy(fp), config)
    unfolded = copy.deepcopy(model)
    inputs = _conv_inputs(model, x)
    folded = fold_conv_epilogues(model, x)
    assert len(folded) == 20 and sum(len(chain) == 2 for chain in folded.values()) == 9
    assert isinstance(model.layer1[0].bn1, TreatedBy) and isinstance(model.layer1[0].relu, TreatedBy)
    with torch.no_grad():
        for name, chain in folded.items():
            expected = unfolded.get_submodule(name)(inputs[name])
            for follower in chain:
                expected = unfolded.get_submodule(follower)(expected.clone())
            actual = model.get_submodule(name)(inputs[name])
            assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), name
        # a tensor the convolution did not mark runs the wrapped module
        probe = torch.randn(1, 64, 4, 4)
        assert torch.equal(model.layer1[0].relu(probe), torch.relu(probe))


def test_a_second_reader_keeps_the_norm_unfolded():
    """A convolution output that the code between modules also reads (torch.cat), or that is
    changed in place before its norm reads it, is not folded; the others are."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c, self.bn_c, self.act = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU()

        def forward(self, x):
            a = self.bn_a(self.a(x))
            b = self.b(a)
            side = torch.cat([b, a], dim=1)  # b is read twice
            b = self.bn_b(b)
            c = self.bn_c(self.c(side))
            c += b  # changed in place before the ReLU reads it
            return self.act(c)

    model = quantize_convs_(_randomized_norms(Net()), qk.W8A8())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    folded = fold_conv_epilogues(model, x)
    assert folded == {"a": ["bn_a"], "c": ["bn_c"]}
    with torch.no_grad():
        assert float((model(x) - before).norm() / before.norm()) < 1e-3


def test_temporaries_read_between_modules_do_not_lend_their_ids():
    """Tensors the code between modules reads and then frees: CPython hands their ids to later
    tensors, a convolution's output among them, which then looked read twice and kept its norm
    unfolded (8 of 20 seeds here before the reads kept their tensors alive; a ResNet block's conv2
    in the digits CNN test, intermittently)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            temporaries = [x * 1.0 for _ in range(64)]
            for temporary in temporaries:
                temporary.abs()
            del temporaries, temporary
            return self.bn(self.conv(x))

    for seed in range(20):
        torch.manual_seed(seed)
        model = quantize_convs_(_randomized_norms(Net()), qk.W8A8())
        assert fold_conv_epilogues(model, torch.randn(2, 4, 6, 6)) == {"conv": ["bn"]}, seed


@pytest.mark.parametrize("build, blocks", [
    (lambda: torchvision.models.resnet18(num_classes=10), 8),
    (lambda: torchvision.models.resnet50(num_classes=10), 16),
    (lambda: torchvision.models.mobilenet_v2(width_mult=0.5), 10),
])
def test_residual_blocks_fuse_their_shortcut(build, blocks):
    """Every residual block's add (and ReLU) runs in its last convolution's epilogue: each
    rewritten block, on the input the calibration form gives it, computes that block's output to
    fp32 rounding. (Whole random-weight models are compared per block: one re-rounded code
    upstream is amplified by random layers to percents at the output.)"""
    fp = _randomized_norms(build())
    x = torch.randn(2, 3, 32, 32)
    model = quantize_convs_(copy.deepcopy(fp), qk.W8A8())
    ptq.calibrate(model, [torch.randn(2, 3, 32, 32)], method="minmax", progress=False)
    calibrated = copy.deepcopy(model)
    with torch.no_grad():
        report = convert_for_runtime(model, x)
    fused = [name for name, why in report.residual_blocks.items() if why.startswith("fused")]
    assert len(fused) == blocks
    inputs = {}
    handles = [calibrated.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs.setdefault(name, args[0].clone())) for name in fused]
    with torch.no_grad():
        calibrated(x)
        for handle in handles:
            handle.remove()
        for name in fused:
            expected = calibrated.get_submodule(name)(inputs[name])
            actual = model.get_submodule(name)(inputs[name])
            assert float((actual - expected).norm() / expected.norm()) < 1e-5, name
    assert all(m.runtime_plan is not None for m in model.modules() if isinstance(m, QuantConv2d))


def test_hugging_face_detr_backbone_folds_its_frozen_norms():
    """DETR's ResNet backbone (use_timm_backbone=False, random weights) holds DetrFrozenBatchNorm2d
    only; every one of them folds, found by what it computes; the quantized DETR (convolutions and
    transformer linears) runs end to end, converted, within a stated SQNR of fp."""
    transformers = pytest.importorskip("transformers")
    from ..conftest import sqnr_db

    config = transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                                  layer_type="bottleneck", out_features=["stage4"]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=3)
    fp = transformers.DetrForObjectDetection(config).eval()
    frozen = sum(type(m).__name__ == "DetrFrozenBatchNorm2d" for m in fp.modules())
    assert frozen >= 16 and not any(isinstance(m, nn.BatchNorm2d) for m in fp.modules())
    x = {"pixel_values": torch.randn(1, 3, 64, 96)}
    for config_q, floor_db in ((qk.W8A8(), 25.0), (qk.W4A4(), 5.0)):
        model = quantize_convs_(qk.quantize_(copy.deepcopy(fp), config_q), config_q)
        with torch.no_grad():
            report = convert_for_runtime(model, x)
            out, ref = model(**x), fp(**x)
        assert len(report.folded_into_convs) == frozen
        for key in ("logits", "pred_boxes"):
            assert sqnr_db(ref[key], out[key]) > floor_db, (config_q, key)


def test_quantized_cnn_saves_and_loads_bit_exact(tmp_path):
    """W4A8 convolutions with static scales and QwT's group-wise compensations: save, load into
    a fresh fp skeleton, same outputs bit for bit; then the loaded model converts and runs."""
    fp = _randomized_norms(torchvision.models.resnet18(num_classes=10))
    model = quantize_convs_(copy.deepcopy(fp), qk.W4A8())
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    ptq.calibrate(model, batches, method="minmax", progress=False)
    qwt.calibrate(fp, model, batches, progress=False)
    path = str(tmp_path / "r18.safetensors")
    qk.save_quantized(model, path)
    loaded = qk.load_quantized(torchvision.models.resnet18(num_classes=10).eval(), path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        report = convert_for_runtime(loaded, x)
        loaded(x)
    # every compensated block's QwT runs in its fused last convolution (checked per block there)
    lowered = [name for name, why in report.residual_blocks.items() if "QwT compensation" in why]
    assert sorted(lowered) == sorted(name for name, _ in compensated_blocks(model))
    assert not report.hooked_qwt and not any(True for _ in compensated_blocks(loaded))
    with pytest.raises(ValueError, match="runtime conversion"):
        qk.save_quantized(loaded, str(tmp_path / "converted.safetensors"))


def test_a_geometry_mismatch_is_refused_on_load(tmp_path):
    model = quantize_convs_(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), qk.W8A8())
    qk.save_quantized(model, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="convolution with"):
        qk.load_quantized(nn.Sequential(nn.Conv2d(3, 4, 3, padding=2)), str(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("make, message", [
    (lambda: QuantConv2d.from_float(nn.Conv2d(3, 4, 3), qk.W4A16()), "no integer convolution"),
    (lambda: QuantConv2d.from_float(nn.Conv2d(3, 4, 3), qk.W4A4(rotate="hadamard")), "rotation"),
    (lambda: QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding_mode="reflect"), qk.W8A8()), "padding_mode"),
    (lambda: QuantConv2d.from_float(nn.Linear(3, 4), qk.W8A8()), "nn.Conv2d"),
    (lambda: QuantConv2d.from_float(nn.Conv2d(3, 4, 3), qk.W8A8())(torch.randn(1, 4, 8, 8)), "channels"),
    (lambda: QuantConv2d.from_float(nn.Conv2d(3, 4, 3), qk.W8A8())(torch.randn(1, 3, 8)), "4-D"),
    (lambda: QuantConv2d.from_float(nn.Conv2d(3, 4, 3), qk.W8A8())(torch.randn(1, 3, 2, 2)), "smaller than"),
    (lambda: QuantConv2d.from_float(nn.Conv2d(3, 4, 3), qk.W8A8()).set_static_activation(-1.0), "positive"),
    (lambda: quantize_convs_(nn.Sequential(nn.Linear(2, 2)), qk.W8A8()), "no nn.Conv2d"),
    (lambda: quantize_convs_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)), qk.W4A16()), "cannot quantize '1'"),
    (lambda: quantize_convs_(nn.Sequential(nn.Conv2d(3, 4, 1)), qk.W8A8(), stem_config="W4A4"), "stem_config"),
    (lambda: quantize_convs_(nn.Sequential(nn.Conv2d(3, 4, 1)), qk.W4A16(), stem_config=None), "cannot quantize '0'"),
])
def test_bad_input_is_a_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_convolution_with_its_own_forward_stays_fp():
    timm = pytest.importorskip("timm")
    from timm.layers import Conv2dSame, StdConv2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Conv2dSame(4, 4, 3, stride=2), StdConv2d(4, 4, 3))
    with pytest.warns(UserWarning, match="stay in floating point"):
        quantize_convs_(model, qk.W8A8())
    assert isinstance(model[0], QuantConv2d) and type(model[1]) is Conv2dSame and type(model[2]) is StdConv2d
    with pytest.raises(ValueError, match="own forward"):
        QuantConv2d.from_float(Conv2dSame(4, 4, 3), qk.W8A8())


def test_quantize_convs_is_atomic():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, padding_mode="circular"))
    with pytest.raises(ValueError, match="cannot quantize '1'"):
        quantize_convs_(model, qk.W8A8())
    assert isinstance(model[0], nn.Conv2d)


def test_the_integer_path_refuses_gradients_and_the_simulation_gives_them():
    layer = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), qk.W8A8())
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    with pytest.raises(ValueError, match="simulate"):
        layer(x)
    with qk.use_backend("simulate"):
        layer(x).sum().backward()
    assert x.grad is not None


def test_a_block_s_last_convolution_needs_its_shortcut():
    model = quantize_convs_(_randomized_norms(torchvision.models.resnet18(num_classes=10)), qk.W8A8())
    x = torch.randn(1, 3, 32, 32)
    fold_conv_epilogues(model, x)
    fuse_residual_convs(model, x)
    conv = model.layer1[0].conv2
    with torch.no_grad(), pytest.raises(ValueError, match="shortcut"):
        conv(torch.randn(1, 64, 8, 8))
