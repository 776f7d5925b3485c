"""What models launch on the Triton backend is in the ahead-of-time launch table
(benchmarks/results/aot_launch_table.json, written by `make aot-check`): small models of the
table's families, converted by the table's own steps, run in the interpreter, and every launch
they make must match a launch of the table in all but sizes and tiles (`launch_class`). A new
epilogue, flag combination or pointer dtype that a fused chain starts to launch fails here until
the table covers it (and `make aot-check` has compiled it)."""

import pytest
import torch

import qla_kernels as qk
from qla_kernels import launch_table
from qla_kernels.launch_table import ModelSpec
from qla_kernels.ops.triton.kernel_launch import launch_class, recording

pytestmark = pytest.mark.skipif(not qk.backends()["triton"].available, reason=str(qk.backends()["triton"]))
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _small(name):
    torch.manual_seed(0)
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    if name == "swin":
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                                 depths=(2, 2), num_heads=(2, 4), embed_dim=32)
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                              intermediate_size=128, vocab_size=100))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                                    n_positions=64, bos_token_id=0, eos_token_id=0))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100))
    if name == "resnet":  # the interpreter is slow: ResNet-18 (two blocks per stage, found as repeated modules)
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    if name == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8))
    raise ValueError(name)


SPECS = {
    "vit": ModelSpec("vit", (1, 3, 32, 32), ((2, 3, 32, 32),)),
    "swin": ModelSpec("swin", (1, 3, 64, 64), ((2, 3, 64, 64),)),
    "bert": ModelSpec("bert", (1, 8), ((2, 8),), text=True, vocab=100),
    "gpt2": ModelSpec("gpt2", (1, 8), ((2, 8),), text=True, vocab=100),
    "llama": ModelSpec("llama", (1, 8), ((2, 8), (1, 1)), text=True, vocab=100),
    "clip": ModelSpec("clip", (1, 3, 32, 32), ((2, 3, 32, 32),)),
    "resnet": ModelSpec("resnet", (1, 3, 32, 32), ((2, 3, 32, 32),), cnn=True),  # M > 1 at its last stage
}


@pytest.mark.parametrize("name, config, scales, corrections", [
    ("vit", "W8A8", "dynamic", "qla_qwt128"),
    ("vit", "W4A4", "static_zero", "qwt_full"),
    ("swin", "W8A8", "static", "qla_qwt24"),
    ("bert", "W8A8", "static_zero", "qla_qwt128"),
    ("gpt2", "W4A8", "dynamic", "qwt48"),
    ("llama", "W4A16g128", "dynamic", "qla_qwt128"),
    ("llama", "W4A8g128", "dynamic", "none"),
    ("clip", "W8A8", "dynamic", "none"),
    ("resnet", "W8A8", "static_zero", "qwt_conv"),  # (W4A4 dynamic: the CI plan of ResNet-50, 40 s less here)
])
def test_what_a_model_launches_is_in_the_launch_table(name, config, scales, corrections):
    classes = set(launch_table.read_table()["classes"])
    spec = SPECS[name]
    model_fp = _small(name).eval()
    model = launch_table.convert(spec, launch_table.quantize(spec, model_fp, config, scales), corrections, model_fp)
    with recording() as launches, qk.use_backend("triton"), torch.no_grad():
        for shape in spec.call_shapes:
            inputs = launch_table.model_inputs(spec, shape, "cpu")
            model(inputs)
    missing = sorted({launch_class(launch) for launch in launches} - classes)
    assert launches and not missing, "\n".join(missing[:5])
