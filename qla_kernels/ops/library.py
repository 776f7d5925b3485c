"""torch.library custom ops (namespace `qla`), each with its fake (shape-only) twin beside it.

The reference ops run on any device. Custom ops keep the ops opaque to torch.compile (no graph
breaks inside a block) and give them a schema that `torch.library.opcheck` verifies.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..quant.hadamard import rotate
from . import reference
from .attention import AttentionQuantization, reference_attention, reference_attention_rows, reference_log2_attention
from .dispatch import register
from .operands import FusedLinearOperands, fused_linear_custom_op, refuse_backward


@torch.library.custom_op("qla::quantize_activation", mutates_args=())
def quantize_activation(
    x: Tensor,
    bits: int,
    static_scale: Optional[Tensor],
    zero_point: Optional[Tensor],
    norm_kind: str,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    norm_eps: float,
    down_proj: Optional[Tensor],
    down_from_input: bool = False,
    rotate: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    return reference.quantize_activation(
        x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj, down_from_input,
        rotate
    )


def quantize_activation_fake(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
                             down_from_input=False, rotate=False):
    """Shapes of quantize_activation's outputs (shared by every backend's op)."""
    rows = x.shape[0]
    rank = 0 if down_proj is None else down_proj.shape[1]
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows, rank)),
    )


quantize_activation.register_fake(quantize_activation_fake)


@torch.library.custom_op("qla::quantize_activation_into", mutates_args=("t_out",))
def quantize_activation_into(
    x: Tensor,
    bits: int,
    static_scale: Optional[Tensor],
    zero_point: Optional[Tensor],
    norm_kind: str,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    norm_eps: float,
    down_proj: Tensor,
    t_out: Tensor,
    down_from_input: bool = False,
    rotate: bool = False,
) -> Tuple[Tensor, Tensor]:
    """quantize_activation writing T into `t_out` (a column range of a T buffer shared by corrections)."""
    q, scale, t = reference.quantize_activation(
        x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj, down_from_input,
        rotate
    )
    t_out.copy_(t)
    return q, scale


def quantize_activation_into_fake(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                                  down_proj, t_out, down_from_input=False, rotate=False):
    q, scale, _ = quantize_activation_fake(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias,
                                           norm_eps, None)
    return q, scale


quantize_activation_into.register_fake(quantize_activation_into_fake)


def fused_linear_fake(operands: FusedLinearOperands) -> Tuple[Tensor, Tensor]:
    """Shapes of fused_linear's outputs (shared by every backend's op)."""
    a, rows = operands.a, operands.out_rows
    cols = reference.output_features(operands.weight.shape[0], operands.activation)
    if operands.requant_bits:
        return a.new_empty((rows, cols), dtype=torch.int8), a.new_empty((rows,), dtype=torch.float32)
    return a.new_empty((rows, cols), dtype=operands.out_dtype), a.new_empty((0,), dtype=torch.float32)


fused_linear = fused_linear_custom_op("qla::fused_linear", reference.fused_linear, fused_linear_fake)


@torch.library.custom_op("qla::normalize_activation", mutates_args=())
def normalize_activation(
    x: Tensor,
    norm_kind: str,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    norm_eps: float,
    down_proj: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    normed = reference.normalize(x, norm_kind, norm_weight, norm_bias, norm_eps)
    t = x.new_empty((x.shape[0], 0)) if down_proj is None else reference.down_projection(normed, down_proj, x.dtype)
    return normed.to(x.dtype), t


def normalize_activation_fake(x, norm_kind, norm_weight, norm_bias, norm_eps, down_proj):
    rank = 0 if down_proj is None else down_proj.shape[1]
    return x.new_empty(x.shape), x.new_empty((x.shape[0], rank))


normalize_activation.register_fake(normalize_activation_fake)


@torch.library.custom_op("qla::normalize_quantize_activation", mutates_args=())
def normalize_quantize_activation(
    x: Tensor,
    bits: int,
    static_scale: Optional[Tensor],
    zero_point: Optional[Tensor],
    norm_kind: str,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    norm_eps: float,
    down_proj: Optional[Tensor],
    down_from_input: bool = False,
    rotate: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference.normalize_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight,
                                                   norm_bias, norm_eps, down_proj, down_from_input, rotate)


def normalize_quantize_activation_fake(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                                       down_proj, down_from_input=False, rotate=False):
    return (x.new_empty(x.shape), *quantize_activation_fake(x, bits, static_scale, zero_point, norm_kind, norm_weight,
                                                            norm_bias, norm_eps, down_proj))


normalize_quantize_activation.register_fake(normalize_quantize_activation_fake)


@torch.library.custom_op("qla::dwsep_down", mutates_args=())
def dwsep_down(h: Tensor, height: int, width: int, prefix_tokens: int, dw_weight: Tensor, dw_bias: Optional[Tensor],
               down_weight: Tensor, down_bias: Optional[Tensor], token_mask: Optional[Tensor]) -> Tensor:
    return reference.dwsep_down(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias, token_mask)


def dwsep_down_fake(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias, token_mask):
    return h.new_empty((h.shape[0] * h.shape[1], down_weight.shape[0]))


dwsep_down.register_fake(dwsep_down_fake)


@torch.library.custom_op("qla::quantized_attention", mutates_args=())
def quantized_attention(query: Tensor, key: Tensor, value: Tensor, bits: int, scales: Tensor, zeros: Optional[Tensor],
                        scaling: float, mask: Optional[Tensor]) -> Tensor:
    return reference_attention(query, key, value, AttentionQuantization(bits, scales, zeros), scaling, mask)


def attention_fake(query, *_):
    """Both attention cores' output: the query's shape and dtype."""
    return query.new_empty(query.shape)


quantized_attention.register_fake(attention_fake)


@torch.library.custom_op("qla::log2_attention", mutates_args=())
def log2_attention(query: Tensor, key: Tensor, value: Tensor, bits: int, scaling: float,
                   mask: Optional[Tensor]) -> Tensor:
    return reference_log2_attention(query, key, value, bits, scaling, mask)


log2_attention.register_fake(attention_fake)


for _op in (quantize_activation, normalize_activation, normalize_quantize_activation, dwsep_down, quantized_attention,
            log2_attention):
    refuse_backward(_op)

# The reference implements every op for every call: the last implementation of every chain.
for _op in ("quantize_activation_into", "normalize_activation", "normalize_quantize_activation", "dwsep_down"):
    register(_op, "reference", getattr(torch.ops.qla, _op))
register("quantize_activation", "reference", torch.ops.qla.quantize_activation, body=reference.quantize_activation)
register("attention_rows", "reference", reference_attention_rows)  # SDPA: traceable and differentiable as it is
register("hadamard_rotate", "reference", rotate)  # torch products: traceable and differentiable as they are
register("quantized_attention", "reference", torch.ops.qla.quantized_attention)
register("log2_attention", "reference", torch.ops.qla.log2_attention)
register("fused_linear", "reference", lambda operands: torch.ops.qla.fused_linear(*operands),
         body=reference.fused_linear)
