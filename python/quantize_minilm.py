"""Quantize a real sentence-embedding model, compare it with fp, save it and load it back.

    python python/quantize_minilm.py
"""

import copy
import tempfile

import torch

import qla_kernels as qk
from qla_kernels.apps.sentence_embedding import SENTENCES, embed, load_minilm

model, tokenizer = load_minilm()
reference = embed(model, tokenizer, SENTENCES)

quantized = qk.quantize_(copy.deepcopy(model), qk.W8A8())  # every nn.Linear -> QuantLinear
print(quantized.encoder.layer[0].intermediate.dense)       # shows the format
cosine = (embed(quantized, tokenizer, SENTENCES) * reference).sum(dim=-1)
print(f"W8A8 embedding cosine vs fp: mean {cosine.mean():.5f}, min {cosine.min():.5f}")

with qk.use_backend("simulate"):  # differentiable fake quantization, numerically the same model
    simulated = embed(quantized, tokenizer, SENTENCES)
print(f"simulate vs integer cosine: min {(simulated * embed(quantized, tokenizer, SENTENCES)).sum(-1).min():.5f}")

with tempfile.TemporaryDirectory() as folder:
    path = f"{folder}/minilm-w8a8.safetensors"
    qk.save_quantized(quantized, path)
    restored = qk.load_quantized(load_minilm()[0], path)
    assert torch.equal(embed(restored, tokenizer, SENTENCES), embed(quantized, tokenizer, SENTENCES))
    print(f"saved and restored bit-exactly: {path}")
