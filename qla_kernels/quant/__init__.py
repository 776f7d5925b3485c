"""Quantizers, observers and config dataclasses."""

from .config import W4A4, W4A8, W4A16, W8A8, QuantConfig
from .primitives import (
    SCALE_EPS,
    absmax_scale,
    asymmetric_scale_zero,
    dequantize,
    qrange,
    quantize_asymmetric,
    quantize_progressive_int4,
    quantize_symmetric,
    quantize_with_scale,
)
from .weight import WEIGHT_CLIPS, clip_weight, quantize_weight
