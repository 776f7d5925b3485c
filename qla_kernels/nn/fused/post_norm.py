"""The post-norm chain (BERT / RoBERTa): the LayerNorm follows each residual add.

    pre1 : x → int8 (one pre-kernel when query/key/value quantize alike)     quantize_activation
    q/k/v: one packed GEMM + bias (or three)                                 fused_linear
    core : attention on the q/k/v rows where the GEMM wrote them, the block's mask   attention_rows
    proj : GEMM + bias + [T_dw]·U_dwᵀ + residual x               → s1        fused_linear
    norm1: s1 → x1 (the MLP's residual) and int8 x1 (+ T_lora = x1·A)        normalize_quantize_activation
    fc1  : GEMM + bias + GELU → re-quantized                                 fused_linear
    fc2  : GEMM + bias + [T_lora | T_qwt]·[U_lora | U_qwt]ᵀ + residual x1 → s2   fused_linear
    norm2: s2 → block output                                                 normalize_activation

QLA's DW-separable adapter reads the block input x (a 1-D conv over tokens, padding masked): its
block pre-hook computes T_dw, as QwT's hands over x for T_qwt = x·V_r (fitted on the pre-LN sum).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ...ops import attention_rows
from .chain import (
    common_reasons,
    down_projection,
    gemm,
    mlp,
    normalize,
    normalize_and_quantize,
    quantize_input,
    unexpected_arguments,
)
from .packing import PackedGroups
from .templates import PostNormTemplate, attention_heads


class FusedPostNormBlock(PackedGroups):
    """Mixin placed before a post-norm block's own class by `fuse_block`; see the module docstring.

    The block's return structure (a tensor, or a 1-tuple in older transformers) is recorded at
    fusion. Any argument besides the hidden states and the attention mask (a KV cache, encoder
    states, head masks, attention outputs requested) is one the chain does not take."""

    _qla_template: PostNormTemplate
    _qla_returns_tuple: bool = False

    @staticmethod
    def _attention_mask(args: tuple, kwargs: dict) -> Tuple[str, Optional[torch.Tensor]]:
        """(why the call is not hidden states + a 4-D mask, "" if it is; the mask)."""
        kwargs = dict(kwargs)
        mask = kwargs.pop("attention_mask", None)
        if args:
            mask, args = (args[0] if mask is None else mask), args[1:]
        why = unexpected_arguments(args, kwargs, first_position=3)
        if why:
            return why, mask
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            return "the attention mask is not a 4-D tensor (the form scaled_dot_product_attention takes)", mask
        return "", mask

    def why_not_fused(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str:
        if x.dim() != 3:
            return f"the input is {tuple(x.shape)}; the fused chain takes [batch, tokens, width]"
        return common_reasons(self, x) or self._attention_mask(args, kwargs)[0] or self.stale_packing()

    def chain_plans(self, dtype: Optional[torch.dtype], check: bool) -> Dict[object, object]:
        t = self._qla_template
        part = self.get_submodule
        plans = {name: part(name).build_plan(None, dtype, check) for name in (t.query, t.key, t.value, t.proj, t.fc1,
                                                                                t.fc2)}
        plans.update(self.packed_plans(check))
        plans["lora_down"] = down_projection(self, part(t.fc2), dtype)
        return plans

    def forward(self, x: torch.Tensor, *args, **kwargs):
        why = self.why_not_fused(x, args, kwargs)
        if why:
            return self.own_forward(why, x, *args, **kwargs)
        mask = self._attention_mask(args, kwargs)[1]
        t = self._qla_template
        part = self.get_submodule
        plans = self.plans(x.dtype)
        batch, tokens, width = x.shape
        rows = x.reshape(batch * tokens, width).contiguous()
        attention = part(t.attention)
        names = (t.query, t.key, t.value)
        heads, _ = attention_heads(attention, plans[t.query].out_features)
        if t.packed_qkv:
            qkv = plans[t.packed_groups()[0]]
            packed = gemm(*quantize_input(rows, qkv)[:3], qkv, out_dtype=x.dtype)
            outputs = packed.split([plans[name].out_features for name in names], dim=1)
        else:
            outputs = [gemm(*quantize_input(rows, plans[name])[:3], plans[name], out_dtype=x.dtype) for name in names]
        context = attention_rows(*outputs, tokens, heads, scale=getattr(attention, "scaling", None), mask=mask)
        proj = plans[t.proj]
        q, scale, zero, _ = quantize_input(context, proj)
        # A lowered DW-separable adapter reads the block input x: its block pre-hook has handed T over.
        lowrank_t, fullrank_x = part(t.proj).correction_inputs(rows, proj)
        s1 = gemm(q, scale, zero, proj, lowrank_t=lowrank_t, fullrank_x=fullrank_x, residual=rows, out_dtype=x.dtype)
        fc1, fc2, lora_down = plans[t.fc1], plans[t.fc2], plans["lora_down"]  # LoRA on x1: T from the same pre-kernel
        x1, q, scale, zero, lora_t = normalize_and_quantize(s1, part(t.norm1), fc1, lora_down)
        lowrank_t, fullrank_x = part(t.fc2).correction_inputs(x1, fc2, lora_t if lora_down is not None else None)
        out, _ = normalize(mlp(q, scale, zero, fc1, fc2, t.activation, x1, x.dtype, lowrank_t, fullrank_x),
                           part(t.norm2))
        out = out.reshape(batch, tokens, width)
        return (out,) if self._qla_returns_tuple else out
