"""convert_for_runtime: the runtime form computes what the calibration form computes (bit for bit:
the same ops on the same operands), prepares only its input per call, refuses what it cannot run,
and rebuilds its plans when cast or moved."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.methods import qwt
from qla_kernels.nn.compensation import compensated_blocks
from qla_kernels.ops import checks, dispatch
from qla_kernels.ops import linear_plan as linear_plan_module

from ..conftest import corrected_vit

timm = pytest.importorskip("timm")


def _corrected_vit():
    return corrected_vit()[1:]


def _run(model, x):
    with torch.no_grad():
        return model(x)


def test_level_one_equals_the_calibration_form_bit_for_bit():
    model, example = _corrected_vit()
    x = torch.randn(3, 3, 32, 32)
    expected = _run(model, x)
    assert qk.convert_for_runtime(model).fusion is None
    layers = [m for m in model.modules() if isinstance(m, qk.QuantLinear)]
    assert all(layer.runtime_plan is not None for layer in layers)
    assert torch.equal(_run(model, x), expected)


def test_level_two_equals_fuse_blocks_bit_for_bit():
    model, example = _corrected_vit()
    fused = copy.deepcopy(model)
    assert qk.fuse_blocks(fused, example).fused == ["blocks.0", "blocks.1"]
    x = torch.randn(3, 3, 32, 32)
    expected = _run(fused, x)
    report = qk.convert_for_runtime(model, example)
    assert report.fusion.fused == ["blocks.0", "blocks.1"] and not report.lowered_qwt  # lowered before
    assert all(block.converted for block in model.blocks)
    assert torch.equal(_run(model, x), expected)


def test_converted_triton_kernels_equal_the_calibration_form_bit_for_bit():
    """The Triton kernels (the interpreter on CPU), which converted GEMMs launch without the custom
    op in eager inference; blocks fused before conversion freeze with it."""
    model, example = _corrected_vit()
    assert qk.fuse_blocks(model, example, "triton").fused == ["blocks.0", "blocks.1"]
    runtime = copy.deepcopy(model)
    qk.convert_for_runtime(runtime)
    assert all(block.converted for block in runtime.blocks)
    x, features = torch.randn(1, 3, 32, 32), torch.randn(3, 192)
    with qk.use_backend("triton"):
        assert torch.equal(_run(runtime, x), _run(model, x))
        assert torch.equal(_run(runtime.head, features), _run(model.head, features))


def test_a_converted_linear_validates_its_input_and_resolves_its_backend_once(monkeypatch):
    """No operand check per call (done at conversion) and one backend resolution for both ops."""
    layer = qk.QuantLinear.from_float(torch.nn.Linear(64, 48), qk.W8A8())
    x = torch.randn(5, 64)
    counts = {}

    def count(module, name):
        original = getattr(module, name)

        def counting(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    with torch.no_grad():
        expected = layer(x)
        qk.convert_for_runtime(torch.nn.Sequential(layer))
        for module in (ops, linear_plan_module, checks):
            if hasattr(module, "check_fused_linear"):
                count(module, "check_fused_linear")
        for module in (ops, linear_plan_module, dispatch):
            count(module, "resolve_backend")
        assert torch.equal(layer(x), expected)
    assert counts == {"resolve_backend": 1}


def test_the_runtime_form_refuses_what_it_cannot_run():
    model, example = _corrected_vit()
    qk.convert_for_runtime(model, example)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="simulate"), qk.use_backend("simulate"):
        _run(model, x)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        _run(model, x)
    model.eval()
    with pytest.raises(ValueError, match="converted for runtime"):
        model.blocks[0].attn.qkv.set_static_activation(torch.tensor(0.1))
    with pytest.raises(ValueError, match="already converted"):
        qk.convert_for_runtime(model)
    with pytest.raises(ValueError, match="no QuantLinear"):
        qk.convert_for_runtime(torch.nn.Linear(4, 4))
    assert torch.isfinite(_run(model, x)).all()  # nothing above left it half-changed


def test_casting_a_converted_model_rebuilds_its_plans():
    model, example = _corrected_vit()
    qk.convert_for_runtime(model, example)
    x = torch.randn(2, 3, 32, 32)
    expected = _run(model, x)
    fc2 = model.blocks[0].mlp.fc2
    assert fc2.runtime_plan.lowrank_u.dtype == torch.float32
    model.half()
    assert fc2.runtime_plan.lowrank_u.dtype == torch.float16
    assert model.blocks[0]._qla_plans["fc2"].lowrank_u.dtype == torch.float16
    half = _run(model, x.half())
    assert half.dtype == torch.float16
    cosine = torch.nn.functional.cosine_similarity(half.float().flatten(), expected.flatten(), dim=0)
    assert cosine > 0.99


def test_conversion_lowers_the_qwt_hooks_where_that_is_the_same_computation():
    """BERT: QwT fitted on the pre-LN sums, attached as hooks; the conversion moves each into its
    block's fc2 (the sum before the output norm is a plain add) and fuses the blocks. A QwT that
    cannot lower (here: one forced to fail) keeps its hook and is reported."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    fp = transformers.AutoModel.from_config(config).eval()
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    batch = {"input_ids": torch.randint(1, 100, (4, 12))}
    qwt.calibrate(fp, model, [{"input_ids": torch.randint(1, 100, (4, 12))} for _ in range(3)], progress=False)
    compensated = [name for name, _ in compensated_blocks(model)]
    assert compensated  # the held-out R² gate may switch a block's compensation off
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    report = qk.convert_for_runtime(model, batch)
    assert report.lowered_qwt == [f"{name}.output.dense" for name in compensated]
    assert not report.hooked_qwt and report.fusion.fused == ["encoder.layer.0", "encoder.layer.1"]
    with torch.no_grad():
        converted = model(**batch).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(converted.flatten().double(), expected.flatten().double(), dim=0)
    assert cosine > 0.9999


def test_strict_lowering_changes_nothing_when_one_block_cannot_lower(monkeypatch):
    """qwt.lower is all or nothing: the block whose output would change is named, and every block
    keeps its hook-based compensation."""
    from qla_kernels.models import runtime

    torch.manual_seed(0)
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    qwt.calibrate(fp, model, [torch.randn(4, 3, 32, 32) for _ in range(3)], progress=False)
    blocks = [block for _, block in compensated_blocks(model)]
    assert len(blocks) == 2
    x = torch.randn(2, 3, 32, 32)
    expected = _run(model, x)
    lower = runtime.lower_into_linear

    def lower_wrongly_in_the_last_block(block, linear):
        lower(block, linear)
        if block is blocks[-1]:
            linear.bias.data.add_(1.0)

    monkeypatch.setattr(runtime, "lower_into_linear", lower_wrongly_in_the_last_block)
    with pytest.raises(ValueError, match="blocks.1: lowering QwT into blocks.1.mlp.fc2 changes the block's output"):
        qwt.lower(model, x)
    assert all(getattr(block.mlp.fc2, "lowered_qwt", None) is None and hasattr(block, "qwt") for block in model.blocks)
    assert torch.equal(_run(model, x), expected)
