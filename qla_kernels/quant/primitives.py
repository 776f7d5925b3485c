"""Quantize / dequantize primitives: the numerics of DESIGN.md, in one place.

All math is fp32. Scales: `s = max(range, eps) / levels` with eps = 1e-8, so an all-zero slice
gets a tiny positive scale and quantizes to zeros, never NaN. Rounding is `torch.round`, which
rounds half to even (the `rint` of the CUDA and Triton kernels). Non-finite inputs propagate
through the scale (NaN/Inf scale); their integer codes are 0, so the dequantized value is
non-finite too instead of a plausible wrong number.

Granularity names: "tensor" (one scale), "row" (one per row of the last dimension: per token for
activations [M, K], per output channel for weights [N, K]) and "group" (one per `group_size`
consecutive elements of the last dimension).

Zero points are in the signed integer domain by default (codes in [-2^(b-1), 2^(b-1)-1]):
`x ~ s * (q - z)`. `signed=False` gives codes in [0, 2^b - 1] (the W4A16 weight layout).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..formats.weights import GROUP_SCALE_MAX

SCALE_EPS = 1e-8
GRANULARITIES = ("tensor", "row", "group")


def qrange(bits: int, signed: bool = True) -> Tuple[int, int]:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _grouped(x: torch.Tensor, granularity: str, group_size: Optional[int]) -> torch.Tensor:
    """View x so that the reduction for one scale is over its last dimension."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "row":
        return x
    if group_size is None or group_size <= 0 or x.shape[-1] % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide the last dimension {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _scale_shape(x: torch.Tensor, granularity: str, group_size: Optional[int]) -> Tuple[int, ...]:
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return tuple(x.shape[:-1])
    return (*x.shape[:-1], x.shape[-1] // group_size)


def expand_to(param: torch.Tensor, x: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    """Broadcasts a per-tensor/row/group scale or zero to x's shape (group: repeated along the last dim)."""
    if param.dim() == 0 or param.numel() == 1:
        return param.reshape(()).expand_as(x)
    if tuple(param.shape) == tuple(x.shape[:-1]):
        return param.unsqueeze(-1).expand_as(x)
    return param.repeat_interleave(group_size, dim=-1)


def absmax_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scale from an absolute maximum: max(absmax, eps) / qmax (NaN stays NaN)."""
    return absmax.float().clamp_min(SCALE_EPS) / qrange(bits)[1]


def quantize_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    zero_point: Optional[torch.Tensor] = None,
    signed: bool = True,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """Codes clamp(rint(x / s) + z) in int8 (signed) or uint8 (unsigned); scale/zero broadcast per tensor/row/group."""
    lo, hi = qrange(bits, signed)
    scaled = x.float() / expand_to(scale.float(), x, group_size)
    codes = torch.round(scaled)
    if zero_point is not None:
        codes = codes + expand_to(zero_point.float(), x, group_size)
    codes = torch.nan_to_num(codes.clamp(lo, hi), nan=0.0)
    return codes.to(torch.int8 if signed else torch.uint8)


def quantize_symmetric(
    x: torch.Tensor, bits: int, granularity: str, group_size: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization -> (int8 codes, fp32 scale)."""
    view = _grouped(x.float(), granularity, group_size)
    scale = absmax_scale(view.abs().amax(dim=-1), bits).reshape(_scale_shape(x, granularity, group_size))
    return quantize_with_scale(x, scale, bits, group_size=group_size), scale


def asymmetric_scale_zero(
    minimum: torch.Tensor, maximum: torch.Tensor, bits: int, signed: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for a [min, max] range widened to contain 0 (so 0 is exact)."""
    lo, hi = qrange(bits, signed)
    minimum = minimum.float().clamp_max(0.0)
    maximum = maximum.float().clamp_min(0.0)
    scale = (maximum - minimum).clamp_min(SCALE_EPS) / (hi - lo)
    zero = torch.nan_to_num((lo - torch.round(minimum / scale)).clamp(lo, hi), nan=0.0)
    return scale, zero.to(torch.int8 if signed else torch.uint8)


def quantize_asymmetric(
    x: torch.Tensor, bits: int, granularity: str, group_size: Optional[int] = None, signed: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max asymmetric quantization -> (codes, fp32 scale, integer zero point)."""
    view = _grouped(x.float(), granularity, group_size)
    shape = _scale_shape(x, granularity, group_size)
    scale, zero = asymmetric_scale_zero(view.amin(dim=-1), view.amax(dim=-1), bits, signed)
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    return quantize_with_scale(x, scale, bits, zero, signed, group_size), scale, zero


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """fp32 s * (q - z), with scale/zero broadcast per tensor/row/group."""
    values = codes.float()
    if zero_point is not None:
        values = values - expand_to(zero_point.float(), values, group_size)
    return values * expand_to(scale.float(), values, group_size)


def quantize_progressive_int4(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QServe-style two-level weight quantization -> (int4 codes in int8, int8 group scales, fp32 channel scales).

    Level 1: symmetric int8 per output channel in the protective range [-119, 119].
    Level 2: per group of that int8 matrix, g = ceil(absmax / 7) in [1, 17] and q4 = rint(w8 / g) in [-7, 7],
    so q4 * g stays within int8 and the kernel multiplies integers only.
    """
    protective_max = 7 * GROUP_SCALE_MAX
    channel_scale = weight.float().abs().amax(dim=-1).clamp_min(SCALE_EPS) / protective_max
    w8 = torch.round(weight.float() / channel_scale[:, None]).clamp(-protective_max, protective_max)
    grouped = _grouped(w8, "group", group_size)
    group_scale = torch.ceil(grouped.abs().amax(dim=-1) / 7).clamp(1, GROUP_SCALE_MAX)
    q4 = torch.round(grouped / group_scale[..., None]).clamp(-7, 7).reshape(weight.shape)
    return q4.to(torch.int8), group_scale.to(torch.int8), channel_scale


class _StraightThrough(torch.autograd.Function):
    """rounding(x) forward, identity backward. Unlike `x + (rounding(x) - x).detach()` the forward
    value is exactly the rounded one (a clamp right after rint sees codes on the range boundary as
    inside) and a NaN that rounds to a number stays that number."""

    @staticmethod
    def forward(ctx, x, rounding):
        return rounding(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(x: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """rounding(x) (same shape and dtype) with a straight-through (identity) gradient."""
    return _StraightThrough.apply(x, rounding)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """rint(x) with a straight-through (identity) gradient."""
    return straight_through(x, torch.round)
