"""Triton kernel for QLA's DW-separable down path on vision tokens (see reference.dwsep_down).

One program takes BLOCK_T tokens of one image and walks the channels in BLOCK_C slices: each
slice's nine shifted neighbour tiles are read straight from h (zero outside the grid), weighted by
the depthwise taps, GELU'd in registers and multiplied into the [BLOCK_T, r] accumulator with one
tensor-core dot, so neither the conv output nor the GELU output is ever written to memory: the
adapter costs one read of h (plus neighbour re-reads that hit L1/L2) and a write of T.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["R"])  # the adapter's rank compiles no new kernel
def dwsep_down_kernel(
    h_ptr, dw_ptr, dw_bias_ptr, down_ptr, down_bias_ptr, t_ptr,
    TOKENS, D, R, HEIGHT, WIDTH, PREFIX,
    stride_hb, stride_ht, stride_down_c, stride_tm,
    HAS_DW_BIAS: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    image = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < TOKENS
    is_body = mask_t & (offs_t >= PREFIX)
    position = tl.where(is_body, offs_t - PREFIX, 0)
    row = position // WIDTH
    col = position % WIDTH
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    h_image = h_ptr + image.to(tl.int64) * stride_hb
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, D, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < D
        center = tl.load(h_image + offs_t[:, None] * stride_ht + offs_c[None, :],
                         mask=mask_t[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        conv = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for tap in tl.static_range(9):
            near_row = row + (tap // 3 - 1)
            near_col = col + (tap % 3 - 1)
            inside = is_body & (near_row >= 0) & (near_row < HEIGHT) & (near_col >= 0) & (near_col < WIDTH)
            near = PREFIX + near_row * WIDTH + near_col
            values = tl.load(h_image + near[:, None] * stride_ht + offs_c[None, :],
                             mask=inside[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            taps = tl.load(dw_ptr + offs_c * 9 + tap, mask=mask_c, other=0.0).to(tl.float32)
            conv += values * taps[None, :]
        if HAS_DW_BIAS:
            conv += tl.load(dw_bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        mixed = tl.where(is_body[:, None], conv, center)  # prefix tokens bypass the conv
        gelu = 0.5 * mixed * (1.0 + tl.math.erf(mixed * 0.7071067811865476))
        down = tl.load(down_ptr + offs_c[:, None] * stride_down_c + offs_r[None, :],
                       mask=mask_c[:, None] & mask_r[None, :], other=0.0)
        if FP32:
            acc = tl.dot(gelu, down.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(gelu.to(down.dtype), down, acc)
    if HAS_DOWN_BIAS:
        acc += tl.load(down_bias_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    out_rows = image.to(tl.int64) * TOKENS + offs_t
    tl.store(t_ptr + out_rows[:, None] * stride_tm + offs_r[None, :], acc.to(t_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_r[None, :])
