"""Hugging Face transformers: a qla model through save_pretrained / from_pretrained (integrations/)."""

import copy
import json
import os

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods import qla, qwt
from tests.conftest import randomize_adapters, sqnr_db

transformers = pytest.importorskip("transformers")

CONFIGS = [qk.W8A8(), qk.W4A8(), qk.W4A16(group_size=32)]


def _fp_model(kind):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=100)
        return transformers.BertModel(config).eval(), {"input_ids": torch.randint(0, 100, (2, 9))}
    if kind == "gpt2":  # Conv1D linears, lm_head tied to the embedding
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval(), {"input_ids": torch.randint(0, 100, (2, 9))}
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        return transformers.LlamaForCausalLM(config).eval(), {"input_ids": torch.randint(0, 100, (2, 9))}
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8)
    return transformers.ViTModel(config).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


def _output(model, batch):
    with torch.no_grad():
        return model(**batch)[0]


def _corrected(kind, config, adapters=True):
    """(quantized model with a QwT compensation and trained-looking QLA adapters, its batch)."""
    fp, batch = _fp_model(kind)
    model = qk.quantize_(copy.deepcopy(fp), config)
    calibration = [{key: torch.roll(value, shifts, 0) if key == "input_ids" else torch.randn_like(value)
                    for key, value in batch.items()} for shifts in range(3)]
    qwt.calibrate(fp, model, calibration, progress=False)
    if adapters:
        qla.add_adapters(model, rank=4, example=batch)
        randomize_adapters(model)
    return model, batch


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_save_pretrained_then_from_pretrained_is_bit_exact(tmp_path, kind, config):
    model, batch = _corrected(kind, config)
    expected = _output(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qla" and len(saved["layout"]["qla_kernels.quant_linears"]) == sum(
        isinstance(module, qk.QuantLinear) for module in model.modules())
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(_output(loaded, batch), expected)
    layers = [module for module in loaded.modules() if isinstance(module, qk.QuantLinear)]
    assert layers and all(layer.runtime_plan is not None for layer in layers)  # loading converts for runtime
    assert len(list(qwt.compensated_blocks(loaded))) == 2 and loaded._qla_block_names == model._qla_block_names
    assert torch.equal(_output(qk.load_pretrained(str(tmp_path)), batch), expected)


def test_sharded_save_loads_and_keeps_fp32_scales_under_another_dtype(tmp_path):
    model, batch = _corrected("bert", qk.W8A8())
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = [name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(_output(transformers.AutoModel.from_pretrained(tmp_path), batch), _output(model, batch))
    calibration_form = qk.load_pretrained(str(tmp_path), runtime_form=False)
    assert all(module.runtime_plan is None for module in calibration_form.modules() if isinstance(module, qk.QuantLinear))
    assert torch.equal(_output(calibration_form, batch), _output(model, batch))
    half = transformers.AutoModel.from_pretrained(tmp_path, dtype=torch.float16)
    query = half.encoder.layer[0].attention.self.query
    assert query.weight_scale.dtype == torch.float32 and query.bias.dtype == torch.float16
    assert sqnr_db(_output(model, batch), _output(half, batch).float()) > 30  # fp16 rounding, same model


def test_accelerate_device_maps_load_and_run(tmp_path):
    pytest.importorskip("accelerate")
    model, batch = _corrected("bert", qk.W8A8(), adapters=False)
    expected = _output(model, batch)
    model.save_pretrained(tmp_path / "model")
    on_cpu = transformers.AutoModel.from_pretrained(tmp_path / "model", device_map="cpu")
    assert torch.equal(_output(on_cpu, batch), expected)
    device_map = {"embeddings": "cpu", "encoder.layer.0": "disk", "encoder.layer.1": "cpu", "pooler": "cpu"}
    offloaded = transformers.AutoModel.from_pretrained(tmp_path / "model", device_map=device_map,
                                                       offload_folder=str(tmp_path / "offload"), offload_buffers=True)
    query = offloaded.encoder.layer[0].attention.self.query
    assert query.weight.is_meta and query.runtime_plan is None  # moved in per call: the calibration form
    assert torch.equal(_output(offloaded, batch), expected)
    adapted, _ = _corrected("bert", qk.W8A8())
    adapted.save_pretrained(tmp_path / "adapted")
    for options in ({"device_map": device_map}, {"device_map": "auto", "max_memory": {"cpu": "60KB"}}):
        loaded = transformers.AutoModel.from_pretrained(tmp_path / "adapted", offload_folder=str(tmp_path / "offload2"),
                                                        **options)
        assert any(p.is_meta for name, p in loaded.named_parameters() if "qla_" in name)  # offloaded adapters run
        assert torch.equal(_output(loaded, batch), _output(adapted, batch))


def test_a_directory_loaded_without_the_qla_method_is_refused(tmp_path, monkeypatch):
    from transformers.quantizers import auto

    model, batch = _corrected("bert", qk.W8A8())
    model.save_pretrained(tmp_path)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "qla")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "qla")
    silently_fp = transformers.AutoModel.from_pretrained(tmp_path)  # transformers only logs a warning
    assert not any(isinstance(module, qk.QuantLinear) for module in silently_fp.modules())
    with pytest.raises(ValueError, match="loaded without its quantization .*13 of 13 QuantLinears missing"):
        qk.load_pretrained(str(tmp_path))


def test_load_pretrained_refuses_a_directory_that_is_not_a_qla_model(tmp_path):
    fp, _ = _fp_model("bert")
    fp.save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match="is not a qla model"):
        qk.load_pretrained(str(tmp_path / "fp"))
    with pytest.raises(ValueError, match="is not a saved Hugging Face model directory"):
        qk.load_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pre-quantized"):  # quantizing at load needs calibration data
        from qla_kernels.integrations.transformers import QlaConfig
        transformers.AutoModel.from_pretrained(tmp_path / "fp", quantization_config=QlaConfig())


def _edit_layout(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"]["layout"]["qla_kernels.quant_linears"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (lambda layers: layers["encoder.layer.0.attention.self.query"].update(buffers=["input_scale"]),
     "lacks 'encoder.layer.0.attention.self.query.input_scale'"),
    (lambda layers: layers["encoder.layer.0.output.dense"].update(config={"name": "W4A8", "group_size": None}),
     "'encoder.layer.0.output.dense.weight' has shape \\(64, 128\\), the model expects \\(64, 64\\)"),
    (lambda layers: layers["encoder.layer.1.intermediate.dense"].update(in_features=32),
     "is 128×64 \\(out × in\\) in the model, 128×32 in the file"),
    (lambda layers: layers.pop("pooler.dense"), "has 'pooler.dense.weight_scale', which the model does not"),
], ids=["missing buffer", "other format", "other shape", "layer left out"])
def test_a_checkpoint_that_does_not_fit_its_layout_is_a_value_error_before_loading(tmp_path, edit, message):
    model, _ = _corrected("bert", qk.W8A8())
    model.save_pretrained(tmp_path)
    _edit_layout(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        transformers.AutoModel.from_pretrained(tmp_path)


def test_head_and_base_models_load_each_others_checkpoints(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100, num_labels=3)
    classifier = qk.quantize_(transformers.BertForSequenceClassification(config).eval(), qk.W8A8())
    batch = {"input_ids": torch.randint(0, 100, (2, 9))}
    classifier.save_pretrained(tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path)  # the classifier's head is left out
    assert torch.equal(_output(base, batch), _output(classifier.bert, batch))
    assert sum(isinstance(module, qk.QuantLinear) for module in base.modules()) == 13


def test_tie_weights_keeps_a_quantized_lm_head(tmp_path):
    model, batch = _corrected("gpt2", qk.W8A8(), adapters=False)
    expected = _output(model, batch)
    model.save_pretrained(tmp_path)
    for tied in (model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path)):
        tied.tie_weights()  # resize_token_embeddings and others call it: it must not put the embedding back
        assert isinstance(tied.lm_head, qk.QuantLinear) and not tied.config.tie_word_embeddings
        assert torch.equal(_output(tied, batch), expected)
