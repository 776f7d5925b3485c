"""The pre-norm chain with one packed qkv projection (timm ViT / DeiT / Swin):

    pre1 : x → norm1 → int8 (per token, or the qkv layer's static scale) + T_qwt   quantize_activation
    qkv  : GEMM + bias → [B, N, 3, H, d]                                       fused_linear
    core : q_norm / k_norm → attention on the qkv rows where the GEMM wrote them → attention norm
                                                                                attention_rows
    aq   : attention output → int8                                              quantize_activation
    proj : GEMM + bias + [T_dw]·U_dwᵀ + residual x                 → x1         fused_linear
    pre2 : x1 → norm2 → int8 + T_lora                                           quantize_activation
    fc1  : GEMM + bias + GELU → re-quantized int8 per token for fc2             fused_linear
    fc2  : GEMM + bias + [T_lora | T_qwt]·[U_lora | U_qwt]ᵀ + residual x1 → output   fused_linear

With a `WindowLayout` (Swin) the same chain runs on a [B, H, W, C] feature map: the qkv GEMM
gathers spatial rows into (shifted, padded) window order, the attention core adds the relative-
position bias and shift mask, and proj's epilogue scatters rows back to spatial order, where the
residual and the adapter's T are read.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ...ops import attention_rows
from ...ops.row_maps import RowMap
from ...ops.triton import supports_quantize_activation
from .chain import (
    FusedModule,
    common_reasons,
    down_projection,
    gemm,
    layer_scale,
    mlp,
    normalize_and_quantize,
    quantize_input,
    unexpected_arguments,
)
from .templates import PackedQKVTemplate, attention_heads


class FusedPackedQKVBlock(FusedModule):
    """Mixin placed before a block's own class by `fuse_block`; see the module docstring."""

    _qla_template: PackedQKVTemplate

    _qla_window_grid: Optional[Tuple[int, int]] = None

    def why_not_fused(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str:
        grid = self._qla_window_grid  # windowed blocks: only the grid their window order was read for
        if x.dim() != (3 if grid is None else 4):
            layout = "[batch, tokens, width]" if grid is None else "[batch, height, width, dim]"
            return f"the input is {tuple(x.shape)}; the fused chain takes {layout}"
        if grid is not None and tuple(x.shape[1:3]) != grid:
            return f"the input grid {tuple(x.shape[1:3])} is not the {grid} its window order was read for"
        return common_reasons(self, x) or unexpected_arguments(args, kwargs)

    def chain_plans(self, dtype: Optional[torch.dtype], check: bool) -> Dict[str, object]:
        t = self._qla_template
        part = self.get_submodule
        fc2 = part(t.fc2)
        qwt = getattr(fc2, "lowered_qwt", None)  # QwT's T = x·V_r from pre1's read of x (ranks the pre-kernel takes)
        qwt_down = None
        if qwt is not None and qwt.down is not None:
            qwt_down = qwt.down.to(dtype or qwt.down.dtype)
            if not supports_quantize_activation(qwt_down):
                qwt_down = None
        return {"qkv": part(t.qkv).build_plan(None, dtype, check),
                "proj": part(t.proj).build_plan(layer_scale(self, t.attention_scale), dtype, check),
                "fc1": part(t.fc1).build_plan(None, dtype, check),
                "fc2": fc2.build_plan(layer_scale(self, t.mlp_scale), dtype, check),
                "lora_down": down_projection(self, fc2, dtype), "qwt_down": qwt_down,
                "window_bias": self._window_bias() if self._qla_window_grid is not None else None}

    def _batch_window_rows(self, batch: int) -> RowMap:
        """The row of the flattened [batch, height, width] input each attention row reads and
        writes (−1: padding), from one image's window order (checked at fusion)."""
        per_image = self._qla_window_grid[0] * self._qla_window_grid[1]
        return RowMap(self._qla_window_rows, per_image).batched(batch)

    def _window_bias(self) -> Optional[torch.Tensor]:
        """[windows of one image (or 1), heads, tokens, tokens]: the attention module's relative-
        position bias plus the shifted-window mask, as the windowed attention adds them."""
        attention = self.get_submodule(self._qla_template.attention)
        bias = attention._get_rel_pos_bias() if hasattr(attention, "_get_rel_pos_bias") else None
        mask = self._qla_window_mask
        if mask is not None:
            mask = mask[:, None]
            bias = mask if bias is None else bias + mask
        return None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor, *args, **kwargs):
        why = self.why_not_fused(x, args, kwargs)
        if why:
            return self.own_forward(why, x, *args, **kwargs)
        t = self._qla_template
        part = self.get_submodule
        plans = self.plans(x.dtype)
        qkv, proj, fc1, fc2 = plans["qkv"], plans["proj"], plans["fc1"], plans["fc2"]
        attention = part(t.attention)
        width = x.shape[-1]
        rows = x.reshape(-1, width).contiguous()
        # Windowed attention: the qkv GEMM gathers rows into window order, proj scatters them back.
        window_rows = self._batch_window_rows(x.shape[0]) if self._qla_window_grid is not None else None

        norm1, qwt_down = part(t.norm1), plans["qwt_down"]
        adapter = getattr(part(t.proj), "lowered_adapter", None) is not None  # QLA's DW-separable branch reads norm1(x)
        if adapter:
            normed, q, scale, zero, qwt_t = normalize_and_quantize(rows, norm1, qkv, qwt_down, down_from_input=True)
        else:
            q, scale, zero, qwt_t = quantize_input(rows, qkv, norm1, qwt_down, down_from_input=True)
        packed = gemm(q, scale, zero, qkv, out_dtype=x.dtype, gather_rows=window_rows)
        heads, head_dim = attention_heads(attention, qkv.out_features // 3)
        if window_rows is None:
            sequences, tokens, mask = x.shape[0], x.shape[1], None
        else:
            tokens = self._qla_window_tokens
            sequences = packed.shape[0] // tokens
            mask = self._batch_window_bias(plans["window_bias"], sequences, x.dtype)
        query, key, value = packed.split(heads * head_dim, dim=1)
        query, key = (self._per_head(getattr(attention, name, None), rows, heads)
                      for name, rows in (("q_norm", query), ("k_norm", key)))
        context = attention_rows(query, key, value, tokens, heads, mask=mask)
        context = getattr(attention, "norm", nn.Identity())(context).contiguous()

        adapter_t = None  # in spatial order: proj's epilogue reads T by destination row
        if adapter:
            adapter_t = self.qla_attention.down_path(normed.reshape(x.shape))[0].reshape(rows.shape[0], -1)
        q, scale, zero, _ = quantize_input(context, proj)
        lowrank_t, fullrank_x = part(t.proj).correction_inputs(rows, proj, adapter_t)
        x1 = gemm(q, scale, zero, proj, lowrank_t=lowrank_t, fullrank_x=fullrank_x, residual=rows, out_dtype=x.dtype,
                  scatter_rows=window_rows, out_rows=rows.shape[0])

        lora_down = plans["lora_down"]  # QLA's LoRA: T from the norm2 pre-kernel
        q, scale, zero, lora_t = quantize_input(x1, fc1, part(t.norm2), lora_down)
        lowrank_t, fullrank_x = part(t.fc2).correction_inputs(x1, fc2, lora_t if lora_down is not None else None,
                                                              qwt_t if qwt_down is not None else None)
        out = mlp(q, scale, zero, fc1, fc2, t.activation, x1, x.dtype, lowrank_t, fullrank_x)
        return out.reshape(x.shape)

    @staticmethod
    def _per_head(norm: Optional[nn.Module], rows: torch.Tensor, heads: int) -> torch.Tensor:
        """timm's q_norm / k_norm (over each head's features) on [tokens, heads · head_dim] rows."""
        if norm is None or isinstance(norm, nn.Identity):
            return rows
        return norm(rows.unflatten(1, (heads, -1))).flatten(1)

    @staticmethod
    def _batch_window_bias(bias: Optional[torch.Tensor], windows: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The window bias of one image repeated over the batch's `windows` windows (one row
        broadcasts as it is)."""
        if bias is None:
            return None
        bias = bias.to(dtype)
        return bias if bias.shape[0] == 1 else bias.repeat(windows // bias.shape[0], 1, 1, 1)
