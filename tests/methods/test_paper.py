import copy

import pytest
import torch
import torch.nn.functional as F

import qla_kernels as qk
from qla_kernels.methods import paper
from qla_kernels.quant.log2 import log2_quantize

from ..conftest import kl_divergence
from ..nn.test_quantize_models import MODELS


def test_log2_quantizer():
    p = torch.tensor([1.0, 0.5, 0.3, 0.26, 0.24, 1e-3, 1e-9, 0.0])
    q = log2_quantize(p, 4)
    assert q.tolist() == [1.0, 0.5, 0.25, 0.25, 0.25, 2.0 ** -10, 2.0 ** -15, 0.0]
    p.requires_grad_(True)
    log2_quantize(p, 4).sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


def test_quantized_sdpa_matches_its_formula_and_masks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with paper.quantized_attention(bits=8):
        near = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert F.scaled_dot_product_attention is not paper.quantized_sdpa
    assert float((near - exact).norm() / exact.norm()) < 0.25  # 8-bit q/k/v, log2 probabilities
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(paper.quantized_sdpa(q, k, v, attn_mask=mask, bits=4),
                               paper.quantized_sdpa(q, k, v, is_causal=True, bits=4))


@pytest.mark.parametrize("name", ["vit_tiny", "bert", "llama"])
def test_preset_reaches_timm_and_hf_attention(name):
    model, inputs = MODELS[name]()
    assert paper.uses_sdpa(model, inputs)
    quantized = qk.quantize_(copy.deepcopy(model), qk.W4A4())
    run = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(inputs))
    with torch.no_grad():
        linears_only = run(quantized)
        with paper.quantized_attention(bits=4):
            everything = run(quantized)
    first = lambda out: out if isinstance(out, torch.Tensor) else out[0]  # noqa: E731
    assert not torch.equal(first(linears_only), first(everything))
    assert bool(torch.isfinite(first(everything)).all())


def test_preset_on_digits_is_harsher_than_linears_only(digits_vit, capsys):
    fp = digits_vit.model
    model = qk.quantize_(copy.deepcopy(fp), qk.W4A4())
    with torch.no_grad():
        reference, linears_only = fp(digits_vit.test_x), model(digits_vit.test_x)
        with paper.quantized_attention(bits=4):
            preset = model(digits_vit.test_x)
            accuracy = digits_vit.accuracy(model)
    assert kl_divergence(reference, preset) > kl_divergence(reference, linears_only)
    with capsys.disabled():
        print(f"\ndigits ViT, {paper.LABEL}: accuracy {accuracy:.4f}, KL {kl_divergence(reference, preset):.4f}")
