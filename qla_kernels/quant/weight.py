"""Round-to-nearest weight quantization into each config's storage format (formats/weights.py)."""

from __future__ import annotations

import torch

from ..formats.int4 import pack_int4
from ..formats.weights import QuantizedWeight
from .config import W4A4, W4A8, W4A16, W8A8, QuantConfig
from .primitives import quantize_asymmetric, quantize_progressive_int4, quantize_symmetric


def quantize_weight(weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """Quantizes an fp weight [out_features, in_features] for `config` (RTN, per channel or group)."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a 2-D floating-point tensor, got {weight.dtype} {tuple(weight.shape)}")
    config.check_in_features(weight.shape[1])
    weight = weight.detach()
    if isinstance(config, (W8A8, W4A4)):
        codes, scale = quantize_symmetric(weight, config.weight_bits, "row")
        return QuantizedWeight(codes, "int8", scale)
    if isinstance(config, W4A8):
        if config.group_size is None:
            codes, scale = quantize_symmetric(weight, 4, "row")
            return QuantizedWeight(pack_int4(codes, signed=True), "int4", scale)
        codes, group_scale, scale = quantize_progressive_int4(weight, config.group_size)
        return QuantizedWeight(pack_int4(codes, signed=True), "int4_int8_groups", scale, group_scale=group_scale,
                               group_size=config.group_size)
    if isinstance(config, W4A16):
        group = config.group_size or weight.shape[1]
        codes, scale, zero = quantize_asymmetric(weight, 4, "group", group, signed=False)
        return QuantizedWeight(pack_int4(codes, signed=False), "uint4_asym_groups", scale, zero=zero,
                               group_size=config.group_size)
    raise ValueError(f"unsupported quantization config {config!r}")
