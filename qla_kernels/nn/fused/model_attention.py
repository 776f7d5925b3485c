"""The pre-norm chain around the model's own attention module (decoders: GPT-2 / LLaMA; encoders
with separate q/k/v: HF ViT, CLIP, DINOv2). The attention module runs as the model's (its
QuantLinears one by one; the arguments the block received are passed on by name, so the KV
cache, rotary embeddings and masks are the model's); around it:

    pre1 : x → norm1 → activation dtype (+ the DW adapter's T)               normalize_activation
    qkv  : separate q/k/v: one packed GEMM, each layer's slice handed over   quantize_activation, fused_linear
    attn : the model's attention module; its output projection's epilogue adds the residual x → x1
    pre2 : x1 → norm2 → int8 (W8A8 / W4A8 / W4A4) or activation dtype (W4A16), + T_lora = norm2(x1)·A
    mlp  : fc1 + bias + GELU (re-quantized) | packed gate/up → silu(gate)·up (re-quantized)
    fc2  : GEMM + bias + [T_lora | T_qwt]·[U_lora | U_qwt]ᵀ + residual x1          → block output

What the model's attention code cannot be given as arguments (the packed q/k/v slices, the
residual and LayerScale for its output projection) is handed over in the block's forward scope
(nn/forward_context.py). Cross-attention (encoder states) and returned attention weights are
calls the chain does not take.
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Tuple

import torch

from ...ops.reference import apply_activation
from .. import forward_context
from ..adapters import attention_adapter_down_path
from .chain import (
    common_reasons,
    down_projection,
    gemm,
    layer_scale,
    mlp,
    normalize,
    normalize_and_quantize,
    quantize_input,
)
from .packing import PackedGroups
from .templates import ModelAttentionTemplate


class FusedModelAttentionBlock(PackedGroups):
    """Mixin placed before a block's own class by `fuse_block`; see the module docstring."""

    _qla_template: ModelAttentionTemplate

    def _named_arguments(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[dict]:
        """The call's arguments besides the hidden states, by name, as the block's own forward
        would see them (None when they do not bind)."""
        signature = self._qla_forward_signature
        try:
            bound = signature.bind(self, x, *args, **kwargs)
        except TypeError:
            return None
        names = list(signature.parameters)
        named = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name in names[:2]:
                continue
            if kind == inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind != inspect.Parameter.VAR_POSITIONAL:
                named[name] = value
            elif value:
                return None
        return named

    def _chain_arguments(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Tuple[str, Optional[dict]]:
        """(why the chain does not apply to this call, "" if it does; the arguments to pass the
        attention module)."""
        if x.dim() != 3:
            return f"the input is {tuple(x.shape)}; the fused chain takes [batch, tokens, width]", None
        why = common_reasons(self, x)
        if why:
            return why, None
        named = self._named_arguments(x, args, kwargs)
        if named is None:
            return "the call's arguments do not bind to the block's forward", None
        crossing = [name for name in ("encoder_hidden_states", "encoder_attention_mask") if named.get(name) is not None]
        if crossing:
            return f"the block is called with {crossing} (cross-attention), which the fused chain does not take", None
        if named.get("output_attentions"):
            return "the call asks for attention weights (output_attentions), which the fused chain does not return", None
        return self.stale_packing(), named

    def why_not_fused(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str:
        return self._chain_arguments(x, args, kwargs)[0]

    def chain_plans(self, dtype: Optional[torch.dtype], check: bool) -> Dict[object, object]:
        t = self._qla_template
        part = self.get_submodule
        plans = {name: part(name).build_plan(None, dtype, check) for name in t.mlp_inputs}
        plans[t.attention_output] = part(t.attention_output).build_plan(layer_scale(self, t.attention_scale), dtype,
                                                                        check)
        plans[t.mlp_output] = part(t.mlp_output).build_plan(layer_scale(self, t.mlp_scale), dtype, check)
        plans.update(self.packed_plans(check))
        plans["lora_down"] = down_projection(self, part(t.mlp_output), dtype)
        return plans

    def forward(self, x: torch.Tensor, *args, **kwargs):
        why, named = self._chain_arguments(x, args, kwargs)
        if why:
            return self.own_forward(why, x, *args, **kwargs)
        t = self._qla_template
        part = self.get_submodule
        plans = self.plans(x.dtype)
        batch, tokens, width = x.shape
        rows = x.reshape(batch * tokens, width).contiguous()
        packed = t.packed_attention_inputs
        packed_plan = plans[packed] if packed else None
        if packed_plan is not None and packed_plan.act_bits is not None:  # the packed q/k/v codes from the same read
            normed_rows, *codes, _ = normalize_and_quantize(rows, part(t.norm1), packed_plan)
        else:
            normed_rows, codes = normalize(rows, part(t.norm1))[0], (None, None, None)
        normed = normed_rows.reshape(batch, tokens, width)
        proj = part(t.attention_output)
        forward_context.enter()  # the hand-offs to the layers the model's attention code calls
        try:
            if getattr(proj, "lowered_adapter", None) is not None:  # what the norm1 hook would have prepared
                proj.lowered_adapter.prepare(attention_adapter_down_path(self, normed))
            if packed:
                self._hand_over_attention_inputs(packed_plan, normed_rows, *codes)
            # The residual x joins proj's epilogue (after its LayerScale): the attention returns x1.
            proj.add_to_next_output(rows, plans[t.attention_output])
            attention = part(t.attention)(normed, **named)
        finally:  # what a layer did not take must not reach a later call
            untaken = [name for name in (*packed, t.attention_output) if part(name).drop_untaken_hand_offs()]
            forward_context.leave()
        if untaken:
            raise RuntimeError(f"{t.attention!r} did not call {untaken} on its input")
        x1 = (attention if isinstance(attention, torch.Tensor) else attention[0]).reshape(batch * tokens, width)
        x1 = x1.contiguous()

        inputs = [plans[name] for name in t.mlp_inputs]
        fc2, lora_down = plans[t.mlp_output], plans["lora_down"]  # QLA's LoRA: T from the norm2 pre-kernel
        norm2 = part(t.norm2)
        if inputs[0].act_bits is None:  # W4A16: the GEMMs read the normalized activations
            normed2, lora_t = normalize(x1, norm2, lora_down)
            operands = [(normed2, None, None)] * len(inputs)
        else:
            q, scale, zero, lora_t = quantize_input(x1, inputs[0], norm2, lora_down)
            operands = [(q, scale, zero)] + [quantize_input(x1, plan, norm2)[:3] for plan in inputs[1:]]
        lowrank_t, fullrank_x = part(t.mlp_output).correction_inputs(x1, fc2, lora_t if lora_down is not None else None)
        if len(inputs) == 1 or t.packed_mlp_inputs:
            fc1 = inputs[0] if len(inputs) == 1 else plans[t.mlp_inputs]
            out = mlp(*operands[0], fc1, fc2, t.activation, x1, x.dtype, lowrank_t, fullrank_x)
        else:  # gate and up quantized or stored differently: two GEMMs
            gate, up = [gemm(*operand, plan, out_dtype=x.dtype) for operand, plan in zip(operands, inputs)]
            hidden = apply_activation(torch.cat([gate, up], dim=1), t.activation)
            hidden_operands = (hidden, None, None) if fc2.act_bits is None else quantize_input(hidden, fc2)[:3]
            out = gemm(*hidden_operands, fc2, lowrank_t=lowrank_t, fullrank_x=fullrank_x, residual=x1,
                       out_dtype=x.dtype)
        return out.reshape(batch, tokens, width)

    def _hand_over_attention_inputs(self, plan, normed_rows: torch.Tensor, q: Optional[torch.Tensor],
                                    scale: Optional[torch.Tensor], zero: Optional[torch.Tensor]) -> None:
        """One GEMM for the packed attention input projections, on their codes (q, scale, zero
        point) or, for W4A16 (q None), on the normalized rows; each layer returns its column slice
        when the attention module calls it."""
        layers = [self.get_submodule(name) for name in self._qla_template.packed_attention_inputs]
        packed = gemm(normed_rows if q is None else q, scale, zero, plan, out_dtype=normed_rows.dtype)
        for layer, output in zip(layers, packed.split([layer.out_features for layer in layers], dim=1)):
            layer.hand_over(output)
