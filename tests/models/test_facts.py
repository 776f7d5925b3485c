import pytest
import torch
from torch import nn

import qla_kernels as qk
from qla_kernels.models.blocks import find_blocks
from qla_kernels.models.facts import describe

from ..nn.test_quantize_models import MODELS

EXPECTED = {
    # name: (blocks, norm kind, position, mlp, attention inputs, attention output, mlp inputs, mlp output, layout, prefix)
    "vit_tiny": (12, "layernorm", "pre", "gelu_mlp", ("attn.qkv",), "attn.proj", ("mlp.fc1",), "mlp.fc2", "sequence", 1),
    "deit_tiny": (12, "layernorm", "pre", "gelu_mlp", ("attn.qkv",), "attn.proj", ("mlp.fc1",), "mlp.fc2", "sequence", 1),
    "swin_tiny": (12, "layernorm", "pre", "gelu_mlp", ("attn.qkv",), "attn.proj", ("mlp.fc1",), "mlp.fc2", "grid", 0),
    "bert": (2, "layernorm", "post", "gelu_mlp", ("attention.self.query", "attention.self.key", "attention.self.value"),
             "attention.output.dense", ("intermediate.dense",), "output.dense", "sequence", 0),
    "gpt2": (2, "layernorm", "pre", "gelu_mlp", ("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj", "sequence", 0),
    "llama": (2, "rmsnorm", "pre", "swiglu", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "sequence", 0),
}


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("quantized", [False, True])
def test_facts_read_off_the_structure(name, quantized):
    model, inputs = MODELS[name]()
    if quantized:
        qk.quantize_(model, qk.W8A8())
    facts = describe(model, inputs)
    blocks, norm, position, mlp, attn_in, attn_out, mlp_in, mlp_out, layout, prefix = EXPECTED[name]
    block = facts.block
    assert len(facts.blocks) == blocks
    assert (block.norm_kind, block.norm_position, block.mlp_kind) == (norm, position, mlp)
    assert (block.attention_inputs, block.attention_output) == (attn_in, attn_out)
    assert (block.mlp_inputs, block.mlp_output) == (mlp_in, mlp_out)
    assert (facts.token_layout, facts.prefix_tokens) == (layout, prefix)


def test_token_layout_of_vision_models():
    timm = pytest.importorskip("timm")
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    facts = describe(distilled, torch.randn(1, 3, 224, 224))
    assert facts.prefix_tokens == 2 and facts.grid == (14, 14)
    registers = timm.create_model("vit_small_patch16_224", pretrained=False, reg_tokens=4, img_size=(64, 96)).eval()
    facts = describe(registers, torch.randn(1, 3, 64, 96))
    assert facts.prefix_tokens == 5 and facts.grid == (4, 6)
    swin, inputs = MODELS["swin_tiny"]()
    assert describe(swin, inputs).grid == (56, 56)
    # CaiT's self-attention blocks run before its class token joins (num_prefix_tokens says 1)
    cait = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, depth=2).eval()
    facts = describe(cait, torch.randn(1, 3, 32, 32))
    assert facts.prefix_tokens == 0 and facts.grid == (2, 2)
    # Hugging Face vision models: the grid is the patch embedding's output (class + register tokens before it)
    transformers = pytest.importorskip("transformers")
    hf_vit = transformers.ViTModel(transformers.ViTConfig(image_size=(32, 48), patch_size=8, hidden_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4)).eval()
    facts = describe(hf_vit, {"pixel_values": torch.randn(1, 3, 32, 48)})
    assert (facts.grid, facts.prefix_tokens) == ((4, 6), 1)
    registers = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_register_tokens=4)).eval()
    facts = describe(registers, {"pixel_values": torch.randn(1, 3, 32, 32)})
    assert (facts.grid, facts.prefix_tokens) == ((4, 4), 5)
    pvt = timm.create_model("pvt_v2_b0", pretrained=False).eval()  # stages see different token counts
    assert describe(pvt, torch.randn(1, 3, 64, 64)).grid is None
    dynamic = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match="pass an example at the model's image size"):
        describe(dynamic, torch.randn(1, 3, 48, 48))


def test_attention_linears_are_told_from_reduced_key_values_and_parallel_mlps():
    """PVT-v2's key/value linear reads spatially reduced tokens and is twice as wide: the output
    projection is the next linear at the block's width. GPT-J runs its MLP beside the attention
    from the same norm: its fc_in is not an attention input, and the missing norm is named."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    pvt = timm.create_model("pvt_v2_b0", pretrained=False).eval()
    block = describe(pvt, torch.randn(1, 3, 64, 64)).block
    assert (block.attention_inputs, block.attention_output) == (("attn.q",), "attn.proj")
    assert (block.mlp_inputs, block.mlp_output) == (("mlp.fc1",), "mlp.fc2")
    gptj = transformers.AutoModelForCausalLM.from_config(transformers.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, vocab_size=100, rotary_dim=8, bos_token_id=0, eos_token_id=0)).eval()
    with pytest.raises(ValueError, match="no norm between the attention output 'attn.out_proj' and the MLP"):
        describe(gptj, {"input_ids": torch.randint(0, 100, (1, 6))})


class _MLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_unknown_architectures_name_what_is_missing():
    with pytest.raises(ValueError, match="no repeated blocks found"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(4, 4, 1)))
    model = nn.Sequential(nn.Sequential(_MLPBlock(), _MLPBlock()))
    with pytest.raises(ValueError, match=r"expected attention and MLP linears \(at least 4\), found 2"):
        describe(model, torch.randn(2, 8))


@pytest.mark.parametrize("name, kwargs, shape", [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2), (1, 3, 32, 32)),
    ("deit_tiny_patch16_224", dict(img_size=48, in_chans=1, depth=2), (1, 1, 48, 48)),
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(2, 4),
                                          embed_dim=32), (1, 3, 64, 64)),
    ("resmlp_12_224", dict(img_size=32), (1, 3, 32, 32)),
    ("vit_small_patch14_dinov2", dict(img_size=28, depth=2), (1, 3, 28, 28)),
    ("resnet18", dict(in_chans=2), (1, 2, 224, 224)),
])
def test_example_input_is_built_from_the_model(name, kwargs, shape):
    """A timm model built at another size or channel count than its pretrained_cfg says: the
    example comes from the model itself, and everything that probes without example= runs."""
    timm = pytest.importorskip("timm")
    from qla_kernels.methods import qla
    from qla_kernels.models.facts import example_input

    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    example = example_input(model)
    assert tuple(example.shape) == shape
    with torch.no_grad():
        model(example)
    if name.startswith(("vit", "deit", "swin")):
        qla.add_adapters(qk.quantize_(model, qk.W8A8()), rank=4)


def test_example_input_of_hugging_face_models():
    transformers = pytest.importorskip("transformers")
    from qla_kernels.models.facts import example_input

    vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, num_channels=2, hidden_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64)).eval()
    assert tuple(example_input(vit).shape) == (1, 2, 32, 32)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64))
    assert set(example_input(bert)) == {"input_ids"}
    with pytest.raises(ValueError, match="pass example="):
        example_input(nn.Sequential(nn.Linear(4, 4)))
