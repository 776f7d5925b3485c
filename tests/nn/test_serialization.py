import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import qla_kernels as qk


def _model():
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False), nn.LayerNorm(32))


@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A4(), qk.W4A8(), qk.W4A8(group_size=32), qk.W4A16(group_size=32)], ids=str)
def test_round_trip_is_bit_exact(tmp_path, config):
    torch.manual_seed(0)
    fp = _model()
    quantized = qk.quantize_(copy.deepcopy(fp), config)
    path = str(tmp_path / "model.safetensors")
    qk.save_quantized(quantized, path)
    loaded = qk.load_quantized(_model(), path)
    saved, restored = quantized.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name in saved:
        assert saved[name].dtype == restored[name].dtype and torch.equal(saved[name], restored[name]), name
    assert repr(loaded) == repr(quantized)
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), quantized(x))


def test_static_activation_and_zero_point_survive(tmp_path):
    quantized = qk.quantize_(_model(), qk.W8A8())
    quantized[0].set_static_activation(0.05, -12)
    path = str(tmp_path / "model.safetensors")
    qk.save_quantized(quantized, path)
    loaded = qk.load_quantized(_model(), path)
    assert torch.equal(loaded[0].input_zero_point, torch.tensor([-12], dtype=torch.int8))
    assert torch.equal(loaded[0].weight_colsum, quantized[0].weight_colsum)
    assert loaded[2].input_scale is None
    x = torch.rand(4, 64)
    assert torch.equal(loaded(x), quantized(x))


def test_file_is_safetensors_with_format_metadata(tmp_path):
    path = str(tmp_path / "model.safetensors")
    qk.save_quantized(qk.quantize_(_model(), qk.W4A16(group_size=32)), path)
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata()
        assert handle.get_tensor("0.weight").dtype == torch.uint8
    layers = json.loads(header["qla_kernels.quant_linears"])
    assert layers["0"]["config"] == {"name": "W4A16", "group_size": 32}


def test_tied_weights_are_stored_once(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    qk.quantize_(model, qk.W8A8(), filter_fn=lambda m, fqn: fqn != "lm_head")
    assert model.lm_head.weight is model.transformer.wte.weight
    path = str(tmp_path / "gpt2.safetensors")
    qk.save_quantized(model, path)
    loaded = qk.load_quantized(transformers.AutoModelForCausalLM.from_config(config).eval(), path)
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_wrong_skeleton_is_an_error(tmp_path):
    path = str(tmp_path / "model.safetensors")
    qk.save_quantized(qk.quantize_(_model(), qk.W8A8()), path)
    with pytest.raises(ValueError, match="has no module '2'"):
        qk.load_quantized(nn.Sequential(nn.Linear(64, 96)), path)
    with pytest.raises(ValueError, match="is a GELU, not a linear layer"):
        qk.load_quantized(nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.GELU(), nn.LayerNorm(32)), path)


def test_foreign_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "plain.safetensors")
    save_file({"0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a qla_kernels checkpoint"):
        qk.load_quantized(_model(), path)


def test_qwt_compensations_round_trip(tmp_path):
    """A quantized model with QwT compensations (pre-norm ViT: after the block; post-norm BERT:
    before the output LayerNorm; one truncated to low rank) saves and loads bit-exactly."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from qla_kernels.methods import qwt
    from qla_kernels.nn.compensation import attach, compensated_blocks

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    quantized = qk.quantize_(copy.deepcopy(vit), qk.W4A8())
    qwt.calibrate(vit, quantized, [torch.randn(8, 3, 32, 32) for _ in range(4)], progress=False)
    name, block = next(compensated_blocks(quantized))
    attach(block, block.qwt.truncated(0.9)[0])
    path = str(tmp_path / "vit.safetensors")
    qk.save_quantized(quantized, path)
    skeleton = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    loaded = qk.load_quantized(skeleton, path)
    assert [n for n, _ in compensated_blocks(loaded)] == [n for n, _ in compensated_blocks(quantized)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))

    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    bert = transformers.AutoModel.from_config(config).eval()
    bert_q = qk.quantize_(copy.deepcopy(bert), qk.W4A8())
    batches = [{"input_ids": torch.randint(0, 100, (8, 16))} for _ in range(4)]
    qwt.calibrate(bert, bert_q, batches, progress=False)
    assert all(block.qwt.output_norm == "output.LayerNorm" for _, block in compensated_blocks(bert_q))
    path = str(tmp_path / "bert.safetensors")
    qk.save_quantized(bert_q, path)
    loaded = qk.load_quantized(transformers.AutoModel.from_config(config).eval(), path)
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, bert_q(ids).last_hidden_state)
