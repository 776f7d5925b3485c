"""The `paper` preset: RepQ-ViT's full quantization setting, for reproducing published accuracy.

Besides W4A4 on every linear (`qk.quantize_(model, qk.W4A4())`), RepQ-ViT quantizes the attention
matmuls themselves: q, k and v to `bits` (uniform, per token, dynamic here) and the softmax output
with a log2 quantizer. `quantized_attention` does this by replacing
`torch.nn.functional.scaled_dot_product_attention` — which timm (fused attention) and Hugging Face
("sdpa" attention) both call — for the duration of a `with` block, so no model code is copied.

PAPER PRESET: simulation only. It is never lowered onto the kernels (the fast path keeps the
attention core in fp16/bf16); report numbers from it as "paper preset".
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..models.batches import run_model
from ..ops.attention import masked_scores
from ..ops.simulate import fake_quantize_activation
from ..quant.log2 import log2_quantize
from ..quant.primitives import qrange

LABEL = "paper preset (RepQ-ViT setting: quantized attention matmuls, log2 softmax; simulation only)"


def quantized_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, *, bits: int = 4):
    """scaled_dot_product_attention with q, k, v fake-quantized per token and log2-quantized
    probabilities (fp32 math; dropout is not applied: the preset is for evaluation)."""
    q, k, v = (fake_quantize_activation(t.float().reshape(-1, t.shape[-1]), bits, None, None).reshape(t.shape)
               for t in (query, key, value))
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
        scores = scores.masked_fill(~causal, float("-inf"))
    scores = masked_scores(scores, attn_mask)
    probabilities = log2_quantize(torch.softmax(scores, dim=-1), bits)
    return (probabilities @ v).to(query.dtype)


@contextlib.contextmanager
def quantized_attention(bits: int = 4) -> Iterator[None]:
    """Within the block, every scaled_dot_product_attention call runs `quantized_sdpa`."""
    qrange(bits)
    original = F.scaled_dot_product_attention

    def patched(*args, **kwargs):
        return quantized_sdpa(*args, bits=bits, **kwargs)

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def uses_sdpa(model: torch.nn.Module, example: Optional[object] = None) -> bool:
    """Whether `model`'s forward on `example` calls scaled_dot_product_attention (so the preset applies)."""
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            run_model(model, example)
    finally:
        F.scaled_dot_product_attention = original
    return bool(calls)
