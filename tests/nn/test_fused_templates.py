"""Each fused chain on its own (nn/fused/): a block fused with a template written out by hand
(no structure discovery) computes what its modules compute, in the calibration form and frozen.

Where the chain performs the same integer ops on the same values as the modules (the MLP alone:
no norm in front of its quantization), it is compared exactly; where a pre-kernel's norm stands
in for torch's (whose fp order differs), up to re-rounded codes, against the fp block's error."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels.nn import fused

from ..conftest import assert_same_up_to_rerounding, first_call

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

CONFIGS = [qk.W8A8(), qk.W4A8(group_size=32), qk.W4A4()]


def _primary(output):
    return output[0] if isinstance(output, tuple) else output


def _fused_and_frozen(block, fuse, *args, **kwargs):
    """(module-by-module output, fused output, frozen output) of `block` on the call."""
    with torch.no_grad():
        expected = _primary(block(*args, **kwargs))
        fuse(block)
        assert not block.why_not_fused(args[0], args[1:], kwargs)
        calibration = _primary(block(*args, **kwargs))
        for layer in block.modules():
            if isinstance(layer, qk.QuantLinear):
                layer.freeze()
        block.freeze()
        frozen = _primary(block(*args, **kwargs))
    return expected, calibration, frozen


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_fused_mlp_is_exact(config):
    """On the reference, whose epilogue GELU is torch's: the chain computes what the layers do.
    (The CPU kernels' GELU differs from torch's by ulps: tests/ops/test_cpu.py bounds it.)"""
    with qk.use_backend("reference"):
        _fused_mlp_is_exact(config)


def _fused_mlp_is_exact(config):
    fp = timm.layers.Mlp(64, 128, act_layer=torch.nn.GELU).eval()
    mlp = qk.quantize_(copy.deepcopy(fp), config)
    h = torch.randn(3, 7, 64)
    expected, calibration, frozen = _fused_and_frozen(
        mlp, lambda m: fused.fuse_mlp(m, fused.MLPTemplate("fc1", "fc2", "gelu")), h)
    assert torch.equal(calibration, expected) and torch.equal(frozen, expected)


def _vit_block():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             init_values=0.5).blocks[0].eval()


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_packed_qkv_chain_with_layer_scales(config):
    fp = _vit_block()
    block = qk.quantize_(copy.deepcopy(fp), config)
    template = fused.PackedQKVTemplate("norm1", "attn", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2", "gelu",
                                       attention_scale="ls1", mlp_scale="ls2")
    x = torch.randn(2, 17, 192)
    expected, calibration, frozen = _fused_and_frozen(block, lambda b: fused.fuse_block(b, template), x)
    with torch.no_grad():
        reference = fp(x)
    assert_same_up_to_rerounding(reference, expected, calibration)
    assert torch.equal(frozen, calibration)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_post_norm_chain_with_a_padding_mask(config):
    torch.manual_seed(0)
    bert = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=100)
    fp = transformers.BertModel(bert).encoder.layer[0].eval()
    block = qk.quantize_(copy.deepcopy(fp), config)
    template = fused.PostNormTemplate("attention.self", "attention.self.query", "attention.self.key",
                                      "attention.self.value", "attention.output.dense", "attention.output.LayerNorm",
                                      "intermediate.dense", "output.dense", "output.LayerNorm", "gelu", packed_qkv=True)
    x, mask = torch.randn(2, 9, 64), torch.zeros(2, 1, 9, 9)
    mask[1, :, :, 6:] = torch.finfo(torch.float32).min

    def fuse(b):
        fused.fuse_block(b, template)
        b._qla_returns_tuple = isinstance(fp(x, mask), tuple)

    expected, calibration, frozen = _fused_and_frozen(block, fuse, x, mask)
    with torch.no_grad():
        reference = _primary(fp(x, mask))
    assert_same_up_to_rerounding(reference, expected, calibration)
    assert torch.equal(frozen, calibration)


@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A16(group_size=32)], ids=str)
def test_model_attention_chain_hands_packed_qkv_to_the_models_attention(config):
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    fp = transformers.LlamaForCausalLM(llama).eval()
    model = qk.quantize_(copy.deepcopy(fp), config)
    layer = model.model.layers[0]
    args, kwargs = first_call(model, layer, {"input_ids": torch.randint(0, 100, (2, 7))})
    template = fused.ModelAttentionTemplate(
        "input_layernorm", "self_attn", "self_attn.o_proj", "post_attention_layernorm",
        ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "swiglu", packed_mlp_inputs=True,
        packed_attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    expected, calibration, frozen = _fused_and_frozen(layer, lambda b: fused.fuse_block(b, template), *args, **kwargs)
    with torch.no_grad():
        reference = _primary(fp.model.layers[0](*args, **kwargs))
    assert_same_up_to_rerounding(reference, expected, calibration)
    assert torch.equal(frozen, calibration)
