"""Two 4-bit values per byte.

Layout: along the last dimension, element 2j goes to the low nibble and element 2j+1 to the high
nibble of byte j (uint8). Signed values (-8..7) are stored as their two's-complement nibble,
unsigned values (0..15) as themselves. The last dimension must be even: an odd length is a
ValueError, never silent padding (a padded K would change the GEMM's reduction length).
"""

from __future__ import annotations

import torch

_RANGES = {True: (-8, 7), False: (0, 15)}


def pack_int4(values: torch.Tensor, signed: bool) -> torch.Tensor:
    """Packs integer `values` in the 4-bit range into uint8, halving the last dimension."""
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"values must be an integer tensor, got dtype {values.dtype}")
    if values.dim() == 0 or values.shape[-1] % 2:
        raise ValueError(f"values' last dimension must be even to pack two per byte, got shape {tuple(values.shape)}")
    lo, hi = _RANGES[signed]
    if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"values must lie in [{lo}, {hi}] for {kind} int4, got [{int(values.min())}, {int(values.max())}]")
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., n] -> int8 [..., 2n]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got dtype {packed.dtype}")
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    if signed:
        low = (low ^ 8) - 8
        high = (high ^ 8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)
