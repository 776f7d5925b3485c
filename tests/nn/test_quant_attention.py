"""The "qla_quantized" attention function on models besides DETR: a causal decoder (LLaMA-style,
random weights) runs through it unquantized exactly as through SDPA (transformers leaves the
causal mask to the kernel there), and with 8-bit QuantizedAttention cores within a stated SQNR."""

import copy

import pytest
import torch

import qla_kernels as qk
from qla_kernels.nn.quant_attention import QuantizedAttention, register_attention

from ..conftest import sqnr_db

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    return transformers.LlamaForCausalLM(config).eval()


def test_a_causal_decoder_runs_through_the_function_as_through_sdpa():
    fp = _llama()
    model = copy.deepcopy(fp)
    model.set_attn_implementation(register_attention())
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected, actual = fp(ids).logits, model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_8_bit_cores_on_a_decoder_stay_close_to_fp():
    """Symmetric 8-bit q, k, v with steps covering their range and A at 1/127: the logits keep
    > 25 dB SQNR (each code's error is at most half a step; measured about 40 dB)."""
    fp = _llama()
    model = copy.deepcopy(fp)
    model.set_attn_implementation(register_attention())
    for module in model.modules():
        if type(module).__name__ == "LlamaAttention":
            core = QuantizedAttention(8, symmetric=True)
            core.scales.copy_(torch.tensor([4 / 127, 4 / 127, 2 / 127, 1 / 127]))
            module.attention_quantizer = core
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = fp(ids).logits
        for backend in ("reference", "simulate"):
            with qk.use_backend(backend):
                assert sqnr_db(expected, model(ids).logits) > 25, backend
