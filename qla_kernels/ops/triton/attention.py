"""Triton kernel of the quantized attention core (ops/attention.py states the numerics).

One program takes BLOCK_M queries of one (batch, head). Its q tile is read once (fp16/bf16/fp32)
and quantized in registers to int8 codes q − z. The keys are walked twice in BLOCK_N steps:

- pass 1: k quantized in registers, S = q_c·k_cᵀ on the int8 tensor cores (int32), scaled once,
  masked, and folded into the running row maximum m and the running sum l of exp(S − m);
- pass 2: S recomputed, A = exp(S − m) / l, A quantized in registers to its int8 codes, v
  quantized, and F += a_c·v_c on the int8 tensor cores (int32, exact).

A is quantized after it is normalised, so it cannot be rescaled on the fly as flash attention's
fp accumulator is: the second pass is the price of an exact integer A·V, and it costs another
q·kᵀ (the cheap product at d ≤ 128). Nothing of S or A is written to memory. The softmax sums in
another order than torch's, so an A code may differ by one from the reference where A / s_A lies
within an ulp of a rounding boundary (tests bound it); every integer product is exact.

TOKENWISE_LOG2 (the `paper` preset's core): every q, k and v row (one token, the whole head
dimension in the tile) takes its step from its own absmax in registers, so nothing is
calibrated and nothing is read besides q, k and v; S is rescaled per query row and per key;
pass 2 reads the log2 level Â of A off its bits and dequantizes v to tf32 (v̂ = tf32(v_c·s_v)),
and F += Â·v̂ runs on the tf32 tensor cores into fp32: both operands are tf32 values already,
so every product is exact and only the order of the fp32 sums differs from the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...quant.log2 import LARGEST_NORMAL_EXPONENT, SQRT2_FRACTION_BITS
from .fused_linear import abs_bits, absmax_step, clamp_codes, round_half_even

_SQRT2_FRACTION_BITS = tl.constexpr(SQRT2_FRACTION_BITS)
_LARGEST_NORMAL_EXPONENT = tl.constexpr(LARGEST_NORMAL_EXPONENT)


@triton.jit
def _codes(x, step, zero, low, high):
    """q − z in fp32 (exact small integers) for fp32 x: clamp(rint(x / step) + z) − z; NaN → 0,
    the zero point's code (a row without keys adds nothing)."""
    codes = clamp_codes(round_half_even(tl.math.div_rn(x, step)) + zero, low, high) - zero
    return tl.where(x != x, 0.0, codes)


@triton.jit
def _tokenwise_codes(x, valid, LOW: tl.constexpr, HIGH: tl.constexpr):
    """(codes fp32, steps [rows]) of each row of fp32 x: ops/attention.tokenwise_codes. Entries
    outside `valid` are 0 (so they neither raise an absmax nor add to a product)."""
    x = tl.where(valid, x, 0.0)
    steps = absmax_step(tl.max(abs_bits(x), axis=1).to(tl.float32, bitcast=True), HIGH)
    return clamp_codes(round_half_even(tl.math.div_rn(x, steps[:, None])), LOW, HIGH), steps


@triton.jit
def _log2_levels(p, LARGEST: tl.constexpr):
    """quant/log2.log2_levels on the bits of fp32 p."""
    raw = p.to(tl.int32, bitcast=True)
    biased = raw >> 23
    exponent = 127 - biased - ((raw & 0x7FFFFF) > _SQRT2_FRACTION_BITS).to(tl.int32)
    exponent = tl.minimum(tl.maximum(exponent, 0), LARGEST)
    exponent = tl.where(biased == 0, LARGEST, exponent)  # subnormal p
    levels = ((127 - tl.minimum(exponent, _LARGEST_NORMAL_EXPONENT)) << 23).to(tl.float32, bitcast=True)
    return tl.where((p > 0) & (exponent <= _LARGEST_NORMAL_EXPONENT), levels, 0.0)


@triton.jit
def _round_to_tf32(x):
    """ops/attention.round_to_tf32 on the bits of fp32 x."""
    raw = x.to(tl.int32, bitcast=True)
    return ((raw + (0xFFF + ((raw >> 13) & 1))) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _scores(q_codes, row_scale, k_base, m_base, offs_n, mask_n, offs_d, mask_d, mask_m, stride_kt, stride_mk,
            k_step, k_zero, LOW: tl.constexpr, HIGH: tl.constexpr, HAS_MASK: tl.constexpr,
            TOKENWISE_LOG2: tl.constexpr):
    """One key block's scores: k read and quantized in registers, q_c·k_cᵀ on the int8 units,
    rescaled (once per tensor, or per query row then per key), plus the mask."""
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    valid = mask_n[:, None] & mask_d[None, :]
    if TOKENWISE_LOG2:
        k_codes, k_steps = _tokenwise_codes(k, valid, LOW, HIGH)
        products = tl.dot(q_codes, tl.trans(k_codes.to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
        scores = products * row_scale[:, None] * k_steps[None, :]
    else:
        k_codes = tl.where(valid, _codes(k, k_step, k_zero, LOW, HIGH), 0.0).to(tl.int8)
        scores = tl.dot(q_codes, tl.trans(k_codes), out_dtype=tl.int32).to(tl.float32) * row_scale
    if HAS_MASK:
        scores += tl.load(m_base + offs_n[None, :].to(tl.int64) * stride_mk,
                          mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    return scores


@triton.jit(do_not_specialize=["Q_TOKENS", "K_TOKENS"])
def quantized_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, scales_ptr, zeros_ptr, mask_ptr,
    Q_TOKENS, K_TOKENS, HEADS, HEAD_DIM, scaling,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_mb, stride_mh, stride_mq, stride_mk,
    LOW: tl.constexpr, HIGH: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_MASK: tl.constexpr,
    TOKENWISE_LOG2: tl.constexpr, LOG2_LARGEST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch_head = tl.program_id(1)
    batch = (batch_head // HEADS).to(tl.int64)
    head = (batch_head % HEADS).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Q_TOKENS
    mask_d = offs_d < HEAD_DIM
    q_zero = 0.0
    k_zero = 0.0
    v_zero = 0.0
    a_zero = 0.0
    if TOKENWISE_LOG2:
        q_step = 0.0
        k_step = 0.0
        v_step = 0.0
        a_step = 0.0
    else:
        q_step = tl.load(scales_ptr)
        k_step = tl.load(scales_ptr + 1)
        v_step = tl.load(scales_ptr + 2)
        a_step = tl.load(scales_ptr + 3)
        if HAS_ZEROS:
            q_zero = tl.load(zeros_ptr)
            k_zero = tl.load(zeros_ptr + 1)
            v_zero = tl.load(zeros_ptr + 2)
            a_zero = tl.load(zeros_ptr + 3)
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt
                + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    # padded rows and head dims hold code 0, which adds nothing to either product
    if TOKENWISE_LOG2:
        q_codes, q_steps = _tokenwise_codes(q, mask_m[:, None] & mask_d[None, :], LOW, HIGH)
        q_codes = q_codes.to(tl.int8)
        row_scale = q_steps * scaling
    else:
        q_codes = tl.where(mask_m[:, None] & mask_d[None, :], _codes(q, q_step, q_zero, LOW, HIGH), 0.0).to(tl.int8)
        row_scale = q_step * k_step * scaling
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    m_base = mask_ptr + batch * stride_mb + head * stride_mh + offs_m[:, None].to(tl.int64) * stride_mq

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, K_TOKENS, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < K_TOKENS
        scores = _scores(q_codes, row_scale, k_base, m_base, offs_n, mask_n, offs_d, mask_d, mask_m, stride_kt,
                         stride_mk, k_step, k_zero, LOW, HIGH, HAS_MASK, TOKENWISE_LOG2)
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # a row that has seen only -inf keeps max -inf: shift by 0 there, not by -inf
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(scores - shift[:, None]), axis=1)
        row_max = new_max

    if TOKENWISE_LOG2:
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.int32)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    for n0 in range(0, K_TOKENS, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < K_TOKENS
        scores = _scores(q_codes, row_scale, k_base, m_base, offs_n, mask_n, offs_d, mask_d, mask_m, stride_kt,
                         stride_mk, k_step, k_zero, LOW, HIGH, HAS_MASK, TOKENWISE_LOG2)
        probs = tl.math.div_rn(tl.exp(scores - shift[:, None]), row_sum[:, None])  # NaN: every key masked
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if TOKENWISE_LOG2:
            levels = tl.where(mask_n[None, :], _log2_levels(probs, LOG2_LARGEST), 0.0)
            v_codes, v_steps = _tokenwise_codes(v, mask_n[:, None] & mask_d[None, :], LOW, HIGH)
            acc = tl.dot(levels, _round_to_tf32(v_codes * v_steps[:, None]), acc, input_precision="tf32")
        else:
            a_codes = tl.where(mask_n[None, :], _codes(probs, a_step, a_zero, LOW, HIGH), 0.0).to(tl.int8)
            v_codes = tl.where(mask_n[:, None] & mask_d[None, :], _codes(v, v_step, v_zero, LOW, HIGH),
                               0.0).to(tl.int8)
            acc = tl.dot(a_codes, v_codes, acc, out_dtype=tl.int32)
    if TOKENWISE_LOG2:
        out = acc
    else:
        out = acc.to(tl.float32) * (a_step * v_step)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
