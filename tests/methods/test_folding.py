import copy
import statistics

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods import folding, ptq
from qla_kernels.models.batches import model_output, run_model
from qla_kernels.nn.module_kinds import is_norm

from ..nn.test_quantize_models import MODELS


def _output(model, inputs):
    with torch.no_grad():
        return model_output(run_model(model, inputs))


@pytest.mark.parametrize("name, groups", [("vit_tiny", 24), ("deit_tiny", 24), ("gpt2", 4), ("llama", 4), ("bert", 0)])
@pytest.mark.parametrize("mode", folding.MODES)
def test_folding_leaves_the_fp_model_unchanged(name, groups, mode):
    """Pre-norm models fold norm1->qkv and norm2->fc1 (LLaMA: q/k/v and gate/up together). In
    post-norm BERT every LayerNorm output is also the residual stream: nothing may fold."""
    model, inputs = MODELS[name]()
    reference = _output(model, inputs)
    folded = folding.fold_activation_scales(model, [inputs], mode=mode)
    assert len(folded) == groups
    torch.testing.assert_close(_output(model, inputs), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def _with_outlier_channels(name, seed):
    torch.manual_seed(seed)
    model, inputs = MODELS[name]()
    with torch.no_grad():
        for module in model.modules():
            if is_norm(module) and getattr(module, "weight", None) is not None:
                module.weight[:3] *= 30
    return model, inputs


@pytest.mark.parametrize("name, mode, bound", [("vit_tiny", "repq", 0.8), ("vit_tiny", "smoothquant", 0.85),
                                               ("llama", "smoothquant", 0.9)])
def test_folding_helps_static_w8a8_with_outlier_channels(name, mode, bound):
    """Three channels ×30 after every norm; static per-tensor W8A8 (min-max). Relative output error
    with folding over without, on five random models (seeds 0-4), measured on an AVX-512 Intel
    (on AVX2 only, where per seed the ratio moves by up to 0.27): ViT repq 0.71 0.46 0.48 0.57 0.79
    (0.67 0.77 0.44 0.55 0.75), mean 0.60 (0.64); ViT smoothquant mean 0.66 (0.69), per seed 0.41
    to 0.90 (0.33 to 1.03); LLaMA smoothquant 0.93 0.62 0.79 0.49 1.06, mean 0.78 on both.
    Asserted on the mean."""
    ratios = []
    for seed in range(5):
        model, inputs = _with_outlier_channels(name, seed)
        reference = _output(model, inputs)

        def error(fold):
            candidate = copy.deepcopy(model)
            if fold:
                folding.fold_activation_scales(candidate, [inputs], mode=mode)
            qk.quantize_(candidate, qk.W8A8())
            ptq.calibrate(candidate, [inputs], method="minmax", progress=False)
            return float((_output(candidate, inputs) - reference).norm() / reference.norm())

        ratios.append(error(True) / error(False))
    assert statistics.fmean(ratios) < bound, ratios


def test_bad_arguments():
    model, inputs = MODELS["gpt2"]()
    with pytest.raises(ValueError, match="mode must be one of"):
        folding.fold_activation_scales(model, [inputs], mode="awq")
    with pytest.raises(ValueError, match="alpha"):
        folding.fold_activation_scales(model, [inputs], alpha=1.5)
