"""Triton rotating pre-kernel: [LayerNorm | RMSNorm] → x·R → int8 per token, with T and the
normalized rows formed from the unrotated values (ops.quantize_activation and
normalize_quantize_activation with rotate=True; fused_linear's requant_rotate quantizes its fp32
output with it). With FLOAT_OUTPUT it writes x·R itself (ops.hadamard_rotate).

R = (D/√K)·(H_m ⊗ H_P) as quant/hadamard.kernel_factors gives it, and H_P is Sylvester's, so
H_P = H_F0 ⊗ H_F1 ⊗ H_F2 for any split of P into powers of two (entries (−1)^popcount(i & j),
generated here). A row is held whole as a [C_PAD, P'] tile: C mixing rows (the Paley index, padded
to a power of two with zero rows) of P' columns. It is rotated by tensor-core dots with ±1
matrices: each Sylvester factor on its index (a permute puts it last), then the mixing matrix's
transpose on the left. The ±1 products are exact, so the fp32 sums are the only rounding, as in
the reference's tensordots and the cpu kernel's transform (on GPUs each product is two tf32 dots,
of the top 11 significant bits and of the rest: `_signed_dot`). The absmax and the
codes come from the same registers: x is read once for them.

A launch does one of two things for its BLOCK_M rows. With ROTATED_ROWS, the codes (or the
rotated rows): the norm statistics in chunked passes (`norm_statistics`, the unrotated
pre-kernel's), then each row's tile; one row a program, since a loop over rows keeps its
invariants in registers (16 rows of [16, 256] spilled on sm_80). Without, T and the normalized
rows in chunked passes, 16 rows a program for T's dot; `launch.rotate_quantize` makes both
launches when a call asks for all. Every dot dimension is at least 16 (`rotation_tile` refuses
widths that would need less).
"""

from __future__ import annotations

from typing import Optional, Tuple

import triton
import triton.language as tl

from .fused_linear import abs_bits, absmax_step
from .quantize import load_normalized_chunk, norm_statistics, normalized, normed_and_t_step, quantized_codes, store_t

# A dot's dimensions are at least 16 (the tensor cores' K); its ±1 Sylvester factor is generated
# in registers, so at most 64 wide (a 128-wide one alone took 128 registers a thread at 4 warps
# and spilled: ptxas -v). A row tile holds at most 8192 values with a mixing matrix ([32, 512],
# K = 14336, spilled on sm_80 at 8 and 16 warps) and 16384 without ([1, 32768] needed more shared
# memory than sm_90 has); the mixing matrix is at most 64 × 64.
_SMALLEST_DOT = 16
_FACTOR_BITS = (4, 6)
_MAX_TILE = 8192
_MAX_TILE_UNMIXED = 16384
_MAX_MIXING = 64


def _split_bits(bits: int, parts: int) -> Tuple[int, ...]:
    """`bits` in `parts` near-equal parts (the larger last)."""
    return tuple(bits // parts + (index >= parts - bits % parts) for index in range(parts))


def rotation_tile(k: int, paley_order: int) -> Optional[Tuple[int, int, Tuple[int, int, int]]]:
    """(mixing order C, its padded order C_PAD, the Sylvester factors (F0, F1, F2) of P' = K/C,
    1 where absent) of the row tile for K = k = m·2^L, m = `paley_order` (1 for a power of two),
    or None where the kernel does not rotate (below 256 for a power of two, P below 16, a tile
    larger than the kernel holds without spilling). The tile is [C_PAD, P']: C = m, or 2m when
    L = 7 (H_m ⊗ H_2 as one mixing matrix: 128 = 2·64 needs no 128-wide factor); F in 16..64."""
    bits = (k // paley_order).bit_length() - 1
    low, high = _FACTOR_BITS
    mixing = paley_order
    if paley_order > 1 and bits == 7:
        mixing, bits = 2 * paley_order, 6
    # The fewest factors of at most 32 (64 only where no such split exists: 64, 128 = 2·64, 2048)
    parts = next((n for widest in (high - 1, high) for n in (1, 2, 3)
                  if low * n <= bits <= widest * n and (mixing > 1 or n > 1)), None)
    if parts is None:
        return None
    factors = tuple(1 << part for part in _split_bits(bits, parts))
    c_pad = triton.next_power_of_2(mixing) if mixing > 1 else 1
    rows_per_dot = c_pad * (1 << bits) // max(factors)
    too_large = c_pad > _MAX_MIXING or c_pad * (1 << bits) > (_MAX_TILE if c_pad > 1 else _MAX_TILE_UNMIXED)
    if rows_per_dot < _SMALLEST_DOT or too_large:
        return None
    return mixing, c_pad, factors + (1,) * (3 - len(factors))


@triton.jit
def _sylvester(N: tl.constexpr):
    """H_N as fp32 ±1 (N <= 256): (−1) to the parity of i & j."""
    bits = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    return 1.0 - 2.0 * (bits & 1).to(tl.float32)


@triton.jit
def _signed_dot(y, h, H_LEFT: tl.constexpr):
    """y·h (h·y with H_LEFT) for fp32 y and a ±1 (or 0) matrix h, to fp32 accuracy in two tf32
    dots: y's top 11 significant bits (exact in tf32) and the rest, each times h exactly (tf32x3's
    three dots would split h too, whose low part is zero)."""
    high = (y.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    if H_LEFT:
        product = tl.dot(h, y - high, tl.dot(h, high, input_precision="tf32"), input_precision="tf32")
    else:
        product = tl.dot(y - high, h, tl.dot(high, h, input_precision="tf32"), input_precision="tf32")
    return product


@triton.jit
def _sylvester_stage(y, ROWS: tl.constexpr, OUTER: tl.constexpr, F: tl.constexpr, INNER: tl.constexpr):
    """y [ROWS, OUTER·F·INNER] times H_F on its middle index (a permute puts it last for the dot)."""
    if F > 1:
        if INNER == 1:
            y = _signed_dot(tl.reshape(y, (ROWS * OUTER, F)), _sylvester(F), False)
        else:
            y = tl.reshape(tl.permute(tl.reshape(y, (ROWS * OUTER, F, INNER)), (0, 2, 1)), (ROWS * OUTER * INNER, F))
            y = _signed_dot(y, _sylvester(F), False)
            y = tl.permute(tl.reshape(y, (ROWS * OUTER, INNER, F)), (0, 2, 1))
        y = tl.reshape(y, (ROWS, OUTER * F * INNER))
    return y


@triton.jit
def _rotated_tile(v, mixing_t, C_PAD: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr):
    """v [C_PAD, F0·F1·F2] (the signs applied) times H_C ⊗ H_F0 ⊗ H_F1 ⊗ H_F2, in fp32."""
    y = _sylvester_stage(v, C_PAD, F0 * F1, F2, 1)
    y = _sylvester_stage(y, C_PAD, F0, F1, F2)
    y = _sylvester_stage(y, C_PAD, 1, F0, F1 * F2)
    if C_PAD > 1:
        y = _signed_dot(y, mixing_t, True)
    return y


@triton.jit(do_not_specialize=["R"])
def rotate_quantize_kernel(
    x_ptr, q_ptr, scale_ptr, static_scale_ptr, zero_ptr, norm_w_ptr, norm_b_ptr, down_ptr, t_ptr, normed_ptr,
    signs_ptr, mixing_ptr,
    M, K, R, MIXING, eps,
    stride_xm, stride_qm, stride_dk, stride_tm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, STATIC: tl.constexpr, HAS_ZERO: tl.constexpr, CENTER: tl.constexpr,
    HAS_T: tl.constexpr, T_FP32: tl.constexpr, T_FROM_INPUT: tl.constexpr, FLOAT_OUTPUT: tl.constexpr,
    NORMED_OUTPUT: tl.constexpr, ROTATED_ROWS: tl.constexpr, C_PAD: tl.constexpr, F0: tl.constexpr,
    F1: tl.constexpr, F2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # signs_ptr: D/√K [K]; mixing_ptr: the ±1 mixing matrix [MIXING, MIXING] (H_m, or H_m ⊗ H_2;
    # MIXING = 1 for a power of two).
    # normed_ptr (NORMED_OUTPUT) is [M, K] with q's row stride. Rows are int64: M·K may pass 2**31.
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    mean, rstd = norm_statistics(x_ptr, offs_m, mask_m, stride_xm, K, eps, NORM, BLOCK_M, BLOCK_K)

    if HAS_T or NORMED_OUTPUT:
        offs_r = tl.arange(0, BLOCK_R)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, v, offs_k, mask_k, mask = load_normalized_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, mean, rstd,
                                                              norm_w_ptr, norm_b_ptr, NORM, HAS_NORM_WEIGHT,
                                                              HAS_NORM_BIAS, BLOCK_K)
            t = normed_and_t_step(t, x, v, mask, offs_m, offs_k, mask_k, normed_ptr, stride_qm, down_ptr, stride_dk,
                                  offs_r, R, NORMED_OUTPUT, HAS_T, T_FP32, T_FROM_INPUT)
        if HAS_T:
            store_t(t_ptr, t, offs_m, mask_m, stride_tm, offs_r, R)

    if ROTATED_ROWS:  # one row: the tile, column k = i·P' + p at [i, p], i < MIXING
        tl.static_assert(BLOCK_M == 1)
        row = row0.to(tl.int64)
        chunk = K // MIXING
        offs_i = tl.arange(0, C_PAD)
        offs_p = tl.arange(0, F0 * F1 * F2)
        offs_k = offs_i[:, None] * chunk + offs_p[None, :]
        mask_k = (offs_i < MIXING)[:, None] & (offs_p < chunk)[None, :]
        mask = mask_k & (row < M)
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=mask, other=0.0).to(tl.float32)
        v = normalized(x, tl.sum(mean, axis=0), tl.sum(rstd, axis=0), norm_w_ptr, norm_b_ptr, offs_k, mask_k, NORM,
                       HAS_NORM_WEIGHT, HAS_NORM_BIAS)
        mixing_t = tl.zeros((C_PAD, C_PAD), dtype=tl.float32)
        if C_PAD > 1:  # out[j] = Σ_i G[i, j]·y[i]: Gᵀ on the left
            mixing_mask = (offs_i < MIXING)[:, None] & (offs_i < MIXING)[None, :]
            mixing_t = tl.load(mixing_ptr + offs_i[None, :] * MIXING + offs_i[:, None], mask=mixing_mask, other=0.0)
        signs = tl.load(signs_ptr + offs_k, mask=mask_k, other=0.0)
        y = _rotated_tile(tl.where(mask, v, 0.0) * signs, mixing_t, C_PAD, F0, F1, F2)
        if FLOAT_OUTPUT:
            tl.store(q_ptr + row * stride_qm + offs_k, y.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            if STATIC:
                scale = tl.load(static_scale_ptr)
            else:
                absmax = tl.max(tl.max(tl.where(mask, abs_bits(y), 0), axis=1), axis=0)
                scale = absmax_step(absmax.to(tl.float32, bitcast=True), QMAX)
            tl.store(scale_ptr + row, scale, mask=row < M)
            zero = 0.0
            if HAS_ZERO:
                zero = tl.load(zero_ptr).to(tl.float32)
            tl.store(q_ptr + row * stride_qm + offs_k, quantized_codes(y, scale, zero, QMIN, QMAX, HAS_ZERO, CENTER),
                     mask=mask)
