"""qla ops behind one dispatch point: validate on the host, then run the selected backend.

- `quantize_activation`: [LayerNorm | RMSNorm] → int8 per token (dynamic) or per tensor (static,
  optional zero point) → optional T = norm(x)·A for the low-rank segment.
- `fused_linear`: the multi-segment fused linear of DESIGN.md.
- `quantized_linear`: quantize_activation + fused_linear for a plain linear layer, or its
  differentiable fake-quantized twin under the `simulate` backend.
- `quantized_conv2d`: a channels-last convolution as GEMMs over its windows (ops/conv.py).
- `quantized_attention`: the fully quantized attention core, q·kᵀ and A·v on integer units
  (ops/attention.py).
- `attention_rows`: floating-point self-attention on q/k/v rows as the GEMMs wrote them.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..formats.weights import QuantizedWeight
from . import cpu, cuda, library, reference, simulate  # noqa: F401  (cpu, cuda and library register their implementations)
from . import triton as triton_backend  # noqa: F401  (registers the Triton implementations)
from .attention import (AttentionQuantization, TokenwiseLog2Quantization, check_attention, check_attention_rows,
                        simulated_attention,
                        simulated_log2_attention)
from ..quant.hadamard import check_rotatable
from .checks import (FLOAT_DTYPES, check_dwsep_down, check_fused_linear, check_quantize_activation, check_rotation,
                     check_row_map, check_tensor)
from .conv import ConvGeometry, ConvPlan, check_conv_input, simulated_conv2d
from .dispatch import BACKENDS, BackendInfo, backends, implementation, requested_backend, resolve_backend, use_backend
from .operands import FusedLinearOperands, fused_linear_operands, gemm_zero_point
from .row_maps import RowMap


def quantize_activation(
    x: torch.Tensor,
    bits: int = 8,
    *,
    static_scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    norm_kind: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
    down_proj: Optional[torch.Tensor] = None,
    t_out: Optional[torch.Tensor] = None,
    down_from_input: bool = False,
    rotate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantizes activations x [M, K] for the integer GEMM.

    Returns (q int8 [M, K], scale fp32 [M], t [M, r]); t has r = 0 columns without `down_proj`
    [K, r]. `static_scale` / `zero_point` are per-tensor ([1], fp32 / int8, signed domain). At
    bits <= 7 with a zero point, q holds q − z; at 8 bits pass the zero point on to fused_linear.
    `t_out` [M, r] (rows may be strided, e.g. `shared_t[:, 16:48]`) receives T in place, so several
    corrections can fill one low-rank T buffer; it is returned as t. `down_from_input`: T = x·A
    from the raw input instead of norm(x)·A (QwT's T = x·V_r from the same read of x).
    `rotate`: the codes and scale are those of norm(x)·R in fp32 (`hadamard_rotate`: what a
    rotating layer, whose stored weight is W·R, multiplies), rotated in the pre-kernel's read of
    x; T is formed from the unrotated values. Under the `simulate` backend this integer op runs
    on `reference`.
    """
    if not isinstance(down_from_input, bool):
        raise ValueError(f"down_from_input must be a bool, got {down_from_input!r}")
    check_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
                              t_out)
    check_rotation("rotate", rotate, x.shape[1])
    if t_out is not None:
        args = (x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, float(norm_eps), down_proj, t_out,
                down_from_input, rotate)
        q, scale = implementation("quantize_activation_into", x.device, *args).run(*args)
        return q, scale, t_out
    args = (x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, float(norm_eps), down_proj,
            down_from_input, rotate)
    return implementation("quantize_activation", x.device, *args).eager(x)(*args)


def normalize_activation(
    x: torch.Tensor,
    norm_kind: str,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
    *,
    down_proj: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The W4A16 decode pre-op: LayerNorm / RMSNorm of x [M, K] in fp32, returned in x.dtype,
    and T = norm(x)·down_proj [M, r] (LoRA down) from the same read of x (r = 0 without it)."""
    check_quantize_activation(x, 8, None, None, norm_kind, norm_weight, norm_bias, norm_eps, down_proj)
    if norm_kind == "none":
        raise ValueError("norm_kind must be 'layernorm' or 'rmsnorm' (without a norm there is nothing to do)")
    args = (x, norm_kind, norm_weight, norm_bias, float(norm_eps), down_proj)
    return implementation("normalize_activation", x.device, *args).eager(x)(*args)


def normalize_quantize_activation(
    x: torch.Tensor,
    bits: int,
    norm_kind: str,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
    *,
    static_scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    down_proj: Optional[torch.Tensor] = None,
    down_from_input: bool = False,
    rotate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm(x) in x.dtype, q, scale, t) from one read of x: `quantize_activation` with the norm,
    also writing the normalized activations (a post-norm block's x1, the MLP's residual; a block's
    attention input when something besides the GEMM reads it). The codes, scale and T come from
    the fp32 normalized values; `down_from_input` and `rotate` as in quantize_activation (the
    normalized activations written are unrotated)."""
    if not isinstance(down_from_input, bool):
        raise ValueError(f"down_from_input must be a bool, got {down_from_input!r}")
    check_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj)
    check_rotation("rotate", rotate, x.shape[1])
    if norm_kind == "none":
        raise ValueError("norm_kind must be 'layernorm' or 'rmsnorm' (without a norm use quantize_activation)")
    args = (x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, float(norm_eps), down_proj,
            down_from_input, rotate)
    return implementation("normalize_quantize_activation", x.device, *args).eager(x)(*args)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x·R over the last dimension (quant/hadamard.py: R = D·(H_m ⊗ H_P)/√K) for x [..., K] of a
    float dtype, computed in fp32 and returned in x's dtype: what a rotating QuantLinear's
    activation quantizer reads. The reference is `quant.hadamard.rotate` (differentiable); the
    cpu kernel rotates each row in cache by a fast Walsh-Hadamard transform, equal to it up to
    fp32 summation order."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor ({', '.join(map(str, FLOAT_DTYPES))}), got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a feature dimension to rotate")
    check_rotatable(x.shape[-1], "x.shape[-1]")
    return implementation("hadamard_rotate", x.device, x).eager(x)(x)


def dwsep_down(
    h: torch.Tensor,
    height: int,
    width: int,
    prefix_tokens: int,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    down_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """QLA's DW-separable down path T = down(GELU(DW3×3(h))) on tokens h [B, P + H·W, D]: the P
    prefix (class / distillation / register) tokens bypass the conv. dw_weight is [D, 9] or the
    conv's own [D, 1, 3, 3]; for a 1-D sequence of W tokens (height 1) also a 1-D conv's [D, 3] or
    [D, 1, 3]: the sequence is a 1 × W grid. down_weight [r, D] (nn.Linear layout). `token_mask`
    [B, H·W] (float, int or bool) multiplies the grid tokens' inputs of the conv: 0 for the padding
    tokens of a batch of sequences. Returns
    [B·(P + H·W), r] in h.dtype, the T of the proj GEMM's low-rank segment."""
    if isinstance(dw_weight, torch.Tensor) and dw_weight.dim() in (3, 4) and dw_weight.shape[1] == 1:
        dw_weight = dw_weight.reshape(dw_weight.shape[0], -1)
    check_dwsep_down(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias, token_mask)
    args = (h, height, width, prefix_tokens, dw_weight.contiguous(), dw_bias, down_weight, down_bias, token_mask)
    return implementation("dwsep_down", h.device, *args).eager(h)(*args)


def fused_linear(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    weight: QuantizedWeight,
    *,
    a_zero_point: Optional[torch.Tensor] = None,
    lowrank_t: Optional[torch.Tensor] = None,
    lowrank_u: Optional[torch.Tensor] = None,
    fullrank_x: Optional[torch.Tensor] = None,
    fullrank_w: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float16,
    requant_bits: int = 0,
    gather_rows: Optional[RowMap] = None,
    scatter_rows: Optional[RowMap] = None,
    out_rows: Optional[int] = None,
    residual_before_activation: bool = False,
    requant_rotate: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Y = act(dequant(A·Wᵀ) − z·colsum + T·Uᵀ + X_c·W_cᵀ + bias) + residual, or with
    `residual_before_activation` act(dequant(A·Wᵀ) − z·colsum + bias + residual) + T·Uᵀ + X_c·W_cᵀ
    (a residual block's output, with the corrections beside the block added to it).

    `a` is int8 [M, K] with `a_scale` fp32 [M] or [1] for the integer formats, or fp16/bf16/fp32
    [M, K] with `a_scale` None for "uint4_asym_groups" (W4A16). Low-rank T [M, r] / U [N, r] and
    full-rank X_c [M, K_c] / W_c [N, K_c] come in pairs. activation: "none", "gelu" (erf),
    "gelu_tanh", "relu", "relu6", "silu", "quick_gelu" (CLIP's x·σ(1.702x)), or gated act(gate)·up with the gate in the weight's first N/2 rows and up
    in its last N/2 (output N/2 wide): "swiglu" (silu), "geglu" (gelu erf), "geglu_tanh".
    Returns Y in `out_dtype`, or with `requant_bits` (2..8) the per-token re-quantized (q, scale);
    `requant_rotate`: of Y·R in fp32 (the next layer's rotation, `hadamard_rotate`).

    Row maps (`RowMap`, checked once where they are built): GEMM row m reads A row
    `gather_rows.indices[m]` (−1: zero padding) and writes output row `scatter_rows.indices[m]`
    (−1: dropped) of `out_rows`; T, X_c and the residual are indexed by destination row. A
    gather map indexes a's rows, a scatter map the `out_rows`; output rows no GEMM row maps to are
    zero.
    """
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        raise ValueError(f"a must be a 2-D tensor [tokens, in_features], got {getattr(a, 'shape', type(a))}")
    check_row_map("gather_rows", gather_rows, a.shape[0], "a has")
    if out_rows is None:
        out_rows = a.shape[0] if gather_rows is None else gather_rows.indices.shape[0]
    check_row_map("scatter_rows", scatter_rows, out_rows, "out_rows is")
    operands = fused_linear_operands(
        a, a_scale, weight, a_zero_point=a_zero_point, lowrank_t=lowrank_t, lowrank_u=lowrank_u,
        fullrank_x=fullrank_x, fullrank_w=fullrank_w, bias=bias, activation=activation, residual=residual,
        out_dtype=out_dtype, requant_bits=requant_bits, out_rows=out_rows,
        gather_rows=None if gather_rows is None else gather_rows.indices,
        scatter_rows=None if scatter_rows is None else scatter_rows.indices,
        residual_before_activation=residual_before_activation, requant_rotate=requant_rotate)
    check_fused_linear(operands)
    out, out_scale = implementation("fused_linear", a.device, operands).eager(a)(operands)
    return (out, out_scale) if requant_bits else out


def quantized_linear(
    x: torch.Tensor,
    weight: QuantizedWeight,
    act_bits: Optional[int],
    *,
    static_scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    lowrank_t: Optional[torch.Tensor] = None,
    lowrank_u: Optional[torch.Tensor] = None,
    fullrank_x: Optional[torch.Tensor] = None,
    fullrank_w: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A quantized nn.Linear on 2-D x [M, K]: activation quantization (act_bits None: W4A16,
    none) then the fused GEMM with bias, optional low-rank / full-rank segments and an optional
    residual [M, N] added in its epilogue, output in x.dtype. Differentiable under `simulate`."""
    segments = dict(lowrank_t=lowrank_t, lowrank_u=lowrank_u, fullrank_x=fullrank_x, fullrank_w=fullrank_w,
                    residual=residual)
    if resolve_backend(x.device) == "simulate":
        check_quantize_activation(x, act_bits or 8, static_scale, zero_point, "none", None, None, 1.0, None)
        # The operands the integer path would check, with codes of x's shape standing in for its
        # quantization: simulate refuses what every kernel refuses, with the same ValueError.
        codes = x if act_bits is None else x.new_empty(x.shape, dtype=torch.int8)
        codes_scale = None if act_bits is None else x.new_empty(x.shape[:1], dtype=torch.float32)
        check_fused_linear(fused_linear_operands(codes, codes_scale, weight, a_zero_point=gemm_zero_point(zero_point, act_bits or 8),
                                                 bias=bias, out_dtype=x.dtype, **segments))
        return simulate.quantized_linear(x, weight, act_bits, static_scale, zero_point, bias, x.dtype, **segments)
    if act_bits is None:
        return fused_linear(x, None, weight, bias=bias, out_dtype=x.dtype, **segments)
    q, scale, _ = quantize_activation(x, act_bits, static_scale=static_scale, zero_point=zero_point)
    return fused_linear(q, scale, weight, a_zero_point=gemm_zero_point(zero_point, act_bits), bias=bias,
                        out_dtype=x.dtype, **segments)


def quantized_conv2d(
    x: torch.Tensor,
    weight: QuantizedWeight,
    geometry: ConvGeometry,
    act_bits: int,
    *,
    static_scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A quantized convolution on channels-last x [N, H, W, C] → [N, Ho, Wo, O] in x.dtype
    (ops/conv.py: the windows quantized per output pixel, or per tensor with `static_scale` /
    `zero_point`; each group's GEMM on the selected backend's `conv_gemm`: Triton's implicit GEMM,
    or the gathered windows on its fused linear). `weight` is an
    integer-format [O, kh·kw·C/g] weight (`conv_weight_matrix` order; `colsum` set with a zero
    point); the epilogue adds bias, applies `activation` and adds `residual` [N, Ho, Wo, O].
    Differentiable under `simulate`."""
    if not isinstance(geometry, ConvGeometry):
        raise ValueError(f"geometry must be a ConvGeometry, got {type(geometry).__name__}")
    plan = ConvPlan(weight, geometry, act_bits, static_scale, zero_point, bias, activation=activation)
    plan.check()
    check_conv_input("x", x, plan)
    batch, height, width, _ = x.shape
    check_tensor("residual", residual, device=x.device, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                 shape=(batch, *geometry.output_size(height, width), plan.out_channels), contiguous=False)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    if resolve_backend(x.device) == "simulate":
        return simulated_conv2d(x, plan, residual=residual)
    return plan.run(x, residual=residual)


def quantized_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    quantization: Union[AttentionQuantization, TokenwiseLog2Quantization],
    scaling: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(Q(q)·Q(k)ᵀ·scaling + mask) quantized, times Q(v): query [B, H, Sq, D], key and value
    [B, H, Sk, D] → [B, H, Sq, D] in the query's dtype (ops/attention.py states the numerics and
    the mask convention). `quantization`: AQ-DETR's static quantizers (`AttentionQuantization`)
    or the `paper` preset's (`TokenwiseLog2Quantization`: per token at run time, log2 A).
    Differentiable under `simulate` (LSQ gradients for trainable steps; straight-through for the
    preset's)."""
    check_attention(query, key, value, quantization, scaling, mask)
    scaling = float(scaling)
    simulated = resolve_backend(query.device) == "simulate"
    if isinstance(quantization, TokenwiseLog2Quantization):
        if simulated:
            return simulated_log2_attention(query, key, value, quantization.bits, scaling, mask)
        args = (query, key, value, quantization.bits, scaling, mask)
        return implementation("log2_attention", query.device, *args).run(*args)
    if simulated:
        return simulated_attention(query, key, value, quantization, scaling, mask)
    steps, zeros = quantization.kernel_operands()
    args = (query, key, value, quantization.bits, steps, zeros, scaling, mask)
    return implementation("quantized_attention", query.device, *args).run(*args)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tokens: int,
    heads: int,
    scale: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v per sequence and head, on rows as the q/k/v GEMMs write them:
    query, key and value [sequences · tokens, heads · head_dim] (column slices of one packed
    output are taken where they are), the context returned as [sequences · tokens, heads ·
    head_dim] rows in the query's dtype, ready for the output projection. `scale` defaults to
    1/√head_dim; `mask` is bool (True keeps) or additive float, broadcast to [sequences, heads,
    tokens, tokens]. A query whose every key is masked gets zeros (as scaled_dot_product_attention)."""
    check_attention_rows(query, key, value, tokens, heads, scale, mask)
    args = (query, key, value, tokens, heads, None if scale is None else float(scale), mask)
    return implementation("attention_rows", query.device, *args).eager(query)(*args)


__all__ = [
    "BACKENDS", "BackendInfo", "FusedLinearOperands", "RowMap", "backends", "requested_backend", "resolve_backend", "use_backend",
    "quantize_activation", "normalize_activation", "normalize_quantize_activation", "dwsep_down", "fused_linear", "quantized_linear",
    "hadamard_rotate",
    "gemm_zero_point", "library", "reference", "simulate", "ConvGeometry", "ConvPlan", "quantized_conv2d",
    "AttentionQuantization", "TokenwiseLog2Quantization", "quantized_attention", "attention_rows",
]
