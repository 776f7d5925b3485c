"""Weight quantization into each config's storage format (formats/weights.py): round-to-nearest,
optionally after a per-channel clipping search."""

from __future__ import annotations

import torch

from ..formats.int4 import pack_int4
from ..formats.weights import QuantizedWeight
from .config import W4A4, W4A8, W4A16, W8A8, QuantConfig
from .primitives import quantize_asymmetric, quantize_progressive_int4, quantize_symmetric

WEIGHT_CLIPS = ("none", "mse", "percentile")
WEIGHT_CLIP_RATIOS = tuple(1.0 - 0.01 * i for i in range(11)) + tuple(0.875 - 0.025 * i for i in range(16))  # finer near 1 (8 bits)
WEIGHT_PERCENTILES = (0.99, 0.995, 0.999, 0.9999, 1.0)


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


def clip_weight(weight: torch.Tensor, config: QuantConfig, method: str = "mse") -> torch.Tensor:
    """The weight clipped per output channel to the range that quantizes it best for `config`.

    Candidates per channel: ranges scaled by WEIGHT_CLIP_RATIOS ("mse") or cut at the
    WEIGHT_PERCENTILES quantiles of |w| ("percentile"); each channel keeps the candidate whose
    round-to-nearest quantization in the config's own format has the least squared error, so group
    and two-level formats are judged by what they store. Symmetric formats clip to ±range;
    W4A16's asymmetric groups scale [min, max] towards 0. "none" returns the weight unchanged.
    """
    if method not in WEIGHT_CLIPS:
        raise ValueError(f"weight clip method must be one of {WEIGHT_CLIPS}, got {method!r}")
    weight = weight.detach().float()
    if method == "none":
        return weight
    if isinstance(config, W4A16):
        low, high = weight.amin(dim=1, keepdim=True).clamp_max(0), weight.amax(dim=1, keepdim=True).clamp_min(0)
    else:
        high = weight.abs().amax(dim=1, keepdim=True)
        low = -high
    if method == "mse":
        fractions = [torch.full_like(high, ratio) for ratio in WEIGHT_CLIP_RATIOS]
    else:
        absmax = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        fractions = [(torch.quantile(weight.abs(), p, dim=1, keepdim=True) / absmax).clamp(max=1.0)
                     for p in WEIGHT_PERCENTILES]
    best, best_error = weight, None
    for fraction in fractions:
        clipped = torch.minimum(torch.maximum(weight, low * fraction), high * fraction)
        error = (quantize_weight(clipped, config).dequantize() - weight).square().sum(dim=1, keepdim=True)
        if best_error is None:
            best, best_error = clipped, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, clipped, best), torch.minimum(error, best_error)
    return best
