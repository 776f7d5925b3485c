"""log2 quantization of attention probabilities (RepQ-ViT's post-softmax quantizer family).

p in (0, 1] is stored as an exponent e = clamp(rint(−log2 p), 0, 2^bits − 1) and read back as
2^−e: softmax outputs span orders of magnitude, so a power-of-two grid keeps the small ones that
a uniform 4-bit grid would flush to zero. p = 0 (masked) stays 0.
"""

from __future__ import annotations

import torch

from .primitives import qrange


def log2_quantize(probabilities: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized probabilities (same dtype), with a straight-through gradient."""
    qrange(bits)  # validates bits
    p = probabilities.float()
    exponent = torch.round(-torch.log2(p.clamp_min(torch.finfo(torch.float32).tiny))).clamp(0, (1 << bits) - 1)
    quantized = torch.where(p > 0, torch.exp2(-exponent), torch.zeros_like(p))
    return (p + (quantized - p).detach()).to(probabilities.dtype)
