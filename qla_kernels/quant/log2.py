"""log2 quantization of attention probabilities (RepQ-ViT's post-softmax quantizer family).

p in (0, 1] is stored as an exponent e = clamp(rint(−log2 p), 0, 2^bits − 1) and read back as
2^−e: softmax outputs span orders of magnitude, so a power-of-two grid keeps the small ones that
a uniform 4-bit grid would flush to zero. p = 0 (masked) stays 0.

e is read off p's fp32 bits, exactly, so every backend (torch here, the Triton kernel's integer
ops) gets the same exponent for the same p: with p = 1.f·2^E, rint(−log2 p) = −E − [1.f > √2]
(log2 1.f ∈ [0, 1) rounds up past one half), and fp32(√2) lies below √2, so 1.f > √2 exactly
when f's bits exceed those of fp32(√2). A subnormal p (below 2^−126) takes the largest exponent;
2^−e that is not a normal fp32 (e > 126, only at 7 and 8 bits) reads back as 0.
"""

from __future__ import annotations

import torch

from .primitives import qrange, straight_through

# The fraction bits of fp32(√2) = 0x3FB504F3.
SQRT2_FRACTION_BITS = 0x3504F3
LARGEST_NORMAL_EXPONENT = 126


def log2_levels(probabilities: torch.Tensor, bits: int) -> torch.Tensor:
    """2^−e (fp32, no gradient) for fp32 probabilities in [0, 1]; 0 where p is 0 or NaN."""
    p = probabilities.detach().float()
    raw = p.contiguous().view(torch.int32)
    biased = raw >> 23
    largest = (1 << bits) - 1
    exponent = (127 - biased - ((raw & 0x7FFFFF) > SQRT2_FRACTION_BITS).int()).clamp(0, largest)
    exponent = torch.where(biased == 0, largest, exponent)  # subnormal p
    levels = ((127 - exponent.clamp_max(LARGEST_NORMAL_EXPONENT)) << 23).view(torch.float32)
    return torch.where((p > 0) & (exponent <= LARGEST_NORMAL_EXPONENT), levels, 0.0)


def log2_quantize(probabilities: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized probabilities (same dtype), with a straight-through gradient."""
    qrange(bits)  # validates bits
    return straight_through(probabilities.float(), lambda p: log2_levels(p, bits)).to(probabilities.dtype)
