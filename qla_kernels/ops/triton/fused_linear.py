"""Triton multi-segment fused linear: int8 activations (W8A8, W4A4, W4A8) and W4A16.

    Y = act( (A·Wᵀ − z·colsum(W)) · s_x · s_w + T·Uᵀ + X_c·W_cᵀ + bias ) + residual
    (RESIDUAL_FIRST: act( (A·Wᵀ − z·colsum(W)) · s_x · s_w + bias + residual ) + T·Uᵀ + X_c·W_cᵀ)

One program computes a BLOCK_M × BLOCK_N tile: the integer main loop accumulates in int32 (int4
weights are unpacked in registers; QServe group scales multiply them back to int8 so the same
int32 accumulator serves the whole K loop). For W4A16 the activations stay fp16/bf16 and each
uint4 tile is dequantized in the loop, (q − z)·s rounded once to the activation dtype, into an
fp32 accumulator; when there are too few tiles to fill the GPU (small M), a first launch
(SPLIT_PHASE 1) splits K across programs and stores fp32 partial sums, and a second (SPLIT_PHASE
2) adds them in a fixed order and runs the epilogue. Then the epilogue runs once on the tile: dequant,
the low-rank and full-rank fp segments as extra tensor-core dots into the fp32 accumulator,
bias, activation, residual, and the store (or, for re-quantization, an fp32 store plus an atomic
per-row absmax that `requantize_rows_kernel` turns into int8).

Arguments follow the tutorial order: pointers, sizes, strides, then constexpr meta-parameters.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Weight formats (constexpr codes).
FORMAT_INT8, FORMAT_INT4, FORMAT_INT4_GROUPS, FORMAT_UINT4_ASYM = 0, 1, 2, 3
# Activations (constexpr ACTIVATION codes) are indices into reference.ACTIVATIONS: 0 none, 1 gelu,
# 2 gelu_tanh, 3 relu, 4 quick_gelu; gated: 5 swiglu, 6 geglu, 7 geglu_tanh; then 8 relu6, 9 silu.


@triton.jit
def round_half_even(x):
    """rint for |x| < 2**22: adding 1.5·2**23 leaves no fraction bits, so the fp32 add rounds to
    nearest even; subtracting it back is exact. (libdevice.rint has no interpreter version.)"""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def clamp_codes(q, low, high):
    """clamp to [low, high] with NaN -> 0 (checked first: GPU min/max return the non-NaN operand)."""
    clamped = tl.minimum(tl.maximum(q, low), high)
    return tl.where(q != q, 0.0, clamped)


@triton.jit
def abs_bits(x):
    """|x| as int32 bits: ordered like the floats for non-negative values, NaN above +inf, so an
    integer max propagates NaN (float max reductions may drop it)."""
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def absmax_step(absmax, qmax):
    """The symmetric step max(absmax, eps) / qmax of quant.primitives.absmax_scale (NaN stays NaN)."""
    return tl.math.div_rn(tl.where((absmax > 1e-8) | (absmax != absmax), absmax, 1e-8), qmax * 1.0)


@triton.jit
def _unpack_int4_tile(packed):
    """uint8 [BN, BK/2] (low nibble = even k) -> int8 [BK, BN] sign-extended."""
    nibbles = packed.to(tl.int8, bitcast=True)
    low = (nibbles << 4) >> 4
    high = nibbles >> 4
    block_n: tl.constexpr = packed.shape[0]
    block_k: tl.constexpr = 2 * packed.shape[1]
    return tl.trans(tl.reshape(tl.join(low, high), (block_n, block_k)))


@triton.jit
def _unpack_uint4_tile(packed):
    """uint8 [BN, BK/2] (low nibble = even k) -> int32 [BK, BN] codes in 0..15."""
    block_n: tl.constexpr = packed.shape[0]
    block_k: tl.constexpr = 2 * packed.shape[1]
    codes = packed.to(tl.int32)
    return tl.trans(tl.reshape(tl.join(codes & 0xF, codes >> 4), (block_n, block_k)))


@triton.jit
def add_corrections(y, rows, row_valid, offs_n, mask_n, t_ptr, u_ptr, xc_ptr, wc_ptr, R, KC, stride_tm, stride_un,
                    stride_xm, stride_wcn, HAS_LOWRANK: tl.constexpr, HAS_FULLRANK: tl.constexpr,
                    LOWRANK_FP32: tl.constexpr, FULLRANK_FP32: tl.constexpr, BLOCK_R: tl.constexpr):
    """y + T·Uᵀ + X_c·W_cᵀ for the tile's rows and columns, as extra dots into y."""
    if HAS_LOWRANK:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :],
                        mask=row_valid[:, None] & (offs_r[None, :] < R), other=0.0)
            u = tl.load(u_ptr + offs_n[None, :] * stride_un + offs_r[:, None],
                        mask=mask_n[None, :] & (offs_r[:, None] < R), other=0.0)
            if LOWRANK_FP32:
                y = tl.dot(t, u, y, input_precision="tf32x3")
            else:
                y = tl.dot(t, u, y)
    if HAS_FULLRANK:
        for c0 in range(0, KC, BLOCK_R):
            offs_c = c0 + tl.arange(0, BLOCK_R)
            xc = tl.load(xc_ptr + rows[:, None] * stride_xm + offs_c[None, :],
                         mask=row_valid[:, None] & (offs_c[None, :] < KC), other=0.0)
            wc = tl.load(wc_ptr + offs_n[None, :] * stride_wcn + offs_c[:, None],
                         mask=mask_n[None, :] & (offs_c[:, None] < KC), other=0.0)
            if FULLRANK_FP32:
                y = tl.dot(xc, wc, y, input_precision="tf32x3")
            else:
                y = tl.dot(xc, wc, y)
    return y


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row-tiles share each weight
    column-tile while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % pids_per_group) % group_rows, (pid % pids_per_group) // group_rows


@triton.jit
def integer_weight_tile(w_ptr, w_row_offsets, offs_n, mask_n, k0, offs_k, mask_k, K, w_group_ptr, stride_gn, GROUP_K,
                        WEIGHT_FORMAT: tl.constexpr, GROUP_SCALE_PER_TILE: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 [BLOCK_K, BLOCK_N] weights of columns k0 + offs_k (int8, or int4 unpacked in registers
    and, for QServe groups, multiplied back to int8 by the integer group scale)."""
    if WEIGHT_FORMAT == 0:
        w = tl.load(w_ptr + w_row_offsets[None, :] + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0)
    else:
        offs_kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + w_row_offsets[:, None] + offs_kp[None, :],
                         mask=mask_n[:, None] & (offs_kp[None, :] < K // 2), other=0)
        w = _unpack_int4_tile(packed)
        if WEIGHT_FORMAT == 2:
            # |q4 · g| <= 7 · 17 = 119: the product is an exact int8.
            if GROUP_SCALE_PER_TILE:
                g = tl.load(w_group_ptr + offs_n * stride_gn + k0 // GROUP_K, mask=mask_n, other=0)
                w = (w.to(tl.int16) * g.to(tl.int16)[None, :]).to(tl.int8)
            else:
                g = tl.load(w_group_ptr + offs_n[None, :] * stride_gn + offs_k[:, None] // GROUP_K,
                            mask=mask_n[None, :] & mask_k[:, None], other=0)
                w = (w.to(tl.int16) * g.to(tl.int16)).to(tl.int8)
    return w


@triton.jit
def dequantized(acc, a_rows, a_valid, offs_n, mask_n, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_colsum_ptr,
                A_SCALE_PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO_PER_ROW: tl.constexpr):
    """(acc − z·colsum(W)) · s_x · s_w in fp32, the rows' scales (and zero points) read at a_rows."""
    if HAS_ZERO:
        colsum = tl.load(w_colsum_ptr + offs_n, mask=mask_n, other=0)
        if ZERO_PER_ROW:
            zero = tl.load(a_zero_ptr + a_rows, mask=a_valid, other=0).to(tl.int32)
            acc = acc - zero[:, None] * colsum[None, :]
        else:
            acc = acc - tl.load(a_zero_ptr).to(tl.int32) * colsum[None, :]
    if A_SCALE_PER_ROW:
        s_x = tl.load(a_scale_ptr + a_rows, mask=a_valid, other=0.0)
    else:
        s_x = tl.where(a_valid, tl.load(a_scale_ptr), 0.0)
    s_w = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * s_x[:, None] * s_w[None, :]
    return y


@triton.jit
def finish_tile(y, rows, row_valid, pid_n, offs_n, mask_n, t_ptr, u_ptr, xc_ptr, wc_ptr, bias_ptr, residual_ptr, out_ptr,
                row_absmax_ptr, N, R, KC, stride_tm, stride_un, stride_xm, stride_wcn, stride_rm, stride_om,
                HAS_LOWRANK: tl.constexpr, HAS_FULLRANK: tl.constexpr, LOWRANK_FP32: tl.constexpr,
                FULLRANK_FP32: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, REQUANT: tl.constexpr, RESIDUAL_FIRST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The epilogue after dequantization, on the fp32 tile y of output rows `rows` (int64): the
    correction segments, bias, activation, residual and the store (or REQUANT's fp32 store and
    per-row absmax)."""
    if not RESIDUAL_FIRST:
        y = add_corrections(y, rows, row_valid, offs_n, mask_n, t_ptr, u_ptr, xc_ptr, wc_ptr, R, KC, stride_tm,
                            stride_un, stride_xm, stride_wcn, HAS_LOWRANK, HAS_FULLRANK, LOWRANK_FP32, FULLRANK_FP32,
                            BLOCK_R)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    if RESIDUAL_FIRST:  # act(y + bias + residual) + corrections; never with a gated activation (host-checked)
        y = y + tl.load(residual_ptr + rows[:, None] * stride_rm + offs_n[None, :],
                        mask=row_valid[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    if ACTIVATION == 1:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 2:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == 3:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == 4:  # x·σ(1.702x) as x / (1 + 2^(−1.702·log2(e)·x)): tl.sigmoid spills on sm_80
        y = y / (1.0 + tl.exp2(-2.4554669595930156 * y))
    elif ACTIVATION == 8:  # relu6, NaN propagated as torch's clamp does
        y = tl.where(y != y, y, tl.minimum(tl.maximum(y, 0.0), 6.0))
    elif ACTIVATION == 9:  # silu as x / (1 + 2^(−log2(e)·x)), as quick_gelu
        y = y / (1.0 + tl.exp2(-1.4426950408889634 * y))
    if RESIDUAL_FIRST:  # after the activation, into the same accumulator (no second tile of registers)
        y = add_corrections(y, rows, row_valid, offs_n, mask_n, t_ptr, u_ptr, xc_ptr, wc_ptr, R, KC, stride_tm,
                            stride_un, stride_xm, stride_wcn, HAS_LOWRANK, HAS_FULLRANK, LOWRANK_FP32, FULLRANK_FP32,
                            BLOCK_R)

    if ACTIVATION >= 5 and ACTIVATION <= 7:
        gate, up = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
        if ACTIVATION == 5:
            gate = gate * tl.sigmoid(gate)
        elif ACTIVATION == 6:
            gate = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        else:
            inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            gate = 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        y = gate * up
        offs_out = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        n_out = N // 2
    else:
        offs_out = offs_n
        n_out = N
    mask_out = row_valid[:, None] & (offs_out[None, :] < n_out)
    if HAS_RESIDUAL and not RESIDUAL_FIRST:
        y = y + tl.load(residual_ptr + rows[:, None] * stride_rm + offs_out[None, :], mask=mask_out,
                        other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_out[None, :]
    if REQUANT:
        tl.store(out_ptrs, y, mask=mask_out)
        tile_absmax = tl.max(tl.where(mask_out, abs_bits(y), 0), axis=1)
        tl.atomic_max(row_absmax_ptr + rows, tile_absmax, mask=row_valid)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_out)


# The split count and the ranks of the low-rank / full-rank segments are runtime sizes, never
# specialized: a new split count or a correction's calibrated rank must not compile new kernels.
@triton.jit(do_not_specialize=["SPLITS", "R", "KC"])
def fused_linear_kernel(
    a_ptr, a_scale_ptr, a_zero_ptr, w_ptr, w_scale_ptr, w_group_ptr, w_colsum_ptr,
    t_ptr, u_ptr, xc_ptr, wc_ptr, bias_ptr, residual_ptr, out_ptr, row_absmax_ptr,
    gather_ptr, scatter_ptr, partial_ptr,
    M, N, K, R, KC, GROUP_K, K_PER_SPLIT, SPLITS, A_ROWS, OUT_ROWS,
    stride_am, stride_wn, stride_gn, stride_tm, stride_un, stride_xm, stride_wcn, stride_rm, stride_om,
    WEIGHT_FORMAT: tl.constexpr, A_SCALE_PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr,
    ZERO_PER_ROW: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_FULLRANK: tl.constexpr,
    MAIN_FP32: tl.constexpr, LOWRANK_FP32: tl.constexpr, FULLRANK_FP32: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, REQUANT: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, GROUP_SCALE_PER_TILE: tl.constexpr, SPLIT_PHASE: tl.constexpr = 0,
    RESIDUAL_FIRST: tl.constexpr = False,
):
    # Row indices and offsets are int64 wherever a product can pass 2**31: an LM head's output at
    # prefill (M·N), a large weight (N·K), the split-K partial sums (SPLITS·M·N). Row maps index
    # rows of `a` (A_ROWS of them) and of the output (OUT_ROWS); entries outside are padding.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if ACTIVATION >= 5 and ACTIVATION <= 7:
        # Gated (SwiGLU, GeGLU): W's first N/2 rows are the gate, its last N/2 the up projection.
        # The tile holds them interleaved (column 2j gate, 2j+1 up of output column
        # pid_n·BLOCK_N/2 + j), which the epilogue splits; every per-channel operand is read
        # through these weight rows.
        pair = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        offs_n = pair + (tl.arange(0, BLOCK_N) % 2) * (N // 2)
        mask_n = pair < N // 2
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    mask_m = offs_m < M
    if GATHER:
        a_rows = tl.load(gather_ptr + offs_m, mask=mask_m, other=-1)
        a_valid = mask_m & (a_rows >= 0) & (a_rows < A_ROWS)
    else:
        a_rows = offs_m
        a_valid = mask_m
    a_rows = tl.where(a_valid, a_rows, 0)
    a_row_offsets = a_rows.to(tl.int64) * stride_am
    w_row_offsets = offs_n.to(tl.int64) * stride_wn

    if WEIGHT_FORMAT == 3:
        # ------------------------------------------------------------ W4A16: dequant in the loop
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        groups = K // GROUP_K
        # Split-K (SPLIT_PHASE 1 then 2): program_id(1) covers K_PER_SPLIT of K.
        k_begin = tl.program_id(1) * K_PER_SPLIT if SPLIT_PHASE == 1 else 0
        k_end = min(K, k_begin + K_PER_SPLIT) if SPLIT_PHASE == 1 else K
        if SPLIT_PHASE == 2:
            k_end = 0  # the partial sums replace the main loop
            partial_mask = mask_m[:, None] & mask_n[None, :]
            for split in range(SPLITS):  # a fixed order: deterministic
                y += tl.load(partial_ptr + (split * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :],
                             mask=partial_mask, other=0.0)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + a_row_offsets[:, None] + offs_k[None, :],
                        mask=a_valid[:, None] & mask_k[None, :], other=0.0)
            offs_kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + w_row_offsets[:, None] + offs_kp[None, :],
                             mask=mask_n[:, None] & (offs_kp[None, :] < K // 2), other=0)
            codes = _unpack_uint4_tile(packed).to(tl.float32)
            if GROUP_SCALE_PER_TILE:
                group = offs_n * groups + k0 // GROUP_K
                zero = tl.load(w_group_ptr + group, mask=mask_n, other=0).to(tl.float32)[None, :]
                scale = tl.load(w_scale_ptr + group, mask=mask_n, other=0.0)[None, :]
            else:
                group = offs_n[None, :] * groups + offs_k[:, None] // GROUP_K
                mask = mask_n[None, :] & mask_k[:, None]
                zero = tl.load(w_group_ptr + group, mask=mask, other=0).to(tl.float32)
                scale = tl.load(w_scale_ptr + group, mask=mask, other=0.0)
            w = ((codes - zero) * scale).to(a.dtype)
            if MAIN_FP32:
                y = tl.dot(a, w, y, input_precision="tf32x3")
            else:
                y = tl.dot(a, w, y)
        if SPLIT_PHASE == 1:
            tl.store(partial_ptr + (tl.program_id(1) * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :], y,
                     mask=mask_m[:, None] & mask_n[None, :])
            return
    else:
        # ------------------------------------------------------------ integer main loop
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + a_row_offsets[:, None] + offs_k[None, :],
                        mask=a_valid[:, None] & mask_k[None, :], other=0)
            w = integer_weight_tile(w_ptr, w_row_offsets, offs_n, mask_n, k0, offs_k, mask_k, K, w_group_ptr, stride_gn,
                                    GROUP_K, WEIGHT_FORMAT, GROUP_SCALE_PER_TILE, BLOCK_K)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)

        # ------------------------------------------------------------ dequant epilogue
        y = dequantized(acc, a_rows, a_valid, offs_n, mask_n, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_colsum_ptr,
                        A_SCALE_PER_ROW, HAS_ZERO, ZERO_PER_ROW)

    if SCATTER:
        rows = tl.load(scatter_ptr + offs_m, mask=mask_m, other=-1)
        row_valid = mask_m & (rows >= 0) & (rows < OUT_ROWS)
    else:
        rows = offs_m
        row_valid = mask_m
    rows = tl.where(row_valid, rows, 0).to(tl.int64)

    finish_tile(y, rows, row_valid, pid_n, offs_n, mask_n, t_ptr, u_ptr, xc_ptr, wc_ptr, bias_ptr, residual_ptr, out_ptr,
                row_absmax_ptr, N, R, KC, stride_tm, stride_un, stride_xm, stride_wcn, stride_rm, stride_om, HAS_LOWRANK,
                HAS_FULLRANK, LOWRANK_FP32, FULLRANK_FP32, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, REQUANT, RESIDUAL_FIRST,
                BLOCK_M, BLOCK_N, BLOCK_R)

@triton.jit
def requantize_rows_kernel(
    y_ptr, row_absmax_ptr, q_ptr, scale_ptr,
    M, N,
    stride_ym, stride_qm,
    QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per-token int8 from an fp32 matrix whose row absmax (as int bits) is already known."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    row_offsets = offs_m.to(tl.int64)
    absmax = tl.load(row_absmax_ptr + offs_m, mask=mask_m, other=0).to(tl.float32, bitcast=True)
    scale = absmax_step(absmax, QMAX)
    tl.store(scale_ptr + offs_m, scale, mask=mask_m)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (offs_n[None, :] < N)
        y = tl.load(y_ptr + row_offsets[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0)
        q = clamp_codes(round_half_even(tl.math.div_rn(y, scale[:, None])), -QMAX - 1.0, QMAX * 1.0)
        tl.store(q_ptr + row_offsets[:, None] * stride_qm + offs_n[None, :], q.to(tl.int8), mask=mask)
