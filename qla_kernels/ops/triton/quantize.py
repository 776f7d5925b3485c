"""Triton activation pre-kernel: [LayerNorm | RMSNorm] → int8 per token → [T = norm(x)·A or x·A].

With FLOAT_OUTPUT it is the W4A16 decode pre-kernel instead: the normalized activations are
written in the output dtype (no quantization), with T from the same read of x. With NORMED_OUTPUT
it writes both: the codes and the normalized activations (a post-norm block's x1, which is also
the MLP's residual).

One program owns BLOCK_M rows and walks K in BLOCK_K chunks: statistics (norm), then absmax
(dynamic scales), then quantize-and-project, so registers never hold a whole row and any K works.
The later passes re-read x from L2. T = norm(x)·A accumulates as one tensor-core dot per chunk
into a [BLOCK_M, BLOCK_R] fp32 tile (A: [K, R], R <= BLOCK_R) and is written into a column range
of a caller's buffer (stride_tm), so several corrections can share one T.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_linear import abs_bits, absmax_step, clamp_codes, round_half_even

NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2


@triton.jit
def load_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, BLOCK_K: tl.constexpr):
    """Rows offs_m, columns k0..k0+BLOCK_K of x in fp32 (0 outside), with the column and tile masks."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, offs_k, mask_k, mask


@triton.jit
def normalized(x, mean, rstd, w_ptr, b_ptr, offs_k, mask_k, NORM: tl.constexpr,
               HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """x normalized with its rows' statistics (mean, rstd broadcast against x) and the norm's
    weight and bias at columns offs_k (a row of them broadcast, or x's own shape)."""
    if NORM == 1:
        x = (x - mean) * rstd
    elif NORM == 2:
        x = x * rstd
    if HAS_NORM_WEIGHT:
        x = x * tl.load(w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_NORM_BIAS:
        x = x + tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return x


@triton.jit
def norm_statistics(x_ptr, offs_m, mask_m, stride_xm, K, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """(mean, 1/std) for LayerNorm, (0, 1/rms) for RMSNorm, zeros without a norm: per row of the
    block, from passes over K in BLOCK_K chunks (LayerNorm: the mean, then the centered squares)."""
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM == 1:
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, offs_k, mask_k, mask = load_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, BLOCK_K)
            total += tl.sum(x, axis=1)
        mean = total / K
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, offs_k, mask_k, mask = load_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, BLOCK_K)
            centered = tl.where(mask, x - mean[:, None], 0.0)
            squares += tl.sum(centered * centered, axis=1)
        rstd = 1.0 / tl.sqrt(squares / K + eps)
    elif NORM == 2:
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, offs_k, mask_k, mask = load_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, BLOCK_K)
            squares += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(squares / K + eps)
    return mean, rstd


@triton.jit
def load_normalized_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, mean, rstd, norm_w_ptr, norm_b_ptr,
                          NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """`load_chunk`'s (x, offs_k, mask_k, mask) and v, the chunk normalized with the rows'
    `norm_statistics`."""
    x, offs_k, mask_k, mask = load_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, BLOCK_K)
    v = normalized(x, mean[:, None], rstd[:, None], norm_w_ptr, norm_b_ptr, offs_k, mask_k, NORM, HAS_NORM_WEIGHT,
                   HAS_NORM_BIAS)
    return x, v, offs_k, mask_k, mask


@triton.jit
def t_step(t, x, v, mask, down_ptr, offs_k, mask_k, stride_dk, offs_r, R, T_FP32: tl.constexpr,
           T_FROM_INPUT: tl.constexpr):
    """t + (x or its normalized v)·A over one K chunk: one tensor-core dot into the fp32 T tile."""
    down = tl.load(down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :],
                   mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
    if T_FROM_INPUT:  # QwT's T = x·V_r: the raw input, read once with the norm's pass
        rows = tl.where(mask, x, 0.0).to(down.dtype)
    else:
        rows = tl.where(mask, v, 0.0).to(down.dtype)
    if T_FP32:
        return tl.dot(rows, down, t, input_precision="tf32x3")
    return tl.dot(rows, down, t)


@triton.jit
def quantized_codes(v, scale, zero, QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_ZERO: tl.constexpr,
                    CENTER: tl.constexpr):
    """int8 codes of v at `scale` (broadcast against v): round half to even, + z, clamp, and at
    <= 7 bits − z again (quantize_activation's contract)."""
    codes = round_half_even(tl.math.div_rn(v, scale))
    if HAS_ZERO:
        codes = codes + zero
    codes = clamp_codes(codes, QMIN * 1.0, QMAX * 1.0)
    if CENTER:
        codes = codes - zero
    return codes.to(tl.int8)


@triton.jit
def normed_and_t_step(t, x, v, mask, offs_m, offs_k, mask_k, normed_ptr, stride_qm, down_ptr, stride_dk, offs_r, R,
                      NORMED_OUTPUT: tl.constexpr, HAS_T: tl.constexpr, T_FP32: tl.constexpr,
                      T_FROM_INPUT: tl.constexpr):
    """One K chunk's normalized rows v stored (NORMED_OUTPUT: [M, K] with q's row stride) and its
    step of T; returns T."""
    if NORMED_OUTPUT:
        tl.store(normed_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], v.to(normed_ptr.dtype.element_ty),
                 mask=mask)
    if HAS_T:
        t = t_step(t, x, v, mask, down_ptr, offs_k, mask_k, stride_dk, offs_r, R, T_FP32, T_FROM_INPUT)
    return t


@triton.jit
def store_t(t_ptr, t, offs_m, mask_m, stride_tm, offs_r, R):
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], t.to(t_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=["R"])  # T's rank: a correction's calibrated rank compiles no new kernel
def quantize_activation_kernel(
    x_ptr, q_ptr, scale_ptr, static_scale_ptr, zero_ptr, norm_w_ptr, norm_b_ptr, down_ptr, t_ptr, normed_ptr,
    M, K, R, eps,
    stride_xm, stride_qm, stride_dk, stride_tm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, STATIC: tl.constexpr, HAS_ZERO: tl.constexpr, CENTER: tl.constexpr,
    HAS_T: tl.constexpr, T_FP32: tl.constexpr, T_FROM_INPUT: tl.constexpr, FLOAT_OUTPUT: tl.constexpr,
    NORMED_OUTPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # normed_ptr (NORMED_OUTPUT) is [M, K] with q's row stride. Rows are int64: M·K may pass 2**31.
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    mean, rstd = norm_statistics(x_ptr, offs_m, mask_m, stride_xm, K, eps, NORM, BLOCK_M, BLOCK_K)

    if FLOAT_OUTPUT:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    elif STATIC:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(static_scale_ptr)
    else:
        absmax = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            x, v, offs_k, mask_k, mask = load_normalized_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, mean, rstd,
                                                              norm_w_ptr, norm_b_ptr, NORM, HAS_NORM_WEIGHT,
                                                              HAS_NORM_BIAS, BLOCK_K)
            absmax = tl.maximum(absmax, tl.max(tl.where(mask, abs_bits(v), 0), axis=1))
        scale = absmax_step(absmax.to(tl.float32, bitcast=True), QMAX)
    if not FLOAT_OUTPUT:
        tl.store(scale_ptr + offs_m, scale, mask=mask_m)

    zero = 0.0
    if HAS_ZERO:
        zero = tl.load(zero_ptr).to(tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, v, offs_k, mask_k, mask = load_normalized_chunk(x_ptr, offs_m, mask_m, stride_xm, k0, K, mean, rstd,
                                                          norm_w_ptr, norm_b_ptr, NORM, HAS_NORM_WEIGHT,
                                                          HAS_NORM_BIAS, BLOCK_K)
        if FLOAT_OUTPUT:
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], v.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            codes = quantized_codes(v, scale[:, None], zero, QMIN, QMAX, HAS_ZERO, CENTER)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], codes, mask=mask)
        t = normed_and_t_step(t, x, v, mask, offs_m, offs_k, mask_k, normed_ptr, stride_qm, down_ptr, stride_dk,
                              offs_r, R, NORMED_OUTPUT and not FLOAT_OUTPUT, HAS_T, T_FP32, T_FROM_INPUT)
    if HAS_T:
        store_t(t_ptr, t, offs_m, mask_m, stride_tm, offs_r, R)
