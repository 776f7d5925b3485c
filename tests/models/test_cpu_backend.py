"""Whole models on the `cpu` backend against the reference: every quantized linear bit for bit on
the input the model gives it, and the model's output up to re-rounded codes (conftest), in the
calibration form and converted for runtime (frozen plans with packed panels, fused chains)."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels.models.batches import model_output, run_model

from ..conftest import assert_same_up_to_rerounding
from .test_architectures import ARCHITECTURES

pytestmark = pytest.mark.skipif(not qk.backends()["cpu"].available, reason=str(qk.backends()["cpu"]))
MODELS = ["deit3", "pvt_v2", "electra", "qwen2", "clip_vision", "bloom"]


def _output(model, batch, backend):
    with torch.no_grad(), qk.use_backend(backend):
        return model_output(run_model(model, batch)).float()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A8(group_size=32)], ids=str)
def test_every_layer_exact_and_the_model_up_to_rerounding(name, config):
    torch.manual_seed(0)
    fp, batch = ARCHITECTURES[name][0]()
    fp.eval()
    model = qk.quantize_(copy.deepcopy(fp), config)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=layer_name: inputs.setdefault(name, args[0]))
             for layer_name, layer in model.named_modules() if isinstance(layer, qk.QuantLinear)]
    reference = _output(model, batch, "reference")
    for hook in hooks:
        hook.remove()
    assert inputs
    for layer_name, x in inputs.items():
        layer = model.get_submodule(layer_name)
        with torch.no_grad():
            with qk.use_backend("reference"):
                expected = layer(x)
            with qk.use_backend("cpu"):
                assert torch.equal(layer(x), expected), layer_name
    fp_out = _output(fp, batch, "reference")
    assert_same_up_to_rerounding(fp_out, reference, _output(model, batch, "cpu"))
    converted = copy.deepcopy(model)
    qk.convert_for_runtime(converted, batch)
    assert_same_up_to_rerounding(fp_out, reference, _output(converted, batch, "cpu"))
