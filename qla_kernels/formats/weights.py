"""Quantized weight formats: which buffers each format stores and what integers they mean.

N = out_features, K = in_features, G = group size (K when per channel).

| format              | weight               | weight_scale      | weight_group_scale     | weight_zero        |
|---------------------|----------------------|-------------------|------------------------|--------------------|
| "int8"              | int8 [N, K]          | fp32 [N]          | -                      | -                  |
| "int4"              | uint8 [N, K/2] (s4)  | fp32 [N]          | -                      | -                  |
| "int4_int8_groups"  | uint8 [N, K/2] (s4)  | fp32 [N]          | int8 [N, K/G] in 1..17 | -                  |
| "uint4_asym_groups" | uint8 [N, K/2] (u4)  | fp32 [N, K/G]     | -                      | uint8 [N, K/G] 0..15 |

s4/u4: signed/unsigned nibbles packed by `formats.int4.pack_int4`. "int8" also carries 4-bit
weights (W4A4) as int8 values in -8..7.

"int4_int8_groups" is QServe's progressive layout: the integer weight the GEMM multiplies is
q4 * g (|q4| <= 7, 1 <= g <= 17, so |q4 * g| <= 119 fits int8), one int32 accumulator serves the
whole K loop and the only fp32 rescale is per channel, after it.

"uint4_asym_groups" (W4A16) dequantizes to (q - z) * s in the activation dtype inside the K loop.
Both of its kernels read this stored layout, so a model holds one copy of its weights: the Triton
kernel tile by tile, and the CUDA decode kernel (csrc/w4a16_decode.cu) 32 consecutive k of a row per
16-byte load, feeding the mma's k slots in the order the nibbles come out of each word (a sum over k
may pair its terms in any order, so no repacking is needed for the tensor cores).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .int4 import unpack_int4

WEIGHT_FORMATS = ("int8", "int4", "int4_int8_groups", "uint4_asym_groups")
INTEGER_FORMATS = ("int8", "int4", "int4_int8_groups")  # those the int8-activation GEMM reads
GROUP_SCALE_MAX = 17  # 7 * 17 = 119 <= 127: QServe's protective range


def _expect(name: str, tensor: Optional[torch.Tensor], dtype: torch.dtype, shape: tuple) -> None:
    if tensor is None:
        raise ValueError(f"{name} is required for this weight format")
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _forbid(name: str, tensor: Optional[torch.Tensor], fmt: str) -> None:
    if tensor is not None:
        raise ValueError(f"{name} must be None for weight format {fmt!r}")


# The CPU kernels' panel layout of an integer weight (ops/cpu.py pack_panels, csrc/cpu/kernels.h):
# 16 output columns per panel, k in quads of 4, two header quad rows (column sums, max |W|).
PANEL_COLUMNS = 16
PANEL_QUAD = 4


def panels_shape(out_features: int, in_features: int) -> tuple:
    """Shape of the int8 panels of an [out_features, in_features] integer weight."""
    return (-(-out_features // PANEL_COLUMNS), -(-in_features // PANEL_QUAD) + 2, PANEL_COLUMNS, PANEL_QUAD)


def weight_in_features(fmt: str, weight: torch.Tensor) -> int:
    return weight.shape[1] if fmt == "int8" else 2 * weight.shape[1]


def check_weight(
    fmt: str,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_group_scale: Optional[torch.Tensor],
    weight_zero: Optional[torch.Tensor],
    group_size: int,
) -> None:
    """Validates the buffers of one quantized weight; raises ValueError naming the bad argument.

    group_size is the K extent of one group (K itself for per-channel formats).
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, packed in_features], got shape {tuple(weight.shape)}")
    n = weight.shape[0]
    k = weight_in_features(fmt, weight)
    _expect("weight", weight, torch.int8 if fmt == "int8" else torch.uint8, tuple(weight.shape))
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size} must divide in_features={k}")
    groups = k // group_size
    if fmt == "uint4_asym_groups":
        _expect("weight_scale", weight_scale, torch.float32, (n, groups))
        _expect("weight_zero", weight_zero, torch.uint8, (n, groups))
        _forbid("weight_group_scale", weight_group_scale, fmt)
        return
    _expect("weight_scale", weight_scale, torch.float32, (n,))
    _forbid("weight_zero", weight_zero, fmt)
    if fmt == "int4_int8_groups":
        _expect("weight_group_scale", weight_group_scale, torch.int8, (n, groups))
    else:
        _forbid("weight_group_scale", weight_group_scale, fmt)
        if group_size != k:
            raise ValueError(f"weight format {fmt!r} is per channel: group_size must equal in_features={k}")


def integer_weight(fmt: str, weight: torch.Tensor, weight_group_scale: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """The int32 [N, K] matrix an integer-format GEMM multiplies (exactly)."""
    if fmt == "int8":
        return weight.to(torch.int32)
    values = unpack_int4(weight, signed=True).to(torch.int32)
    if fmt == "int4":
        return values
    if fmt == "int4_int8_groups":
        return values * weight_group_scale.to(torch.int32).repeat_interleave(group_size, dim=1)
    raise ValueError(f"weight format {fmt!r} has no integer matrix")


def dequantize_weight(
    fmt: str,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_group_scale: Optional[torch.Tensor],
    weight_zero: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """The fp32 [N, K] weight a format represents."""
    if fmt == "uint4_asym_groups":
        codes = unpack_int4(weight, signed=False).to(torch.float32)
        zero = weight_zero.to(torch.float32).repeat_interleave(group_size, dim=1)
        return (codes - zero) * weight_scale.repeat_interleave(group_size, dim=1)
    return integer_weight(fmt, weight, weight_group_scale, group_size).to(torch.float32) * weight_scale[:, None]


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight's buffers (see the table above); `group_size` None means per channel."""

    data: torch.Tensor
    format: str
    scale: torch.Tensor
    group_scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    group_size: Optional[int] = None
    colsum: Optional[torch.Tensor] = None  # int32 [N]: sum over K of the integer weight (zero-point term)
    # The CPU kernels' packed copy of the integer weight (ops/cpu.py pack_panels), derived when a
    # plan is frozen and never saved; None elsewhere (a CPU call then packs per call).
    panels: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def in_features(self) -> int:
        return weight_in_features(self.format, self.data)

    @property
    def k_group(self) -> int:
        """K extent of one scale group (in_features when per channel)."""
        return self.group_size or self.in_features

    def to(self, device) -> "QuantizedWeight":
        """The same weight with every buffer on `device` (the CPU panels stay only on the CPU)."""
        moved = {field.name: getattr(self, field.name).to(device) for field in dataclasses.fields(self)
                 if isinstance(getattr(self, field.name), torch.Tensor)}
        if self.panels is not None and torch.device(device).type != "cpu":
            moved["panels"] = None
        return dataclasses.replace(self, **moved)

    def check(self) -> None:
        check_weight(self.format, self.data, self.scale, self.group_scale, self.zero, self.k_group)

    def integer(self) -> torch.Tensor:
        return integer_weight(self.format, self.data, self.group_scale, self.k_group)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.format, self.data, self.scale, self.group_scale, self.zero, self.k_group)
