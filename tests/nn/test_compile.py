"""The ops are custom ops with fake twins, so torch.compile traces quantized layers and blocks
without graph breaks (fullgraph=True). aot_eager checks tracing and fake-tensor shapes without
spending CI minutes on code generation."""

import copy
import warnings

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods import qwt

from ..conftest import corrected_vit, first_call


def _assert_compiles_like_eager(module, *args, **kwargs):
    """`module` compiles without graph breaks and the compiled call returns its eager output."""
    expected = module(*args, **kwargs)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args, **kwargs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A8(group_size=32), qk.W4A16(group_size=32)], ids=str)
@pytest.mark.parametrize("backend", ["reference", "simulate"])
def test_quant_linear_compiles_without_graph_breaks(config, backend):
    layer = qk.QuantLinear.from_float(torch.nn.Linear(64, 32), config)
    x = torch.randn(2, 5, 64)
    with qk.use_backend(backend):
        _assert_compiles_like_eager(layer, x)


def test_quant_linear_compiles_with_inductor():
    """The one Inductor compile of the suite (its code generation costs seconds per graph): a
    quantized layer on the default backend, its custom ops kept as calls, equal to eager."""
    layer = qk.QuantLinear.from_float(torch.nn.Linear(64, 32), qk.W8A8())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-6, atol=1e-6)


def test_converted_layer_on_the_auto_backend_compiles_with_its_backend_as_a_constant():
    """The auto backend is a constant of the graph (dispatch._auto_backend): Dynamo does not trace
    the availability probes behind it (imports, the build record; torch 2.13's Dynamo fails on
    them, which is what vLLM's compiled CPU path runs)."""
    torch._dynamo.reset()
    layer = qk.QuantLinear.from_float(torch.nn.Linear(64, 32), qk.W8A8())
    layer.freeze()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_compiles_like_eager(layer, torch.randn(3, 64))
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_quantized_block_with_qwt_compiles_without_graph_breaks():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    qwt.calibrate(fp, model, [torch.randn(8, 3, 32, 32) for _ in range(4)], progress=False)
    block = model.blocks[0]
    x = torch.randn(2, 17, 192)
    with torch.no_grad():
        _assert_compiles_like_eager(block, x)


@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A4()], ids=str)
def test_fused_block_compiles_without_graph_breaks(config):
    """The whole fused chain (pre-kernels, GEMMs with GELU + requantization, SDPA) in one graph."""
    timm = pytest.importorskip("timm")
    from qla_kernels.models import fuse_blocks

    torch.manual_seed(0)
    model = qk.quantize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                           depth=2).eval(), config)
    assert fuse_blocks(model, torch.randn(2, 3, 32, 32)).fused
    block, x = model.blocks[0], torch.randn(2, 17, 192)
    with torch.no_grad():
        _assert_compiles_like_eager(block, x)


def test_fused_post_norm_block_compiles_without_graph_breaks():
    transformers = pytest.importorskip("transformers")
    from qla_kernels.models import fuse_blocks

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    model = qk.quantize_(transformers.AutoModel.from_config(config).eval(), qk.W8A8())
    assert fuse_blocks(model, {"input_ids": torch.randint(0, 100, (2, 8))}).fused
    layer, x = model.encoder.layer[0], torch.randn(2, 8, 64)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :, 6:] = False
    with torch.no_grad():
        _assert_compiles_like_eager(layer, x, mask)


@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A16(group_size=32)], ids=str)
def test_fused_decoder_block_compiles_without_graph_breaks(config):
    """LLaMA: argument binding, packed q/k/v handed over to the model's own attention (rotary
    embeddings), the residual handed to its output projection, packed SwiGLU, in one graph."""
    transformers = pytest.importorskip("transformers")
    from qla_kernels.models import fuse_blocks

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    model = qk.quantize_(transformers.LlamaForCausalLM(llama).eval(), config)
    batch = {"input_ids": torch.randint(0, 100, (2, 9))}
    assert fuse_blocks(model, batch).fused
    layer = model.model.layers[0]
    args, kwargs = first_call(model, layer, batch)
    torch._dynamo.reset()  # the other config's graph of this forward would make this one a dynamic-shape recompile
    with torch.no_grad():
        _assert_compiles_like_eager(layer, *args, **kwargs)


def test_fused_windowed_block_compiles_without_graph_breaks():
    """Swin: window row maps, the relative-position bias + shift mask and the scatter back to
    spatial rows in one graph."""
    timm = pytest.importorskip("timm")
    from qla_kernels.models import fuse_blocks

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(72, 40), window_size=4,
                              depths=(2,), num_heads=(2,), embed_dim=32).eval()
    model = qk.quantize_(model, qk.W8A8())
    assert len(fuse_blocks(model, torch.randn(1, 3, 72, 40)).fused) == 2
    block, x = model.layers[0].blocks[1], torch.randn(2, 18, 10, 32)  # shifted, padded windows
    with torch.no_grad():
        _assert_compiles_like_eager(block, x)


def test_fused_layer_scale_block_compiles_without_graph_breaks():
    """HF DINOv2: LayerScale γ handed to the model's own attention output projection with the
    residual, and folded into fc2, in one graph."""
    transformers = pytest.importorskip("transformers")
    from qla_kernels.models import fuse_blocks

    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=64,
                                                               num_hidden_layers=2, num_attention_heads=4)).eval()
    model = qk.quantize_(model, qk.W8A8())
    assert fuse_blocks(model, {"pixel_values": torch.randn(1, 3, 32, 32)}).fused
    layer, x = model.encoder.layer[0], torch.randn(2, 17, 64)
    with torch.no_grad():
        _assert_compiles_like_eager(layer, x)


def test_fused_mlp_compiles_without_graph_breaks():
    """A block no template fits (a scale on its branch that is not a per-channel LayerScale) still
    fuses its MLP."""
    timm = pytest.importorskip("timm")
    from qla_kernels.models import fuse_blocks

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              init_values=0.1).eval()
    for block in model.blocks:
        block.ls1.gamma = torch.nn.Parameter(torch.ones(1, 192))
    model = qk.quantize_(model, qk.W8A8())
    assert fuse_blocks(model, torch.randn(1, 3, 32, 32)).fused_mlps
    mlp, h = model.blocks[0].mlp, torch.randn(2, 17, 192)
    with torch.no_grad():
        _assert_compiles_like_eager(mlp, h)


def test_block_handing_tensors_over_in_its_forward_scope_compiles_without_graph_breaks():
    """Lowered QwT and QLA hand their T inputs from hooks to the GEMMs through the block's forward
    scope (nn/forward_context.py): thread-local reads and writes that trace into one graph."""
    pytest.importorskip("timm")
    model = corrected_vit()[1]
    block, x = model.blocks[0], torch.randn(2, 17, 192)
    with torch.no_grad():
        _assert_compiles_like_eager(block, x)


@pytest.mark.parametrize("fused", [False, True], ids=["linears", "fused"])
def test_converted_model_compiles_without_graph_breaks(fused):
    """The runtime form (convert_for_runtime): frozen plans read as module attributes, the custom
    ops called (not their eager bodies) while tracing."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    model = qk.quantize_(transformers.LlamaForCausalLM(llama).eval(), qk.W8A8())
    batch = {"input_ids": torch.randint(0, 100, (2, 9))}
    qk.convert_for_runtime(model, batch if fused else None)
    layer = model.model.layers[0]
    args, kwargs = first_call(model, layer, batch)
    torch._dynamo.reset()
    with torch.no_grad():
        _assert_compiles_like_eager(layer, *args, **kwargs)
