"""Linears whose parent reads their weight (nn/weight_reads.py): timm BEiT / EVA / Swin V2 pass
`self.qkv.weight` to F.linear with a per-call bias (routed to the quantized layer); ConViT reads
`self.qk.weight.dtype` (kept in floating point)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qla_kernels as qk
from qla_kernels.methods import gplq, gptq, ptq
from qla_kernels.nn.lsq_linear import LSQLinear
from qla_kernels.nn.weight_reads import weight_reads

from ..conftest import assert_same_up_to_rerounding

timm = pytest.importorskip("timm")

ROUTED = {  # model, its attention's qkv, the keyword arguments of a 2-block model
    "beit": ("beit_base_patch16_224", "blocks.1.attn", dict(img_size=32, depth=2)),
    "eva02": ("eva02_tiny_patch14_224", "blocks.1.attn", dict(img_size=28, depth=2)),
    "swinv2": ("swinv2_tiny_window8_256", "layers.1.blocks.1.attn",
               dict(img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32, window_size=4)),
}


def _model(name):
    model_name, attention, kwargs = ROUTED[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, **kwargs).eval()
    return model, attention, torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])


def _cosine(a, b):
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


class _Reads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight.data.mul_(2)  # an init-time read does not count

    def forward(self, x):
        x = F.linear(x, self.a.weight, None) + torch.nn.functional.linear(input=x, weight=self.b.weight)
        return self.c(x).to(self.b.weight.dtype)


def test_weight_reads_tell_linear_weights_from_other_uses():
    assert weight_reads(_Reads, "a") == "linear"
    assert weight_reads(_Reads, "b") == "other"  # passed to F.linear, and its dtype read
    assert weight_reads(_Reads, "c") is None


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_parents_calling_f_linear_on_the_weight_run_the_quantized_layer(name):
    """Every linear is quantized; the attention's F.linear(x, self.qkv.weight, qkv_bias) runs the
    QuantLinear with that bias, exactly as timm's own `qkv_bias_separate` path (the layer called,
    the bias added after it) does; the model stays close to fp; PTQ calibration sees the qkv input."""
    model, attention, x = _model(name)
    with torch.no_grad():
        reference = model(x)
    quantized = qk.quantize_(copy.deepcopy(model), qk.W8A8())
    assert not [n for n, m in quantized.named_modules() if isinstance(m, nn.Linear)]
    qkv = quantized.get_submodule(attention).qkv
    calls = []
    qkv.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    with torch.no_grad():
        routed = quantized(x)
        assert len(calls) == 1
        for module in quantized.modules():
            if hasattr(module, "qkv_bias_separate"):
                module.qkv_bias_separate = True
        separate = quantized(x)
    torch.testing.assert_close(routed, separate, rtol=1e-4, atol=1e-4)
    assert _cosine(reference, routed) > 0.999
    ptq.calibrate(quantized, [x], progress=False)
    assert qkv.input_scale is not None


def test_routed_layers_come_back_from_a_checkpoint_and_compile(tmp_path):
    model, _, x = _model("beit")
    skeleton = copy.deepcopy(model)
    with torch.no_grad():
        fp_output = model(x)
    quantized = qk.quantize_(model, qk.W4A8())
    with torch.no_grad():
        expected = quantized(x)
    path = str(tmp_path / "beit.safetensors")
    qk.save_quantized(quantized, path)
    restored = qk.load_quantized(skeleton, path)
    with torch.no_grad():
        assert torch.equal(restored(x), expected)  # the same modules running the same ops
        # The routing mode traces without graph breaks (Inductor's code generation of a quantized
        # layer: tests/nn/test_compile.py); decompositions may re-round the fp ops.
        compiled = torch.compile(restored, fullgraph=True, backend="aot_eager")
        assert_same_up_to_rerounding(fp_output, expected, compiled(x))


def test_gptq_and_gplq_route_too():
    """GPTQ's QuantLinears and GPLQ's QAT layers (whose input quantizer F.linear on the weight would
    skip) are routed like quantize_'s."""
    model, attention, x = _model("beit")
    batches = [x]
    quantized = gptq.quantize(copy.deepcopy(model), qk.W4A16(group_size=32), batches, progress=False)
    with torch.no_grad():
        assert _cosine(model(x), quantized(x)) > 0.99
    student, _ = gplq.activation_qat(model, qk.W4A8(), batches, epochs=1, progress=False)
    qkv = student.get_submodule(attention).qkv
    assert isinstance(qkv, LSQLinear)
    seen = []
    qkv.register_forward_pre_hook(lambda module, args: seen.append(1))
    with torch.no_grad():
        student(x)
    assert seen, "the QAT layer (its input quantizer) did not run"


def test_a_weight_read_otherwise_keeps_the_linear_floating_point():
    """ConViT reads the dtype of `self.qk.weight` while running: that linear stays nn.Linear (with
    a warning naming it); the others are quantized and the model runs close to fp."""
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, img_size=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    with pytest.warns(UserWarning, match=r"read .weight directly.*blocks\.0\.attn\.qk'"):
        qk.quantize_(model, qk.W8A8())
    assert isinstance(model.blocks[0].attn.qk, nn.Linear)
    assert isinstance(model.blocks[0].attn.proj, qk.QuantLinear)
    with torch.no_grad():
        assert _cosine(reference, model(x)) > 0.99
