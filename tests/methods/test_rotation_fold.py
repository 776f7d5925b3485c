"""methods.rotation.fold_rotation: the residual stream of RMSNorm pre-norm decoders rotated in
the weights (QuaRot's fold), checked on models whose norm scales are not 1 (a fold that ignored
them would pass at initialization)."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods.rotation import fold_rotation
from qla_kernels.quant.hadamard import rotate

from ..conftest import decoder_config

transformers = pytest.importorskip("transformers")

# Hidden widths 48 = 12·4 and 64: a Paley factor and a power of two.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=96, vocab_size=100),
    "llama_tied": lambda: transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                                   tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=128, vocab_size=100),
    "gemma": lambda: decoder_config("gemma"),
    "phi3": lambda: decoder_config("phi3"),
}


def _decoder(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # trained-looking norm scales and biases
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand_like(parameter) + 0.5)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    return model, {"input_ids": torch.randint(1, 100, (2, 12))}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_folded_model_computes_the_same_and_carries_its_stream_rotated(kind):
    model, batch = _decoder(CONFIGS[kind]())
    original = copy.deepcopy(model)
    expected = _logits(model, batch)
    report = fold_rotation(model, batch)
    layers = model.model.layers
    assert report.blocks == [f"model.layers.{i}" for i in range(len(layers))]
    assert report.online == [f"model.layers.{i}.{part}" for i in range(len(layers))
                             for part in ("self_attn.o_proj", "mlp.down_proj")]
    actual = _logits(model, batch)
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-4 and report.max_error < 1e-4
    # The stream is h·R: the first block's input is the original's, rotated.
    seen = {}
    for m, key in ((original, "original"), (model, "folded")):
        handle = m.model.layers[0].register_forward_pre_hook(lambda module, args, key=key: seen.setdefault(key, args[0]))
        _logits(m, batch)
        handle.remove()
    torch.testing.assert_close(seen["folded"], rotate(seen["original"]), rtol=1e-4, atol=1e-5)
    if kind == "llama_tied":
        assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings


def test_a_folded_decoder_quantizes_rotating_only_the_output_projections_and_fuses():
    """W4A4 with online rotation on o_proj / down_proj only (the rest read the rotated stream):
    its fused blocks equal the module-by-module model and stay as close to fp as rotating every
    linear online."""
    from qla_kernels.models.fusion import fuse_blocks

    fp, batch = _decoder(CONFIGS["llama"]())
    reference = _logits(fp, batch)
    folded = copy.deepcopy(fp)
    report = fold_rotation(folded, batch)
    qk.quantize_(folded, qk.W8A8(rotate="hadamard"), filter_fn=lambda module, name: name in report.online)
    qk.quantize_(folded, qk.W8A8())
    rotating = {name for name, module in folded.named_modules()
                if isinstance(module, qk.QuantLinear) and module.config.rotate}
    assert rotating == set(report.online)
    expected = _logits(folded, batch)
    fusion = fuse_blocks(folded, batch)
    assert fusion.fused == report.blocks and not fusion.skipped
    fused = _logits(folded, batch)
    assert float((fused - expected).abs().max() / expected.abs().max()) < 1e-5
    online = qk.quantize_(copy.deepcopy(fp), qk.W8A8(rotate="hadamard"))
    cosine = lambda a: float(torch.nn.functional.cosine_similarity(a.flatten(), reference.flatten(), 0))  # noqa: E731
    assert cosine(fused) > 0.995 and cosine(_logits(online, batch)) > 0.995


def _gemma2():
    return transformers.Gemma2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16, intermediate_size=128, vocab_size=100)


@pytest.mark.parametrize("make, match", [
    (_gemma2, "norms of the hidden width besides its two pre-norms"),
    (lambda: decoder_config("gpt2"), "pre-norm with layernorm"),
    (lambda: transformers.LlamaConfig(hidden_size=52, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=100),
     "the hidden width=52 has no Hadamard rotation"),
], ids=["gemma2", "gpt2", "width52"])
def test_what_does_not_fold_is_a_value_error_and_leaves_the_model_as_it_was(make, match):
    model, batch = _decoder(make())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fold_rotation(model, batch)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())


def test_a_quantized_model_or_an_encoder_is_refused():
    model, batch = _decoder(CONFIGS["llama"]())
    qk.quantize_(model, qk.W8A8())
    with pytest.raises(ValueError, match="not an nn.Linear: fold the rotation before qk.quantize_"):
        fold_rotation(model, batch)
    encoder = transformers.BertModel(transformers.BertConfig(hidden_size=48, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=96,
                                                             vocab_size=100)).eval()
    with pytest.raises(ValueError, match="an input embedding and an LM head"):
        fold_rotation(encoder, {"input_ids": torch.randint(0, 100, (2, 8))})


@pytest.mark.parametrize("head_quantized", [False, True], ids=["fp_head", "quantized_head"])
def test_a_folded_tied_model_loads_back_exactly_or_is_refused(tmp_path, head_quantized):
    """The fold unties the LM head. Kept in floating point, the file holds two matrices that a
    tied skeleton would merge into one (a silent wrong model): loading refuses it, and an untied
    skeleton loads exactly. Quantized, the head has its own codes and any skeleton loads exactly."""
    model, batch = _decoder(CONFIGS["llama_tied"]())
    fold_rotation(model, batch)
    qk.quantize_(model, qk.W8A8(), filter_fn=None if head_quantized else lambda module, name: name != "lm_head")
    expected = _logits(model, batch)
    path = str(tmp_path / "folded.safetensors")
    qk.save_quantized(model, path)
    tied = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama_tied"]()).eval()
    if head_quantized:
        assert torch.equal(_logits(qk.load_quantized(tied, path), batch), expected)
        return
    state = copy.deepcopy(tied.state_dict())
    with pytest.raises(ValueError, match="ties .* build the skeleton untied"):
        qk.load_quantized(tied, path)
    assert all(torch.equal(value, tied.state_dict()[key]) for key, value in state.items())
    untied_config = CONFIGS["llama_tied"]()
    untied_config.tie_word_embeddings = False
    loaded = qk.load_quantized(transformers.AutoModelForCausalLM.from_config(untied_config).eval(), path)
    assert torch.equal(_logits(loaded, batch), expected)
