"""The whole pipeline on architectures the templates were not written for (random-init configs):
quantize_ → PTQ → QwT → QLA (add, train, save/load, lower) → QwT lowering → fuse_blocks, and
convert_for_runtime. Every step either works or raises a ValueError that says why; fusing never
changes the output, converting changes no bit of it; and the
families marked below fuse (freshly quantized) at least one block, the others report why not."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods import ptq, qla, qwt
from qla_kernels.models.batches import model_output, run_model

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _timm(name, size, **kwargs):
    return lambda: (timm.create_model(name, pretrained=False, **kwargs), torch.randn(4, 3, size, size))


def _hf_text(config, model="AutoModel", **kwargs):
    def build():
        configuration = getattr(transformers, config)(vocab_size=100, **kwargs)
        return getattr(transformers, model).from_config(configuration), {"input_ids": torch.randint(1, 100, (4, 12))}
    return build


def _hf_vision(config, model, **kwargs):
    return lambda: (getattr(transformers, model)(getattr(transformers, config)(**kwargs)),
                    {"pixel_values": torch.randn(4, 3, 32, 32)})


# name: (builder, whether at least one block fuses)
ARCHITECTURES = {
    "deit3": (_timm("deit3_small_patch16_224", 32, img_size=32, depth=2), True),
    "dinov2_timm": (_timm("vit_small_patch14_dinov2", 32, img_size=32, patch_size=8, depth=2), True),
    "beit": (_timm("beit_base_patch16_224", 32, img_size=32, depth=2), False),
    "cait": (_timm("cait_xxs24_224", 32, img_size=32, depth=2), False),
    "pvt_v2": (_timm("pvt_v2_b0", 64), False),
    "hf_vit": (_hf_vision("ViTConfig", "ViTModel", image_size=32, patch_size=8, **SIZES), True),
    "clip_vision": (_hf_vision("CLIPVisionConfig", "CLIPVisionModel", image_size=32, patch_size=8, **SIZES), True),
    "dinov2": (_hf_vision("Dinov2Config", "Dinov2Model", image_size=32, patch_size=8, hidden_size=64,
                          num_hidden_layers=2, num_attention_heads=4), True),
    "electra": (_hf_text("ElectraConfig", embedding_size=64, **SIZES), True),
    "mpnet": (_hf_text("MPNetConfig", **SIZES), False),
    "qwen2": (_hf_text("Qwen2Config", "AutoModelForCausalLM", num_key_value_heads=2, **SIZES), True),
    "bloom": (_hf_text("BloomConfig", "AutoModelForCausalLM", hidden_size=64, n_layer=2, n_head=4), False),
    "gptj": (_hf_text("GPTJConfig", "AutoModelForCausalLM", n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                      bos_token_id=0, eos_token_id=0), False),
}


def _output(model, batch):
    with torch.no_grad():
        return model_output(run_model(model, batch)).float()


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_pipeline_works_or_says_why(name, tmp_path):
    build, fuses = ARCHITECTURES[name]
    torch.manual_seed(0)
    fp, batch = build()
    fp.eval()
    reference = _output(fp, batch)
    skeleton = copy.deepcopy(fp)
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    assert _cosine(reference, _output(model, batch)) > 0.99
    ptq.calibrate(model, [batch], progress=False)
    qwt.calibrate(fp, model, [batch], progress=False)
    example = {key: value[:2] for key, value in batch.items()} if isinstance(batch, dict) else batch[:2]
    try:
        qla.add_adapters(model, rank=4, example=example)
    except ValueError:  # what does not fit QLA's placement is named (GPT-J's parallel attention and MLP)
        adapted = False
    else:
        adapted = True
        qla.train(model, fp, [batch], progress=False)
    path = str(tmp_path / "model.safetensors")
    qk.save_quantized(model, path)
    assert torch.equal(_output(qk.load_quantized(skeleton, path), batch), _output(model, batch))
    if adapted:
        try:
            qla.fuse(model)
        except ValueError as reason:  # an output linear left in floating point (Bloom)
            assert "not a QuantLinear" in str(reason)
    try:
        qwt.lower(model, example)
    except ValueError:  # a LayerScale or an fp linear after the block's last GEMM
        pass
    before = _output(model, batch)
    runtime = copy.deepcopy(model)
    report = qk.fuse_blocks(model, example)
    assert all(report.skipped.values())  # every block that does not fuse says why
    fused = _output(model, batch)
    assert _cosine(before, fused) > 0.9999
    # The runtime form runs the same ops on frozen operands: bit for bit the calibration form's.
    assert qk.convert_for_runtime(runtime, example).fusion.fused == report.fused
    assert torch.equal(_output(runtime, batch), fused)
    plain = qk.quantize_(copy.deepcopy(fp), qk.W8A8())  # which blocks fuse is the structure's doing
    report = qk.fuse_blocks(plain, example)
    assert bool(report.fused) == fuses, report.skipped
