"""Randomized Hadamard rotations for activation quantization (QuaRot / SpinQuant style).

A linear y = x·Wᵀ equals (x·R)·(W·R)ᵀ for any orthogonal R. With R a randomized Hadamard
matrix, x·R spreads every outlier channel of x over all channels, so per-token quantization of
x·R loses far less than of x; W·R is quantized once at conversion.

R = D·H/√K: D a fixed ±1 diagonal (seeded: the same R on every machine, so a saved model needs
no stored matrix) and H = H_m ⊗ H_{2^a} ⊗ H_{2^b}, a Kronecker product of Hadamard matrices:
Sylvester's for the powers of two and a Paley matrix for the rest (order 12 for K = 384 = 12·32
and 1536 = 12·128, 28 for 14336 = 28·512, as QuaRot does), never small power-of-two blocks that
mix too few channels. x·R is applied factor by factor as small dense products (K·(m + 2^a + 2^b)
multiply-adds per row, not K²), so no K×K matrix is ever built.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

ROTATIONS = (None, "hadamard")
_SEED = 0x5EED
_MAX_PALEY = 256  # the largest order a Paley construction is searched up to


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(math.isqrt(n)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


@functools.lru_cache(maxsize=None)
def _paley(n: int) -> Optional[torch.Tensor]:
    """A Hadamard matrix of order n from Paley's constructions, or None: type I for a prime
    q = n − 1 ≡ 3 (mod 4), type II for a prime q = n/2 − 1 ≡ 1 (mod 4)."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        conference = torch.zeros(n, n, dtype=torch.float64)
        conference[0, 1:], conference[1:, 0] = 1, -1
        conference[1:, 1:] = _jacobsthal(q)
        return conference + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        conference[0, 1:], conference[1:, 0] = 1, 1
        conference[1:, 1:] = _jacobsthal(q)
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        eye = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), eye)
    return None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factors(k: int) -> Optional[List[int]]:
    """The orders of the Hadamard factors of the rotation for K = k (their product), or None
    when no Hadamard matrix of order k is built here (k = 2^a · m needs m = 1 or a Paley order
    m ≤ 256: 12, 20, 24, 28, 44, ...)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return None
    power = k & -k
    odd = k // power
    for shift in range(power.bit_length()):
        m = odd << shift
        if m == 1 or (m > 2 and m <= _MAX_PALEY and _paley(m) is not None):
            rest = k // m
            low = 1 << (rest.bit_length() - 1) // 2  # the power of two split in two near-square factors
            return [f for f in (m, rest // low, low) if f > 1] or [1]
    return None


def check_rotatable(in_features: int, where: str = "in_features") -> None:
    if hadamard_factors(in_features) is None:
        raise ValueError(f"{where}={in_features} has no Hadamard rotation here: it must be 2^a·m with m = 1 or a "
                         f"Paley order (12, 20, 24, 28, 44, ...; e.g. 384 = 12·32, 14336 = 28·512)")


@functools.lru_cache(maxsize=64)
def _rotation(k: int) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """(signs D [k], the normalized factor matrices) of the rotation for K = k, in fp64."""
    factors = []
    for order in hadamard_factors(k):
        h = _sylvester(order) if order & (order - 1) == 0 else _paley(order)
        factors.append(h / math.sqrt(order))
    generator = torch.Generator().manual_seed(_SEED + k)
    signs = torch.randint(0, 2, (k,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs, tuple(factors)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x·R over the last dimension (x [..., K], any float dtype; computed in fp32, returned in
    x's dtype). Orthogonal: rotate applied to the rows of W gives W·R, and
    rotate(x)·rotate(W)ᵀ = x·Wᵀ up to rounding."""
    k = x.shape[-1]
    if hadamard_factors(k) is None:
        raise ValueError(f"no Hadamard rotation for {k} features")
    signs, factors = _rotation(k)
    y = x.float() * signs.to(device=x.device, dtype=torch.float32)
    rows = y.reshape(-1, *[h.shape[0] for h in factors])
    for axis, h in enumerate(factors, start=1):  # (H_1 ⊗ H_2 ⊗ H_3): contract each index with its factor
        rows = torch.tensordot(rows, h.to(device=x.device, dtype=torch.float32), dims=([axis], [0])).movedim(-1, axis)
    return rows.reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=64)
def kernel_factors(k: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The rotation for K = k as the kernels apply it: (D/√K [k] fp32, the ±1 Paley factor H_m
    [m, m] fp32 ([1, 1] ones when k is a power of two), P = k/m). The power-of-two factors are one
    Sylvester H_P (H_a ⊗ H_b = H_ab), applied by a fast Walsh-Hadamard transform, and the one
    normalization 1/√K rides on the signs, so R = (D/√K)·(H_m ⊗ H_P) equals `rotation_matrix`
    and every later step of the kernel adds or subtracts."""
    signs, factors = _rotation(k)
    first = factors[0].shape[0]
    m = 1 if first & (first - 1) == 0 else first
    dense = (factors[0] * math.sqrt(m)).round() if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    return (signs / math.sqrt(k)).float().contiguous(), dense.float().contiguous(), k // m


def rotation_matrix(k: int) -> torch.Tensor:
    """R [K, K] in fp64 (for tests and analysis: `rotate` never builds it)."""
    signs, factors = _rotation(k)
    h = functools.reduce(torch.kron, factors)
    return signs[:, None] * h
