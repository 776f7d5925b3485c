"""Quantized attention cores for transformers models, attached to an attention module as its
`attention_quantizer` and run by the attention function `qla_attention` (registered with
transformers' AttentionInterface as "qla_quantized" by `register_attention`):

- `LSQAttentionQuantizer` (calibration form): LSQ+ quantizers of q, k, the attention map A and v,
  trained in `simulate`'s numerics (ops/attention.py);
- `QuantizedAttention` (runtime form): their frozen steps and zero points, run by
  `ops.quantized_attention` on the selected backend.

Modules without an `attention_quantizer` (and every module inside `full_precision()`) run fp32
attention, so one registered function serves a model whose attention is quantized in part.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .. import ops
from ..ops.attention import AttentionQuantization, masked_scores, simulated_attention
from ..quant.lsq import LSQPlusQuantizer
from ..quant.primitives import qrange
from .lsq_linear import quantizing

_local = threading.local()


class LSQAttentionQuantizer(nn.Module):
    """LSQ+ quantizers of q, k, v and the attention map A of one attention module, asymmetric by
    default (A ∈ [0, 1] uses its whole range with zero point qmin), each initialised from
    calibration statistics by its `initialize`. `query_groups` (n, m), when set, splits a
    self-attention over n + m tokens into two groups that do not attend to each other (AQ-DETR's
    object and auxiliary queries; methods/aqdetr.py)."""

    def __init__(self, bits: int = 4, symmetric: bool = False):
        super().__init__()
        qrange(bits)
        if bits == 8 and not symmetric:
            raise ValueError("8-bit attention quantizers must be symmetric (q − z would not fit int8)")
        self.bits = bits
        self.query, self.key, self.value = (LSQPlusQuantizer(bits, symmetric) for _ in range(3))
        self.probs = LSQPlusQuantizer(bits, symmetric)
        self.query_groups: Optional[tuple] = None

    def quantization(self) -> AttentionQuantization:
        """The steps and zero points in use (differentiable: the parameters themselves)."""
        quantizers = (self.query, self.key, self.value, self.probs)
        scales = torch.stack([q.scale.float().reshape(()) for q in quantizers])
        if self.query.zero is None:
            return AttentionQuantization(self.bits, scales)
        return AttentionQuantization(self.bits, scales, torch.stack([q.zero.float().reshape(()) for q in quantizers]))

    def forward(self, query, key, value, mask, scaling: float):
        return simulated_attention(query, key, value, self.quantization(), scaling, mask)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def eager_attention(query, key, value, mask, scaling: float):
    """(softmax(q·kᵀ·scaling + mask)·v in the query's dtype, the probabilities), fp32 math."""
    probs = torch.softmax(masked_scores((query.float() @ key.float().transpose(-2, -1)) * scaling, mask), dim=-1)
    return (probs @ value.float()).to(query.dtype), probs


@contextlib.contextmanager
def observing_attention(observer: Callable) -> Iterator[None]:
    """Within the block, every `qla_attention` call of this thread also calls
    `observer(module, query, key, value, probs)` (probs None where the quantized core ran)."""
    previous = getattr(_local, "observer", None)
    _local.observer = observer
    try:
        yield
    finally:
        _local.observer = previous


def _group_mask(groups: tuple, tokens: int, mask, device) -> Optional[torch.Tensor]:
    """The block-diagonal keep-mask of `groups` over `tokens` (None when the call is not over
    exactly the grouped tokens), combined with the call's own mask."""
    if groups is None or sum(groups) != tokens:
        return mask
    index = torch.cat([torch.full((size,), group, device=device) for group, size in enumerate(groups)])
    keep = index[:, None] == index[None, :]
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


class QuantizedAttention(nn.Module):
    """The frozen quantizers of one attention core: buffers `scales` fp32 [4] (steps of q, k, v,
    A) and `zeros` fp32 [4] (integer zero points; None: symmetric). Forward runs
    `ops.quantized_attention`."""

    def __init__(self, bits: int, symmetric: bool = False, device=None):
        super().__init__()
        qrange(bits)
        self.bits = bits
        self.register_buffer("scales", torch.ones(4, device=device))
        self.register_buffer("zeros", None if symmetric else torch.zeros(4, device=device))

    @classmethod
    def from_quantizer(cls, quantizer: LSQAttentionQuantizer) -> "QuantizedAttention":
        """Freezes trained LSQ+ quantizers: the steps as used (≥ eps) and the zero points rounded."""
        steps, zeros = quantizer.quantization().kernel_operands()
        module = cls(quantizer.bits, zeros is None, device=steps.device)
        with torch.no_grad():
            module.scales.copy_(steps)
            if zeros is not None:
                module.zeros.copy_(zeros)
        return module

    def quantization(self) -> AttentionQuantization:
        return AttentionQuantization(self.bits, self.scales, self.zeros)

    def forward(self, query, key, value, mask, scaling: float):
        return ops.quantized_attention(query, key, value, self.quantization(), scaling, mask)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'symmetric' if self.zeros is None else 'asymmetric'}"


def qla_attention(module: nn.Module, query, key, value, attention_mask, scaling: Optional[float] = None,
                  dropout: float = 0.0, **kwargs):
    """A transformers attention function (AttentionInterface): runs `module.attention_quantizer`
    (an LSQAttentionQuantizer while training, the exported QuantizedAttention after), or fp
    attention where the module has none or inside `full_precision()`. A causal call without a mask
    gets the causal mask. Dropout is not applied (DETR's attention dropout is 0; a quantized
    attention has none)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is None and kwargs.get("is_causal", getattr(module, "is_causal", False)) and query.shape[-2] > 1:
        # transformers leaves the mask out of causal calls it expects the kernel to mask itself
        q_tokens, k_tokens = query.shape[-2], key.shape[-2]
        attention_mask = torch.ones(q_tokens, k_tokens, dtype=torch.bool, device=query.device).tril(k_tokens - q_tokens)
    quantizer = getattr(module, "attention_quantizer", None)
    if query.shape[-2] == key.shape[-2]:
        attention_mask = _group_mask(getattr(quantizer, "query_groups", None), query.shape[-2], attention_mask,
                                     query.device)
    probs = None
    if quantizer is None or not quantizing():
        out, probs = eager_attention(query, key, value, attention_mask, scaling)
    else:
        out = quantizer(query, key, value, attention_mask, scaling)
    observer = getattr(_local, "observer", None)
    if observer is not None:
        observer(module, query, key, value, probs)
    return out.transpose(1, 2).contiguous(), None


ATTENTION_IMPLEMENTATION = "qla_quantized"


def register_attention() -> str:
    """Registers `qla_attention` with transformers as "qla_quantized" (idempotent) and returns the
    name, for `model.set_attn_implementation(name)`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, qla_attention)
    return ATTENTION_IMPLEMENTATION
