"""The `paper` preset: RepQ-ViT's full quantization setting, for reproducing published accuracy.

Besides W4A4 on every linear (`qk.quantize_(model, qk.W4A4())`), RepQ-ViT quantizes the attention
matmuls themselves: q, k and v to `bits` (uniform, per token, dynamic here) and the softmax output
with a log2 quantizer. `quantized_attention` does this by replacing
`torch.nn.functional.scaled_dot_product_attention` — which timm (fused attention) and Hugging Face
("sdpa" attention) both call — for the duration of a `with` block, so no model code is copied.

Every call runs `ops.quantized_attention` with `TokenwiseLog2Quantization` (ops/attention.py
states its numerics): the Triton kernel on a GPU (q·kᵀ on the int8 tensor cores, Â·v̂ on the tf32
ones), the cpu backend's path on a CPU, and its differentiable twin under `simulate`; simulation
and deployment are the same function. Report numbers from it as "paper preset".
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..models.batches import run_model
from ..quant.primitives import qrange

LABEL = "paper preset (RepQ-ViT setting: quantized attention matmuls, log2 softmax)"


def quantized_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, *, bits: int = 4):
    """scaled_dot_product_attention's signature on the preset's quantized core: q, k, v per token
    and log2 probabilities at `bits`. Inputs are [batch, heads, tokens, head_dim] or
    [batch, tokens, head_dim]; there is no dropout (the preset is for evaluation)."""
    if dropout_p != 0.0:
        raise ValueError(f"the paper preset's attention has no dropout, got dropout_p={dropout_p!r} "
                         "(evaluate in eval mode)")
    if not isinstance(query, torch.Tensor) or query.dim() not in (3, 4):
        raise ValueError("the paper preset's attention takes [batch, heads, tokens, head_dim] or [batch, tokens, "
                         f"head_dim] inputs, got {tuple(getattr(query, 'shape', ()))}")
    if query.dim() == 3:
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        out = quantized_sdpa(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), attn_mask, dropout_p,
                             is_causal, scale, enable_gqa, bits=bits)
        return out.squeeze(1)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    if is_causal:
        if attn_mask is not None:
            raise ValueError("pass either attn_mask or is_causal, not both (as scaled_dot_product_attention)")
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril(
            key.shape[-2] - query.shape[-2])
    scaling = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    return ops.quantized_attention(query, key, value, ops.TokenwiseLog2Quantization(bits), scaling, attn_mask)


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
