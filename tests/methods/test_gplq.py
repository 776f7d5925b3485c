import copy

import pytest
import torch
from torch import nn

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.methods import gplq, ptq, qwt
from qla_kernels.nn.lsq_linear import LSQLinear, TokenQuantLinear
from qla_kernels.quant.hadamard import rotation_matrix
from qla_kernels.quant.lsq import LSQPlusQuantizer

from ..conftest import kl_divergence


def _kl(fp_logits, model, x):
    with torch.no_grad(), qk.use_backend("simulate"):
        return kl_divergence(fp_logits, model(x))


@pytest.fixture(scope="module")
def digits_gplq(digits_vit):
    """Stage 1 on one epoch of the digits training set (batches of 16, defaults otherwise)."""
    train = [digits_vit.train_x[i:i + 16] for i in range(0, len(digits_vit.train_x), 16)]
    return gplq.activation_qat(digits_vit.model, qk.W4A4(), train, progress=False)


def test_pca_loss_is_zero_for_the_teacher_and_projects_onto_its_top_variance():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=generator))[0]
    features = (torch.randn(4000, 8, generator=generator) * torch.tensor([5.0, 3, 1, 1, 1, 1, 1, 1])) @ basis.t() + 2
    moments = gplq._Moments(8)
    for chunk in features.split(1000):
        moments.add(chunk)
    subspace = moments.subspace(0.6, torch.device("cpu"))
    # variances 25, 9, 1×6 of 40: the first component holds 62.5% of it
    assert subspace.components.shape == (8, 1) and subspace.explained == pytest.approx(0.625, abs=0.02)
    assert abs(float(subspace.components[:, 0] @ basis[:, 0])) > 0.99
    assert float(subspace.loss(features, features)) == 0.0
    off_subspace = features + basis[:, 5]  # a shift orthogonal to the kept component costs nothing
    assert float(subspace.loss(off_subspace, features)) < 1e-3
    assert float(subspace.loss(features + basis[:, 0], features)) == pytest.approx(1.0, rel=1e-3)


def test_stage1_is_close_to_fp_and_its_loss_decreases(digits_vit, digits_gplq, capsys):
    """Measured: W32A4 KL 0.008, accuracy 0.950 (fp 0.945); PCA loss 0.0415 -> 0.0352 (first vs last quarter)."""
    student, report = digits_gplq
    assert report.quantized_layers == 4 * 4 + 1 and report.steps == 88
    assert all(1 <= k < 64 for k in report.pca_components) and all(e >= 0.6 for e in report.pca_explained)
    quarter = report.steps // 4
    first, last = sum(report.losses[:quarter]) / quarter, sum(report.losses[-quarter:]) / quarter
    assert last < 0.95 * first
    with torch.no_grad():
        fp_logits = digits_vit.model(digits_vit.test_x)
    kl = _kl(fp_logits, student, digits_vit.test_x)
    accuracy = digits_vit.accuracy(student)
    assert kl < 0.02 and accuracy > digits_vit.accuracy(digits_vit.model) - 0.02
    assert all(isinstance(m, LSQLinear) for m in student.modules() if isinstance(m, nn.Linear))
    assert not any(p.requires_grad for p in student.parameters())
    with capsys.disabled():
        print(f"\nGPLQ stage 1 (W32A4): KL {kl:.4f}, accuracy {accuracy:.4f}; PCA loss {first:.4f} -> {last:.4f}")


def test_digits_w4a4_gplq_against_ptq_qwt(digits_vit, digits_gplq, capsys):
    """GPLQ (stage 1, then weight PTQ + QwT) against PTQ + QwT with the same percentile/asymmetric
    activation init, W4A4, KL to fp on held-out digits. Reported, not asserted: GPLQ's advantage
    does not hold across models and machines. Measured on the three shipped models, 2 threads:
    GPLQ 0.0091 / 0.0086 / 0.0095 vs PTQ + QwT 0.0077 / 0.0095 / 0.0101 (ratio mean 1.01); 1 thread:
    0.0059 / 0.0084 / 0.0097 (mean 0.87); plain PTQ 0.0057 / 0.0097 / 0.0125, so QwT itself hurts on
    the first model. Asserted: GPLQ is a working W4A4 model, within 2x of PTQ + QwT's KL."""
    fp = digits_vit.model
    calibration = digits_vit.calibration_batches()
    with torch.no_grad():
        fp_logits = fp(digits_vit.test_x)
    baseline = qk.quantize_(copy.deepcopy(fp), qk.W4A4())
    ptq.calibrate(baseline, calibration, method="percentile", symmetric=False, progress=False)
    kl_ptq, accuracy_ptq = _kl(fp_logits, baseline, digits_vit.test_x), digits_vit.accuracy(baseline)
    qwt.calibrate(fp, baseline, calibration, progress=False)
    kl_ptq_qwt = _kl(fp_logits, baseline, digits_vit.test_x)
    student, _ = digits_gplq
    model, report = gplq.weight_ptq(copy.deepcopy(student), fp, qk.W4A4(), calibration, progress=False)
    kl_gplq = _kl(fp_logits, model, digits_vit.test_x)
    assert report.quantized_layers == 17 and len(report.qwt) == 4
    assert kl_gplq < 2 * kl_ptq_qwt
    with capsys.disabled():
        print(f"\ndigits ViT W4A4 KL to fp: PTQ {kl_ptq:.4f} (acc {accuracy_ptq:.4f}), PTQ+QwT {kl_ptq_qwt:.4f} "
              f"(acc {digits_vit.accuracy(baseline):.4f}), GPLQ {kl_gplq:.4f} (acc {digits_vit.accuracy(model):.4f})")


def test_export_runs_the_trained_quantizers_on_the_kernels(digits_vit, digits_gplq):
    """The exported QuantLinears carry the learned step and integer zero point, the kernel's
    activation codes equal the stage-1 quantizer's exactly, and the Triton path equals simulation."""
    student, _ = digits_gplq
    model, _ = gplq.weight_ptq(copy.deepcopy(student), digits_vit.model, qk.W4A4(), digits_vit.calibration_batches(),
                               compensate=False, weight_clip="percentile", progress=False)
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0].detach()))
               for name, m in model.named_modules() if isinstance(m, qk.QuantLinear)]
    with torch.no_grad(), qk.use_backend("simulate"):
        model(digits_vit.test_x[:3])
    for handle in handles:
        handle.remove()
    assert len(inputs) == 17
    backends = ["reference"] + (["triton"] if qk.backends()["triton"].available else [])
    for name, x in inputs.items():
        layer, quantizer = model.get_submodule(name), student.get_submodule(name).input_quantizer
        assert torch.equal(layer.input_scale, quantizer.step_size().reshape(1))
        assert torch.equal(layer.input_zero_point, quantizer.integer_zero().reshape(1))
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        expected = (quantizer.codes(rows).short() - quantizer.integer_zero()).to(torch.int8)  # q − z at 4 bits
        with torch.no_grad(), qk.use_backend("simulate"):
            simulated = layer(rows)
        for backend in backends:
            with qk.use_backend(backend):
                codes, _, _ = ops.quantize_activation(rows, 4, static_scale=layer.input_scale,
                                                      zero_point=layer.input_zero_point)
                assert torch.equal(codes, expected), (name, backend)
                torch.testing.assert_close(layer(rows), simulated, rtol=1e-4, atol=1e-4)


def test_frozen_weights_and_gpt2_conv1d():
    """train_weights=False trains only the quantizers; GPT-2's Conv1D becomes an LSQLinear with
    the transposed weight, and stage 2 then runs the whole model on QuantLinears."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 64, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
               for _ in range(3)]
    before = {n: p.clone() for n, p in model.named_parameters()}
    student, report = gplq.activation_qat(model, qk.W8A8(), batches, train_weights=False, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the teacher is untouched
    c_attn = student.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LSQLinear)
    assert torch.equal(c_attn.weight, model.transformer.h[0].attn.c_attn.weight.t())
    assert report.trainable_parameters == 2 * report.quantized_layers  # step and zero per layer
    quantized, _ = gplq.weight_ptq(student, model, qk.W8A8(), batches, progress=False)
    assert not any(isinstance(m, (LSQLinear,)) for m in quantized.modules())
    with torch.no_grad(), qk.use_backend("simulate"):
        logits_q = quantized(**batches[0]).logits
        logits_fp = model(**batches[0]).logits
    assert torch.nn.functional.cosine_similarity(logits_q.flatten(), logits_fp.flatten(), dim=0) > 0.95


def test_bad_arguments(digits_vit):
    fp, batches = digits_vit.model, digits_vit.calibration_batches(1)
    with pytest.raises(ValueError, match="no activation quantization"):
        gplq.activation_qat(fp, qk.W4A16(group_size=32), batches, progress=False)
    with pytest.raises(ValueError, match="init"):
        gplq.activation_qat(fp, qk.W4A4(), batches, init="kl", progress=False)
    with pytest.raises(ValueError, match="pca_variance"):
        gplq.activation_qat(fp, qk.W4A4(), batches, pca_variance=0.0, progress=False)
    with pytest.raises(ValueError, match="no linear"):
        gplq.activation_qat(fp, qk.W4A4(), batches, filter_fn=lambda m, n: False, progress=False)
    with pytest.raises(ValueError, match="LSQLinear"):
        gplq.weight_ptq(copy.deepcopy(fp), fp, qk.W4A4(), batches, progress=False)
    student = copy.deepcopy(fp)
    student.head = LSQLinear.from_linear(fp.head, bits=8)
    with pytest.raises(ValueError, match="8-bit activations"):
        gplq.weight_ptq(student, fp, qk.W4A4(), batches, progress=False)
    with pytest.raises(ValueError, match="weight_clip"):
        gplq.weight_ptq(student, fp, qk.W4A8(), batches, weight_clip="max", progress=False)
    assert isinstance(LSQPlusQuantizer(4).integer_zero(), torch.Tensor)


@pytest.mark.parametrize("config", [qk.W4A4(), qk.W4A4(rotate="hadamard"), qk.W8A8(rotate="hadamard")],
                         ids=str)
def test_dynamic_stage1_quantizes_activations_as_the_exported_layer(digits_vit, config):
    """With activations="dynamic" every student linear is a TokenQuantLinear: fp weights and the
    exported QuantLinear's own per-token (rotated) activation quantization. So, given the
    exported layer's dequantized weight, the student computes the exported layer's output up to
    fp32 summation order; and weight_ptq exports dynamic layers (no static scale) of `config`."""
    fp, batches = digits_vit.model, digits_vit.calibration_batches(2, 16)
    student, report = gplq.activation_qat(fp, config, batches, activations="dynamic", progress=False)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, TokenQuantLinear)}
    assert len(layers) == report.quantized_layers == 17 and report.trainable_parameters > 0
    exported, _ = gplq.weight_ptq(copy.deepcopy(student), fp, config, batches, compensate=False, progress=False)
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        quantized = exported.get_submodule(name)
        assert isinstance(quantized, qk.QuantLinear) and quantized.config == config
        assert quantized.input_scale is None
        twin = copy.deepcopy(layer)
        with torch.no_grad():  # the weight whose rotation is the exported layer's dequantized weight
            dequantized = quantized.quantized_weight().dequantize()
            rotation = rotation_matrix(layer.in_features).float()
            twin.weight.copy_(dequantized @ rotation.t() if config.rotate else dequantized)
            inputs = torch.randn(5, 7, layer.in_features, generator=generator) * 3
            with qk.use_backend("simulate"):
                expected = quantized(inputs)
            torch.testing.assert_close(twin(inputs), expected, rtol=1e-4, atol=1e-4)


def test_dynamic_gplq_refusals(digits_vit):
    fp, batches = digits_vit.model, digits_vit.calibration_batches(1, 16)
    with pytest.raises(ValueError, match="activations must be one of"):
        gplq.activation_qat(fp, qk.W4A4(), batches, activations="per_token", progress=False)
    with pytest.raises(ValueError, match="train_weights must be True"):
        gplq.activation_qat(fp, qk.W4A4(), batches, activations="dynamic", train_weights=False, progress=False)
    with pytest.raises(ValueError, match="static activation quantizers do not rotate"):
        gplq.activation_qat(fp, qk.W4A4(rotate="hadamard"), batches, progress=False)
    student, _ = gplq.activation_qat(fp, qk.W4A4(rotate="hadamard"), batches, activations="dynamic", progress=False)
    with pytest.raises(ValueError, match="rotate='hadamard'"):
        gplq.weight_ptq(student, fp, qk.W4A4(), batches, progress=False)
