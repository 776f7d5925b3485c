"""The `simulate` backend: fake quantization in floating point, differentiable, and numerically the
deployed model op for op.

It uses the reference's own pieces (norm, scales, epilogue) and replaces only the integer GEMM by
its floating-point equivalent: `(s_x·q_x) · (s_w·q_w)ᵀ`, which equals `acc · s_x · s_w` up to fp32
summation order. Rounding passes gradients straight through (STE); values clipped by a static
scale get zero gradient. Dynamic per-token scales are treated as constants (detached).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.weights import QuantizedWeight
from ..quant.primitives import absmax_scale, qrange, round_ste
from . import reference


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, bits: int, zero_point: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """s · (clamp(rint(x/s) + z) − z) with a straight-through rounding gradient; scale broadcasts per row."""
    lo, hi = qrange(bits)
    scale = scale.reshape(-1, 1) if scale.dim() else scale
    scaled = x / scale
    codes = round_ste(scaled)
    if zero_point is not None:
        zero = zero_point.float().reshape(())
        return (codes + zero).clamp(lo, hi).sub(zero) * scale
    return codes.clamp(lo, hi) * scale


def fake_quantize_activation(
    normed: torch.Tensor, bits: int, static_scale: Optional[torch.Tensor], zero_point: Optional[torch.Tensor]
) -> torch.Tensor:
    if static_scale is None:
        scale = absmax_scale(normed.detach().abs().amax(dim=-1), bits)
    else:
        scale = static_scale.float().reshape(())
    return fake_quantize(normed, scale, bits, zero_point)


def quantized_linear(
    x: torch.Tensor,
    weight: QuantizedWeight,
    act_bits: Optional[int],
    static_scale: Optional[torch.Tensor],
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    lowrank_t: Optional[torch.Tensor] = None,
    lowrank_u: Optional[torch.Tensor] = None,
    fullrank_x: Optional[torch.Tensor] = None,
    fullrank_w: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fake-quantized twin of quantize_activation → fused_linear for a linear layer."""
    w = weight.dequantize()
    if act_bits is None:  # W4A16: the kernel multiplies activation-dtype operands
        y = x.float() @ w.to(x.dtype).float().t()
    else:
        y = fake_quantize_activation(x.float(), act_bits, static_scale, zero_point) @ w.t()
    return reference.epilogue(y, lowrank_t, lowrank_u, fullrank_x, fullrank_w, bias, "none", residual).to(out_dtype)
