"""The specification: every qla op in plain PyTorch, integer-exact where the kernels are integer.

These functions define semantics; the Triton and CUDA kernels are tested against them, and the
`simulate` backend reuses their floating-point parts. They assume arguments already validated by
`qla_kernels.ops.checks` (the public entry points in `qla_kernels.ops` do that).

The multi-segment fused linear (DESIGN.md):

    Y = act( dequant(A_q · W_qᵀ) − z·colsum(W_q) term + T·Uᵀ + X_c·W_cᵀ + bias ) + residual

Integer segment: the int32 accumulator is computed exactly (fp64 holds every partial sum of
int8 × int8 products exactly for K < 2^39), converted to fp32 and scaled `acc * s_x[m] * s_w[n]`
in that order. Everything after it is fp32, then cast to `out_dtype` or re-quantized per token.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..formats.weights import dequantize_weight, integer_weight
from ..quant.hadamard import rotate as hadamard_rotate
from ..quant.primitives import absmax_scale, quantize_with_scale
from .operands import FusedLinearOperands

# Codes are indices (the Triton and C++ kernels take them): activations added later go at the end.
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "quick_gelu", "swiglu", "geglu", "geglu_tanh", "relu6", "silu")
# Gated activations act(gate)·up: the weight's first half of rows is the gate, its second half up.
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
NORM_KINDS = ("none", "layernorm", "rmsnorm")


def normalize(
    x: torch.Tensor,
    norm_kind: str,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """LayerNorm / RMSNorm over the last dimension in fp32 (the pre-kernel keeps it in registers)."""
    x = x.float()
    if norm_kind == "none":
        return x
    if norm_kind == "layernorm":
        mean = x.mean(dim=-1, keepdim=True)
        centered = x - mean
        y = centered * torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
    else:
        y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def down_projection(normed: torch.Tensor, down_proj: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """T = norm(x) · A: inputs rounded to A's dtype (tensor-core operands), fp32 accumulation."""
    return (normed.to(down_proj.dtype).float() @ down_proj.float()).to(out_dtype)


def dwsep_down(
    h: torch.Tensor,
    height: int,
    width: int,
    prefix_tokens: int,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    down_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor],
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """QLA's DW-separable down path, in fp32: h [B, P + H·W, D] (P prefix tokens that bypass the
    conv) → depthwise 3×3 (zero padding, weight [D, 9] row-major taps; [D, 3] on a 1 × W grid: a
    1-D conv's, the middle row) + bias on the H×W grid → GELU (erf) → ·down_weightᵀ [D → r] + bias.
    `token_mask` [B, H·W] multiplies the grid tokens' inputs of the conv (0 for padding tokens).
    Returns T [B·(P + H·W), r] in h.dtype."""
    batch, tokens, dim = h.shape
    if dw_weight.shape[1] == 3:
        dw_weight = F.pad(dw_weight, (3, 3))
    x = h.float()
    prefix, body = x[:, :prefix_tokens], x[:, prefix_tokens:]
    if token_mask is not None:
        body = body * token_mask.float()[:, :, None]
    grid = body.transpose(1, 2).reshape(batch, dim, height, width)
    bias = None if dw_bias is None else dw_bias.float()
    body = F.conv2d(grid, dw_weight.float().reshape(dim, 1, 3, 3), bias, padding=1, groups=dim)
    mixed = F.gelu(torch.cat([prefix, body.reshape(batch, dim, height * width).transpose(1, 2)], dim=1))
    t = mixed @ down_weight.float().t()
    if down_bias is not None:
        t = t + down_bias.float()
    return t.reshape(batch * tokens, t.shape[-1]).to(h.dtype)  # explicit width: batch 0 has no -1


def quantize_activation(
    x: torch.Tensor,
    bits: int,
    static_scale: Optional[torch.Tensor],
    zero_point: Optional[torch.Tensor],
    norm_kind: str,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    norm_eps: float,
    down_proj: Optional[torch.Tensor],
    down_from_input: bool = False,
    rotate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation pre-op: [norm] → [x·R] → int8 per token (dynamic) or per tensor (static) →
    [T = norm(x)·A], or with `down_from_input` T = x·A from the un-normalized input (QwT's T =
    x·V_r). `rotate`: the codes quantize the fp32 norm(x)·R (quant/hadamard.py; a rotating
    layer's stored weight is W·R); T is formed from the unrotated values.

    Returns (q int8 [M, K], scale fp32 [M], t [M, r] in x.dtype, r = 0 without down_proj).
    With a zero point (static only): at bits <= 7 q holds q − z (exact in int8, the GEMM needs no
    zero term); at 8 bits q holds the raw code and the GEMM subtracts z·colsum(W_q).
    """
    normed = normalize(x, norm_kind, norm_weight, norm_bias, norm_eps)
    quantized = hadamard_rotate(normed) if rotate else normed
    rows = x.shape[0]
    if static_scale is None:
        scale = absmax_scale(quantized.abs().amax(dim=-1), bits)
    else:
        scale = static_scale.float().reshape(()).expand(rows).clone()
    q = quantize_with_scale(quantized, scale, bits, zero_point)
    if zero_point is not None and bits <= 7:
        q = (q.to(torch.int16) - zero_point.to(torch.int16)).to(torch.int8)
    if down_proj is None:
        t = x.new_empty((rows, 0))
    else:
        t = down_projection(x.float() if down_from_input else normed, down_proj, x.dtype)
    return q, scale, t


def normalize_quantize_activation(
    x: torch.Tensor,
    bits: int,
    static_scale: Optional[torch.Tensor],
    zero_point: Optional[torch.Tensor],
    norm_kind: str,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    norm_eps: float,
    down_proj: Optional[torch.Tensor],
    down_from_input: bool = False,
    rotate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm(x) in x.dtype, *quantize_activation(x with the norm)): the codes, scale and T come
    from the fp32 normalized values, not from their rounding to x.dtype; norm(x) is unrotated."""
    normed = normalize(x, norm_kind, norm_weight, norm_bias, norm_eps).to(x.dtype)
    return (normed, *quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias,
                                         norm_eps, down_proj, down_from_input, rotate))


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "relu":
        return F.relu(y)
    if activation == "quick_gelu":  # CLIP's x·σ(1.702x)
        return y * torch.sigmoid(1.702 * y)
    if activation == "relu6":  # MobileNet's
        return F.relu6(y)
    if activation == "silu":  # EfficientNet's, RegNet-Y's
        return F.silu(y)
    # Gated: the first half of the columns is the gate, the second half the up projection (the
    # layout of torch.cat([gate, up]), so packed gate/up weights can be views of the layers' own).
    gate, up = y.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if activation == "geglu_tanh" else "none") * up


def epilogue(
    y: torch.Tensor,
    lowrank_t: Optional[torch.Tensor],
    lowrank_u: Optional[torch.Tensor],
    fullrank_x: Optional[torch.Tensor],
    fullrank_w: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    activation: str,
    residual: Optional[torch.Tensor],
    residual_before_activation: bool = False,
) -> torch.Tensor:
    """Everything after the main segment's dequantization, in fp32: act(y + T·Uᵀ + X_c·W_cᵀ + bias)
    + residual, or with `residual_before_activation` act(y + bias + residual) + T·Uᵀ + X_c·W_cᵀ
    (a residual block's output, ResNet's relu after the shortcut add, with the corrections beside
    the block, QwT's and QLA's, added to it). Differentiable (simulate uses it)."""
    if residual is not None and residual_before_activation:
        y = apply_activation(y + (0.0 if bias is None else bias.float()) + residual.float(), activation)
        return epilogue(y, lowrank_t, lowrank_u, fullrank_x, fullrank_w, None, "none", None)
    if lowrank_t is not None:
        y = y + lowrank_t.float() @ lowrank_u.float().t()
    if fullrank_x is not None:
        y = y + fullrank_x.float() @ fullrank_w.float().t()
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation)
    if residual is not None:
        y = y + residual.float()
    return y


def quantize_output(y: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric re-quantization of an fp32 epilogue result for the next layer."""
    scale = absmax_scale(y.abs().amax(dim=-1), bits)
    return quantize_with_scale(y, scale, bits), scale


def main_segment(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    a_zero_point: Optional[torch.Tensor],
    weight: torch.Tensor,
    weight_format: str,
    weight_scale: torch.Tensor,
    weight_group_scale: Optional[torch.Tensor],
    weight_zero: Optional[torch.Tensor],
    group_size: int,
    weight_colsum: Optional[torch.Tensor],
) -> torch.Tensor:
    """The dequantized main GEMM in fp32 [M, N]."""
    if weight_format == "uint4_asym_groups":
        w = dequantize_weight(weight_format, weight, weight_scale, None, weight_zero, group_size)
        return a.float() @ w.to(a.dtype).float().t()
    acc = a.double() @ integer_weight(weight_format, weight, weight_group_scale, group_size).double().t()
    if a_zero_point is not None:
        acc = acc - a_zero_point.double().reshape(-1, 1) * weight_colsum.double()[None, :]
    return acc.float() * a_scale.float().reshape(-1, 1) * weight_scale[None, :]


def gather_activation_rows(
    a: torch.Tensor, a_scale: Optional[torch.Tensor], a_zero_point: Optional[torch.Tensor], gather_rows: torch.Tensor
):
    """Rows of A (and its per-row scale / zero point) in GEMM order; index −1 (or any index outside
    A's rows) is a padding row whose value is zero: its codes and its scale are zero, so that a
    per-tensor zero point cancels."""
    valid = (gather_rows >= 0) & (gather_rows < a.shape[0])
    index = torch.where(valid, gather_rows, 0).long()
    a = torch.where(valid[:, None], a[index], torch.zeros((), dtype=a.dtype))
    if a_scale is not None:
        per_row = a_scale[index] if a_scale.numel() > 1 else a_scale.reshape(1).expand(len(index))
        a_scale = torch.where(valid, per_row, torch.zeros((), dtype=a_scale.dtype))
    if a_zero_point is not None and a_zero_point.numel() > 1:
        a_zero_point = torch.where(valid, a_zero_point[index], torch.zeros((), dtype=a_zero_point.dtype))
    return a, a_scale, a_zero_point


def scatter_rows_to(values: torch.Tensor, scatter_rows: torch.Tensor, out_rows: int) -> torch.Tensor:
    """out[scatter_rows[m]] = values[m]; rows mapped to −1 (or outside the output) are dropped,
    unmapped rows are zero."""
    valid = (scatter_rows >= 0) & (scatter_rows < out_rows)
    out = values.new_zeros((out_rows, *values.shape[1:]))
    out[scatter_rows[valid].long()] = values[valid]
    return out


def fused_linear(operands: FusedLinearOperands) -> Tuple[torch.Tensor, torch.Tensor]:
    """The multi-segment fused linear. Returns (y [out_rows, N'] in out_dtype, empty) or, with
    requant_bits, (q int8 [out_rows, N'], scale fp32 [out_rows]); N' = N/2 for SwiGLU, else N.

    Row maps (Swin's window order): GEMM row m reads A row gather_rows[m] (−1: zero padding) and
    writes output row scatter_rows[m] (−1: dropped; output rows nothing maps to are zero, and
    re-quantize as zero rows); T, X_c and the residual are indexed by that destination row.
    Without maps, GEMM row m is A row m and output row m. `requant_rotate`: each output row is
    rotated (y·R, the next layer's rotation) in fp32 before it is re-quantized.
    """
    a, a_scale, a_zero_point = operands.a, operands.a_scale, operands.a_zero_point
    lowrank_t, fullrank_x, residual = operands.lowrank_t, operands.fullrank_x, operands.residual
    scatter_rows, out_rows = operands.scatter_rows, operands.out_rows
    if operands.gather_rows is not None:
        a, a_scale, a_zero_point = gather_activation_rows(a, a_scale, a_zero_point, operands.gather_rows)
    if scatter_rows is not None:
        # A dropped GEMM row reads a zero row appended after the destination rows.
        valid = (scatter_rows >= 0) & (scatter_rows < out_rows)
        destination = torch.where(valid, scatter_rows, out_rows).long()
        pick = lambda rows: None if rows is None else F.pad(rows, (0, 0, 0, 1))[destination]  # noqa: E731
        lowrank_t, fullrank_x, residual = pick(lowrank_t), pick(fullrank_x), pick(residual)
    y = main_segment(a, a_scale, a_zero_point, operands.weight, operands.weight_format, operands.weight_scale,
                     operands.weight_group_scale, operands.weight_zero, operands.group_size, operands.weight_colsum)
    y = epilogue(y, lowrank_t, operands.lowrank_u, fullrank_x, operands.fullrank_w, operands.bias,
                 operands.activation, residual, operands.residual_before_activation)
    if scatter_rows is not None:
        y = scatter_rows_to(y, scatter_rows, out_rows)
    if operands.requant_bits:
        return quantize_output(hadamard_rotate(y.float()) if operands.requant_rotate else y, operands.requant_bits)
    return y.to(operands.out_dtype), y.new_empty((0,), dtype=torch.float32)


def output_features(weight_out_features: int, activation: str) -> int:
    return weight_out_features // 2 if activation in GATED_ACTIVATIONS else weight_out_features
