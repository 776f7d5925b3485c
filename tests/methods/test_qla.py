"""QLA adapters: exact no-ops when attached, trained through the simulated quantizers."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods import ptq, qla, qwt
from qla_kernels.methods.batches import model_output, run_model

from ..conftest import kl_divergence
from ..nn.test_quantize_models import MODELS


@pytest.mark.parametrize("name", ["vit_tiny", "deit_tiny", "bert"])
def test_fresh_adapters_are_exact_no_ops(name):
    model, inputs = MODELS[name]()
    quantized = qk.quantize_(model, qk.W8A8())
    with torch.no_grad():
        before = model_output(run_model(quantized, inputs))
    names = qla.add_adapters(quantized, rank=4, example=inputs)
    assert len(names) == (12 if "tiny" in name else 2)
    with torch.no_grad():
        assert torch.equal(model_output(run_model(quantized, inputs)), before)


def test_distilled_deit_prefix_tokens_bypass_the_conv():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    qk.quantize_(model, qk.W8A8())
    qla.add_adapters(model, rank=4, example=torch.randn(1, 3, 64, 64))
    adapter = model.blocks[0].qla_attention
    assert adapter.prefix_tokens == 2 and adapter.grid == (4, 4)
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(2, 18, 192)
    changed = h.clone()
    changed[:, 5] += 1.0  # a patch token: its neighbours' conv outputs move, the prefix tokens' do not
    with torch.no_grad():
        difference = (adapter(changed) - adapter(h)).abs().sum(-1)
    assert float(difference[:, :2].max()) == 0.0 and float(difference[:, 2:].max()) > 0


def test_training_lowers_the_objective_and_touches_only_adapters(digits_vit):
    fp = digits_vit.model
    model = qk.quantize_(copy.deepcopy(fp), qk.W4A4())
    ptq.calibrate(model, digits_vit.calibration_batches(), method="minmax", progress=False)
    qwt.calibrate(fp, model, digits_vit.calibration_batches(), progress=False)
    qla.add_adapters(model, rank=8, example=digits_vit.test_x[:2])
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if "qla_" not in name}
    frozen.update({name: b.clone() for name, b in model.named_buffers() if b is not None})
    batches = [digits_vit.train_x[i:i + 64] for i in range(0, 1400, 64)]
    with torch.no_grad(), qk.use_backend("simulate"):
        before = kl_divergence(fp(digits_vit.train_x), model(digits_vit.train_x))
    report = qla.train(model, fp, batches, epochs=3, lr=1e-3, temperature=1.0, progress=False)
    with torch.no_grad(), qk.use_backend("simulate"):
        after = kl_divergence(fp(digits_vit.train_x), model(digits_vit.train_x))
    assert after < 0.7 * before  # measured 0.0115 -> 0.0049 on the training images
    assert report.steps == 3 * len(batches) and report.trainable_parameters > 0
    for name, value in list(model.named_parameters()) + list(model.named_buffers()):
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert not any(p.requires_grad for p in model.parameters())


def test_training_is_deterministic_with_a_seed(digits_vit):
    outputs = []
    for _ in range(2):
        model = qk.quantize_(copy.deepcopy(digits_vit.model), qk.W4A8())
        qla.add_adapters(model, rank=4, example=digits_vit.test_x[:2])
        qla.train(model, digits_vit.model, [digits_vit.train_x[:64], digits_vit.train_x[64:128]], seed=3, progress=False)
        with torch.no_grad():
            outputs.append(model(digits_vit.test_x[:8]))
    assert torch.equal(outputs[0], outputs[1])


def test_bad_arguments():
    model, inputs = MODELS["vit_tiny"]()
    with pytest.raises(ValueError, match="rank must be a positive int"):
        qla.add_adapters(model, rank=0, example=inputs)
    with pytest.raises(ValueError, match="no QLA adapters"):
        qla.train(model, copy.deepcopy(model), [inputs])
    qla.add_adapters(model, rank=2, example=inputs)
    with pytest.raises(ValueError, match="already has QLA adapters"):
        qla.add_adapters(model, rank=2, example=inputs)
    swin, swin_inputs = MODELS["swin_tiny"]()
    with pytest.raises(ValueError, match="windowed"):
        qla.add_adapters(swin, example=swin_inputs)
    gpt2, gpt2_inputs = MODELS["gpt2"]()
    with pytest.raises(ValueError, match="causal"):
        qla.add_adapters(gpt2, example=gpt2_inputs)


def test_deep_copies_are_independent():
    model, inputs = MODELS["bert"]()
    qk.quantize_(model, qk.W8A8())
    qla.add_adapters(model, rank=4, example=inputs)
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        twin = copy.deepcopy(model)
        torch.nn.init.normal_(twin.encoder.layer[0].qla_ffn.up.weight)
        assert torch.equal(model(**inputs).last_hidden_state, before)
        assert not torch.equal(twin(**inputs).last_hidden_state, before)
