"""Triton quantized convolutions, with the fused linear's epilogue: an implicit GEMM, and a
direct kernel for depthwise convolutions.

    Y[m, o] = epilogue( Σ_{tap, c} A[m, tap, c] · W[o, tap·C + c] )

Row m is one output pixel (image, oh, ow) of channels-last activations; its K runs over the taps
(kh, kw) and, within a tap, the group's C channels, the order of `conv.conv_weight_matrix`. The
K loop gathers each tap's window rows straight from the input (no materialised im2col): a pixel
outside the image reads the padding code (static scales: the code of 0) or 0.0 (dynamic).

- Static activations (one scale per tensor, optional zero point): `x` holds the pixels' int8
  codes, quantized once by the pre-kernel; the loop loads them.
- Dynamic activations (one scale per output pixel: its window's absmax, DESIGN's numerics applied
  to windows): `x` holds the fp activations and the loop quantizes each gathered tile at its
  row's scale, as `quantized_codes` does (round half to even of the correctly rounded quotient,
  clamped), so the codes equal the reference's bit for bit. An input pixel is quantized once per
  window it falls in (kh·kw times): the price of per-window scales without an im2col in memory.

The host guarantees C % BLOCK_K == 0 (a K step never straddles two taps) and K = taps·C. Then
the dequantization and epilogue are the fused linear's own (`dequantized`, `finish_tile`).

A depthwise convolution (`depthwise_conv_kernel`) reads the same window codes, a [pixels,
channels] tile per tap, and sums them times each channel's tap weight in int32: no tensor cores,
as each weight meets one channel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_linear import (clamp_codes, dequantized, finish_tile, grouped_tile, integer_weight_tile,
                           round_half_even)


@triton.jit
def output_pixels(offs_m, M, HEIGHT, WIDTH, OUT_H, OUT_W):
    """(rows clamped in range, their mask, output y, output x, the image's first input pixel)."""
    mask_m = offs_m < M
    rows = tl.where(mask_m, offs_m, 0)
    # The image's first pixel in 64 bits: batch · H · W · C passes 2**31 at DETR's resolutions.
    image_pixels = (rows // (OUT_W * OUT_H)).to(tl.int64) * HEIGHT * WIDTH
    return rows, mask_m, (rows // OUT_W) % OUT_H, rows % OUT_W, image_pixels


@triton.jit
def row_scales(a_scale_ptr, rows, mask_m, QUANTIZE_IN_LOOP: tl.constexpr):
    """The rows' window scales [BLOCK_M, 1] when the loop quantizes (else an unused 1.0)."""
    if QUANTIZE_IN_LOOP:
        scale = tl.load(a_scale_ptr + rows, mask=mask_m, other=1.0)[:, None]
    else:
        scale = 1.0
    return scale


@triton.jit
def window_codes(x_ptr, tap, offs_c, mask_m, mask_c, out_y, out_x, image_pixels, row_scale, HEIGHT, WIDTH, PAD_CODE,
                 stride_xp, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DILATION_H, DILATION_W,
                 QUANTIZE_IN_LOOP: tl.constexpr, QMAX: tl.constexpr):
    """int8 [BLOCK_M, len(offs_c)] codes of channels offs_c at window tap `tap` of each row: the
    loaded codes (the padding code outside the image), or the fp values quantized at the row's
    scale (0 outside), as `quantized_codes` rounds them."""
    in_y = out_y * STRIDE_H - PAD_H + (tap // KERNEL_W) * DILATION_H
    in_x = out_x * STRIDE_W - PAD_W + (tap % KERNEL_W) * DILATION_W
    inside = mask_m & (in_y >= 0) & (in_y < HEIGHT) & (in_x >= 0) & (in_x < WIDTH)
    pixel = image_pixels + tl.where(inside, in_y * WIDTH + in_x, 0)
    a_ptrs = x_ptr + pixel[:, None] * stride_xp + offs_c[None, :]
    mask = inside[:, None] & mask_c[None, :]
    if QUANTIZE_IN_LOOP:
        v = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
        codes = clamp_codes(round_half_even(tl.math.div_rn(v, row_scale)), -QMAX - 1.0, QMAX * 1.0).to(tl.int8)
    else:
        codes = tl.where(inside[:, None], tl.load(a_ptrs, mask=mask, other=0), PAD_CODE.to(tl.int8))
    return codes


# The geometry and the sizes that only bound masks and index arithmetic are runtime values, never
# specialized: otherwise every layer's window, grid and batch would compile kernels of its own
# (and the ahead-of-time table would hold one model's geometries, not any model's). C (the
# alignment of the gathered rows) and the strides are specialized.
_RUNTIME_SIZES = ["M", "R", "KC", "HEIGHT", "WIDTH", "OUT_H", "OUT_W", "PAD_CODE", "KERNEL_H", "KERNEL_W", "STRIDE_H",
                  "STRIDE_W", "PAD_H", "PAD_W", "DILATION_H", "DILATION_W"]


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def implicit_conv_kernel(
    x_ptr, a_scale_ptr, a_zero_ptr, w_ptr, w_scale_ptr, w_colsum_ptr,
    t_ptr, u_ptr, xc_ptr, wc_ptr, bias_ptr, residual_ptr, out_ptr, row_absmax_ptr,
    M, N, R, KC, CHANNELS, HEIGHT, WIDTH, OUT_H, OUT_W, PAD_CODE,
    KERNEL_H, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DILATION_H, DILATION_W,
    stride_xp, stride_wn, stride_tm, stride_un, stride_xm, stride_wcn, stride_rm, stride_om,
    WEIGHT_FORMAT: tl.constexpr, QUANTIZE_IN_LOOP: tl.constexpr, QMAX: tl.constexpr,
    A_SCALE_PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    HAS_FULLRANK: tl.constexpr, LOWRANK_FP32: tl.constexpr, FULLRANK_FP32: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, REQUANT: tl.constexpr,
    RESIDUAL_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows, mask_m, out_y, out_x, image_pixels = output_pixels(offs_m, M, HEIGHT, WIDTH, OUT_H, OUT_W)
    w_row_offsets = offs_n.to(tl.int64) * stride_wn
    row_scale = row_scales(a_scale_ptr, rows, mask_m, QUANTIZE_IN_LOOP)

    K = KERNEL_H * KERNEL_W * CHANNELS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        tap = k0 // CHANNELS
        offs_c = (k0 - tap * CHANNELS) + tl.arange(0, BLOCK_K)
        a = window_codes(x_ptr, tap, offs_c, mask_m, tl.full((BLOCK_K,), 1, tl.int1), out_y, out_x, image_pixels,
                         row_scale, HEIGHT, WIDTH, PAD_CODE, stride_xp, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                         DILATION_H, DILATION_W, QUANTIZE_IN_LOOP, QMAX)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = integer_weight_tile(w_ptr, w_row_offsets, offs_n, mask_n, k0, offs_k, offs_k < K, K, w_ptr, 0, 1,
                                WEIGHT_FORMAT, False, BLOCK_K)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)

    y = dequantized(acc, rows, mask_m, offs_n, mask_n, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_colsum_ptr,
                    A_SCALE_PER_ROW, HAS_ZERO, False)
    finish_tile(y, rows.to(tl.int64), mask_m, pid_n, offs_n, mask_n, t_ptr, u_ptr, xc_ptr, wc_ptr, bias_ptr,
                residual_ptr, out_ptr, row_absmax_ptr, N, R, KC, stride_tm, stride_un, stride_xm, stride_wcn, stride_rm,
                stride_om, HAS_LOWRANK, HAS_FULLRANK, LOWRANK_FP32, FULLRANK_FP32, HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
                REQUANT, RESIDUAL_FIRST, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def depthwise_conv_kernel(
    x_ptr, a_scale_ptr, a_zero_ptr, w_ptr, w_scale_ptr, w_colsum_ptr,
    t_ptr, u_ptr, xc_ptr, wc_ptr, bias_ptr, residual_ptr, out_ptr, row_absmax_ptr,
    M, N, R, KC, CHANNELS, HEIGHT, WIDTH, OUT_H, OUT_W, PAD_CODE,
    KERNEL_H, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DILATION_H, DILATION_W,
    stride_xp, stride_wn, stride_tm, stride_un, stride_xm, stride_wcn, stride_rm, stride_om,
    MULTIPLIER: tl.constexpr, QUANTIZE_IN_LOOP: tl.constexpr, QMAX: tl.constexpr,
    A_SCALE_PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    HAS_FULLRANK: tl.constexpr, LOWRANK_FP32: tl.constexpr, FULLRANK_FP32: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, REQUANT: tl.constexpr,
    RESIDUAL_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """A depthwise convolution (one input channel per group, output channel o reading input
    channel o // MULTIPLIER) as a direct int32 tap sum on a [pixels, channels] tile: no tensor
    cores (each weight meets one channel), memory-bound. The window codes, the dequantization
    and the epilogue are the implicit GEMM's."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows, mask_m, out_y, out_x, image_pixels = output_pixels(offs_m, M, HEIGHT, WIDTH, OUT_H, OUT_W)
    row_scale = row_scales(a_scale_ptr, rows, mask_m, QUANTIZE_IN_LOOP)
    in_channels = offs_n // MULTIPLIER
    w_rows = offs_n.to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for tap in range(KERNEL_H * KERNEL_W):
        a = window_codes(x_ptr, tap, in_channels, mask_m, mask_n, out_y, out_x, image_pixels, row_scale, HEIGHT,
                         WIDTH, PAD_CODE, stride_xp, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DILATION_H,
                         DILATION_W, QUANTIZE_IN_LOOP, QMAX)
        w = tl.load(w_ptr + w_rows + tap, mask=mask_n, other=0)
        acc += a.to(tl.int32) * w.to(tl.int32)[None, :]

    y = dequantized(acc, rows, mask_m, offs_n, mask_n, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_colsum_ptr,
                    A_SCALE_PER_ROW, HAS_ZERO, False)
    finish_tile(y, rows.to(tl.int64), mask_m, tl.program_id(1), offs_n, mask_n, t_ptr, u_ptr, xc_ptr, wc_ptr,
                bias_ptr, residual_ptr, out_ptr, row_absmax_ptr, N, R, KC, stride_tm, stride_un, stride_xm, stride_wcn,
                stride_rm, stride_om, HAS_LOWRANK, HAS_FULLRANK, LOWRANK_FP32, FULLRANK_FP32, HAS_BIAS, ACTIVATION,
                HAS_RESIDUAL, REQUANT, RESIDUAL_FIRST, BLOCK_M, BLOCK_N, BLOCK_R)
