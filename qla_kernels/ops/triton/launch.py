"""Host wrappers: allocate outputs, choose each kernel's configuration for the target, launch.

Arguments arrive validated by `qla_kernels.ops.checks` (the custom ops are reached only through
`qla_kernels.ops`). Every choice here (tiles, stages, split-K, FP contraction) is a function of the
operands and the `Target`, so `planning` (kernel_launch.py) replays it for the ahead-of-time check.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton

from ...formats.weights import weight_in_features
from ...quant.hadamard import kernel_factors
from ...quant.hadamard import rotate as hadamard_rotate_reference
from ...quant.primitives import qrange
from ..conv import window_scales
from ..operands import FusedLinearOperands
from ..reference import ACTIVATIONS, NORM_KINDS, output_features, quantize_output
from .attention import quantized_attention_kernel
from .conv_gemm import depthwise_conv_kernel, implicit_conv_kernel
from .dwsep import dwsep_down_kernel
from .fused_linear import fused_linear_kernel, requantize_rows_kernel
from .kernel_launch import Target, run_kernel, target_of
from .quantize import quantize_activation_kernel
from .rotate import rotate_quantize_kernel, rotation_tile
from .tuning import Autotuner, conv_candidates, gemm_candidates, m_bucket

_WEIGHT_FORMAT_CODES = {"int8": 0, "int4": 1, "int4_int8_groups": 2, "uint4_asym_groups": 3}
_GROUPED_FORMATS = ("int4_int8_groups", "uint4_asym_groups")
TRITON_WEIGHT_FORMATS = tuple(_WEIGHT_FORMAT_CODES)
MAX_PREOP_RANK = 128
_gemm_tuner = Autotuner("qla fused_linear")


def _block_r(width: int, fp32: bool) -> int:
    """Rank (or full-rank K) step of the epilogue dots: up to 32 wide (64 spilled with the full
    epilogue), 16 for fp32 operands, whose tf32x3 dots hold three products' operands (ptxas -v)."""
    return max(16, min(16 if fp32 else 32, triton.next_power_of_2(max(width, 1))))


def _largest_power_of_two_dividing(value: int) -> int:
    return value & -value


def _dtype_name(tensor: Optional[torch.Tensor]) -> Optional[str]:
    return None if tensor is None else str(tensor.dtype)


# Split K when fewer tiles than this many per SM exist (W4A16 at small M), keeping >= 4 K steps each.
_SPLIT_K_TILES_PER_SM = 2
_SPLIT_K_MIN_STEPS = 4


def split_k_plan(tiles: int, k: int, block_k: int, sm_count: int) -> Tuple[int, int]:
    """(splits, K per split) for the W4A16 GEMM: enough programs for `_SPLIT_K_TILES_PER_SM` per SM.
    K per split is a multiple of BLOCK_K (so group scales stay per tile) and every split is non-empty."""
    steps = triton.cdiv(k, block_k)
    wanted = triton.cdiv(_SPLIT_K_TILES_PER_SM * sm_count, tiles)
    splits = max(1, min(wanted, steps // _SPLIT_K_MIN_STEPS))
    if splits == 1:
        return 1, k
    k_per_split = triton.cdiv(steps, splits) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def fused_linear(operands: FusedLinearOperands) -> Tuple[torch.Tensor, torch.Tensor]:
    if operands.requant_rotate:
        # The epilogue's fp32 rows, then the rotating pre-kernel's quantizer; for a width its tile
        # does not hold (`rotation_of`), the reference's rotation and quantizer of the same rows.
        y, _ = fused_linear(operands._replace(requant_bits=0, requant_rotate=False, out_dtype=torch.float32))
        if rotation_of(y.shape[1]) is None:
            return quantize_output(hadamard_rotate_reference(y), operands.requant_bits)
        q, scale, _ = rotate_quantize(y, operands.requant_bits, None, None, "none", None, None, 0.0, None)
        return q, scale
    a, out_rows = operands.a, operands.out_rows
    device = a.device
    target = target_of(device)
    gemm_rows = a.shape[0] if operands.gather_rows is None else operands.gather_rows.shape[0]
    n = operands.weight.shape[0]
    k = weight_in_features(operands.weight_format, operands.weight)
    n_out = output_features(n, operands.activation)
    make = torch.zeros if operands.scatter_rows is not None else torch.empty
    out = make((out_rows, n_out), dtype=torch.float32 if operands.requant_bits else operands.out_dtype,
               device=device)
    row_absmax = torch.zeros((out_rows,), dtype=torch.int32, device=device) if operands.requant_bits else out
    if gemm_rows and n:
        dummy = a
        lowrank_rank = 0 if operands.lowrank_t is None else operands.lowrank_t.shape[1]
        fullrank_k = 0 if operands.fullrank_x is None else operands.fullrank_x.shape[1]
        lowrank_fp32 = operands.lowrank_t is not None and operands.lowrank_t.dtype == torch.float32
        fullrank_fp32 = operands.fullrank_x is not None and operands.fullrank_x.dtype == torch.float32
        # One step width serves both segments: the narrower one when either dot is fp32.
        block_r = _block_r(max(lowrank_rank, fullrank_k), lowrank_fp32 or fullrank_fp32)
        main_fp32 = a.dtype == torch.float32
        present = lambda tensor: dummy if tensor is None else tensor  # noqa: E731  (a pointer the kernel ignores)
        row_stride = lambda tensor: 0 if tensor is None else tensor.stride(0)  # noqa: E731
        flags = dict(
            WEIGHT_FORMAT=_WEIGHT_FORMAT_CODES[operands.weight_format],
            A_SCALE_PER_ROW=operands.a_scale is not None and operands.a_scale.numel() == a.shape[0],
            HAS_ZERO=operands.a_zero_point is not None,
            ZERO_PER_ROW=operands.a_zero_point is not None and operands.a_zero_point.numel() == a.shape[0],
            HAS_LOWRANK=operands.lowrank_t is not None,
            HAS_FULLRANK=operands.fullrank_x is not None,
            MAIN_FP32=main_fp32,
            LOWRANK_FP32=lowrank_fp32,
            FULLRANK_FP32=fullrank_fp32,
            HAS_BIAS=operands.bias is not None,
            ACTIVATION=ACTIVATIONS.index(operands.activation),
            HAS_RESIDUAL=operands.residual is not None,
            REQUANT=bool(operands.requant_bits),
            GATHER=operands.gather_rows is not None,
            SCATTER=operands.scatter_rows is not None,
            BLOCK_R=block_r,
        )
        if operands.residual_before_activation:  # only then: the other launches keep their AOT table keys
            flags["RESIDUAL_FIRST"] = True
        # Integer formats promise an epilogue equal to the reference bit for bit: no FMA contraction
        # of acc·s_x·s_w + bias (+ residual). W4A16's main loop is an fp dot anyway.
        fp_fusion = operands.weight_format == "uint4_asym_groups"

        def launch(config):
            block_k = config.block_k
            if operands.weight_format in _GROUPED_FORMATS:
                # int8 dots need K >= 32 per step, fp16 dots 16; narrower groups use per-element scales.
                smallest = 32 if operands.weight_format == "int4_int8_groups" else 16
                block_k = min(block_k, max(smallest, _largest_power_of_two_dividing(operands.group_size)))
            options = config.launch_options()
            options["BLOCK_K"] = block_k
            if operands.requant_bits:
                row_absmax.zero_()
            tiles = triton.cdiv(gemm_rows, config.block_m) * triton.cdiv(n, config.block_n)
            splits, k_per_split = (split_k_plan(tiles, k, block_k, target.sm_count)
                                   if operands.weight_format == "uint4_asym_groups" else (1, k))
            partial = a.new_empty((splits, gemm_rows, n), dtype=torch.float32) if splits > 1 else dummy
            # The reduction reads the partial sums by row and column, so its tiles need not be the
            # split phase's: at most 32 rows (128×128 gated and 64×128 low-rank epilogues spilled
            # there, ptxas -v).
            reduce_m = min(config.block_m, 32)
            reduce_tiles = triton.cdiv(gemm_rows, reduce_m) * triton.cdiv(n, config.block_n)
            phases = (((1, (tiles, splits), config.block_m), (2, (reduce_tiles,), reduce_m)) if splits > 1
                      else ((0, (tiles,), config.block_m),))
            for phase, grid, block_m in phases:
                run_kernel(fused_linear_kernel, grid, device, (
                    a, present(operands.a_scale), present(operands.a_zero_point), operands.weight, operands.weight_scale,
                    present(operands.weight_group_scale if operands.weight_group_scale is not None
                            else operands.weight_zero),
                    present(operands.weight_colsum), present(operands.lowrank_t), present(operands.lowrank_u),
                    present(operands.fullrank_x), present(operands.fullrank_w), present(operands.bias),
                    present(operands.residual), out, row_absmax, present(operands.gather_rows),
                    present(operands.scatter_rows), partial,
                    gemm_rows, n, k, lowrank_rank, fullrank_k, operands.group_size, k_per_split, splits, a.shape[0],
                    out_rows, a.stride(0), operands.weight.stride(0), row_stride(operands.weight_group_scale),
                    row_stride(operands.lowrank_t), row_stride(operands.lowrank_u), row_stride(operands.fullrank_x),
                    row_stride(operands.fullrank_w), row_stride(operands.residual), out.stride(0),
                ), GROUP_SCALE_PER_TILE=(operands.weight_format in _GROUPED_FORMATS
                                         and operands.group_size % block_k == 0),
                    SPLIT_PHASE=phase, enable_fp_fusion=fp_fusion, **flags, **{**options, "BLOCK_M": block_m})

        dtypes = tuple(_dtype_name(t) for t in (a, operands.lowrank_t, operands.fullrank_x, operands.bias,
                                                 operands.residual)) + (str(operands.out_dtype),)
        key = (m_bucket(gemm_rows), n, k, operands.weight_format, operands.group_size, tuple(sorted(flags.items())),
               dtypes)
        candidates = gemm_candidates(target, w4a16=operands.weight_format == "uint4_asym_groups", fp32_main=main_fp32,
                                     fp32_epilogue=lowrank_fp32 or fullrank_fp32, columns=n)
        _gemm_tuner.run(key, target, candidates, launch)
    return _finished(out, row_absmax, operands.requant_bits)


def _finished(out: torch.Tensor, row_absmax: torch.Tensor, requant_bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A GEMM's (output, empty scale), or with `requant_bits` its fp32 rows re-quantized per row
    from the row absmax its epilogue left."""
    if not requant_bits:
        return out, out.new_empty((0,), dtype=torch.float32)
    out_rows, n_out = out.shape
    q = torch.empty((out_rows, n_out), dtype=torch.int8, device=out.device)
    scale = torch.empty((out_rows,), dtype=torch.float32, device=out.device)
    if out_rows and n_out:
        block_m, block_n = 16, min(256, triton.next_power_of_2(n_out))
        run_kernel(requantize_rows_kernel, (triton.cdiv(out_rows, block_m),), out.device,
                   (out, row_absmax, q, scale, out_rows, n_out, out.stride(0), q.stride(0)),
                   QMAX=qrange(requant_bits)[1], BLOCK_M=block_m, BLOCK_N=block_n,
                   num_warps=4, num_stages=1, enable_fp_fusion=False)
    return q, scale


# The implicit-GEMM convolution's K steps stay inside one tap: BLOCK_K divides the group's
# channels, and int8 dots need K >= 32 per step.
_IMPLICIT_CONV_MIN_STEP = 32
_IMPLICIT_CONV_FORMATS = ("int8", "int4")
# Quantizing in the K loop holds the fp32 activation tile and its division's temporaries beside
# the accumulator: at BLOCK_K 128 sm_90 spilled (128×64, 4 warps), at 64 sm_80 did (ptxas -v).
# Indexed by "is sm_90 or newer" (the interpreter takes the first).
_IN_LOOP_QUANTIZED_BLOCK_K = (32, 64)


def supports_conv_gemm(x: torch.Tensor, plan) -> bool:
    """Whether the Triton convolution kernels run this plan: a depthwise convolution with int8
    weights (`depthwise_conv_kernel`), or a GEMM with integer per-channel weights and a multiple of
    32 channels per group (`implicit_conv_kernel`). Others (a 3-channel stem, narrow groups)
    gather their windows in memory for the fused linear."""
    if plan.depthwise:
        return plan.weight.format == "int8"
    channels = plan.in_channels // plan.geometry.groups
    return plan.weight.format in _IMPLICIT_CONV_FORMATS and channels % _IMPLICIT_CONV_MIN_STEP == 0


def conv_gemm(x: torch.Tensor, plan, lowrank_t: Optional[torch.Tensor], fullrank_x: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], out_dtype: torch.dtype, requant_bits: int):
    """`ConvPlan.run` on the Triton convolution kernels (plans `supports_conv_gemm` accepts):
    dynamic scales from the window maxima (`conv.window_scales`), the activations read in place;
    static scales from the pixels' codes, quantized once. One launch per group."""
    batch, height, width, channels = x.shape
    out_h, out_w = plan.geometry.output_size(height, width)
    rows = batch * out_h * out_w
    if plan.input_scale is None:
        source, scale = x, window_scales(x, plan.geometry, plan.act_bits)
    else:
        source, scale = plan.pixel_codes(x, "triton"), plan.input_scale
    residual_rows = None if residual is None else residual.reshape(rows, plan.out_channels)
    groups = 1 if plan.depthwise else plan.geometry.groups
    step = channels // groups
    parts = []
    for g, weight in enumerate(plan.gemm_weights()):
        a = source if groups == 1 else source[..., g * step:(g + 1) * step]
        operands = plan.group_operands(g, a, scale, weight, lowrank_t, fullrank_x, residual_rows, out_dtype,
                                       requant_bits)
        multiplier = plan.out_channels // channels if plan.depthwise else 0
        out, out_scale = conv_kernels(operands, plan.geometry, plan.act_bits, plan.padding_code(), multiplier)
        if groups == 1:
            shape = (batch, out_h, out_w, plan.out_channels)
            return (out.reshape(shape), out_scale) if requant_bits else out.reshape(shape)
        parts.append(out)
    return plan.joined_groups(parts, (batch, out_h, out_w), out_dtype, requant_bits)


# The depthwise kernel's tile: pixels × channels, each value one int32 multiply-add per tap.
_DEPTHWISE_TILE = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)


def conv_kernels(operands: FusedLinearOperands, geometry, act_bits: int, pad_code: int, multiplier: int = 0
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One group's convolution: `operands.a` is the input [N, H, W, C_g] (a channel slice of
    channels-last memory: int8 codes for static scales, else the fp activations, quantized in the
    K loop at `a_scale`'s per-pixel scales); the other operands as the fused linear's, M = N·Ho·Wo.
    `multiplier` > 0: a depthwise convolution with that many output channels per input channel."""
    x = operands.a
    device = x.device
    target = target_of(device)
    batch, height, width, channels = x.shape
    out_h, out_w = geometry.output_size(height, width)
    rows, n = batch * out_h * out_w, operands.weight.shape[0]
    out = torch.empty((rows, n), dtype=torch.float32 if operands.requant_bits else operands.out_dtype, device=device)
    row_absmax = torch.zeros((rows,), dtype=torch.int32, device=device) if operands.requant_bits else out
    if not (rows and n):
        return _finished(out, row_absmax, operands.requant_bits)
    lowrank_rank = 0 if operands.lowrank_t is None else operands.lowrank_t.shape[1]
    fullrank_k = 0 if operands.fullrank_x is None else operands.fullrank_x.shape[1]
    lowrank_fp32 = operands.lowrank_t is not None and operands.lowrank_t.dtype == torch.float32
    fullrank_fp32 = operands.fullrank_x is not None and operands.fullrank_x.dtype == torch.float32
    present = lambda tensor: x if tensor is None else tensor  # noqa: E731  (a pointer the kernel ignores)
    row_stride = lambda tensor: 0 if tensor is None else tensor.stride(0)  # noqa: E731
    (kernel_h, kernel_w), (stride_h, stride_w) = geometry.kernel, geometry.stride
    (pad_h, pad_w), (dilation_h, dilation_w) = geometry.padding, geometry.dilation
    quantize_in_loop = x.dtype != torch.int8
    flags = dict(
        QUANTIZE_IN_LOOP=quantize_in_loop, QMAX=qrange(act_bits)[1] if quantize_in_loop else 0,  # unread for codes
        A_SCALE_PER_ROW=operands.a_scale.numel() == rows and quantize_in_loop,
        HAS_ZERO=operands.a_zero_point is not None,
        HAS_LOWRANK=operands.lowrank_t is not None, HAS_FULLRANK=operands.fullrank_x is not None,
        LOWRANK_FP32=lowrank_fp32, FULLRANK_FP32=fullrank_fp32, HAS_BIAS=operands.bias is not None,
        ACTIVATION=ACTIVATIONS.index(operands.activation), HAS_RESIDUAL=operands.residual is not None,
        REQUANT=bool(operands.requant_bits), RESIDUAL_FIRST=operands.residual_before_activation,
        BLOCK_R=_block_r(max(lowrank_rank, fullrank_k), lowrank_fp32 or fullrank_fp32),
    )
    arguments = (
        x, operands.a_scale, present(operands.a_zero_point), operands.weight, operands.weight_scale,
        present(operands.weight_colsum), present(operands.lowrank_t), present(operands.lowrank_u),
        present(operands.fullrank_x), present(operands.fullrank_w), present(operands.bias),
        present(operands.residual), out, row_absmax,
        rows, n, lowrank_rank, fullrank_k, channels, height, width, out_h, out_w, pad_code,
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        x.stride(2), operands.weight.stride(0), row_stride(operands.lowrank_t), row_stride(operands.lowrank_u),
        row_stride(operands.fullrank_x), row_stride(operands.fullrank_w), row_stride(operands.residual),
        out.stride(0),
    )
    if multiplier:
        grid = (triton.cdiv(rows, _DEPTHWISE_TILE["BLOCK_M"]), triton.cdiv(n, _DEPTHWISE_TILE["BLOCK_N"]))
        run_kernel(depthwise_conv_kernel, grid, device, arguments, MULTIPLIER=multiplier, enable_fp_fusion=False,
                   **flags, **_DEPTHWISE_TILE)
        return _finished(out, row_absmax, operands.requant_bits)
    flags["WEIGHT_FORMAT"] = _WEIGHT_FORMAT_CODES[operands.weight_format]

    def launch(config):
        options = config.launch_options()
        widest = _IN_LOOP_QUANTIZED_BLOCK_K[target.capability[0] >= 9] if quantize_in_loop else config.block_k
        options["BLOCK_K"] = min(config.block_k, widest, _largest_power_of_two_dividing(channels))
        if operands.requant_bits:
            row_absmax.zero_()
        tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(n, config.block_n)
        run_kernel(implicit_conv_kernel, (tiles,), device, arguments, enable_fp_fusion=False, **flags, **options)

    dtypes = tuple(_dtype_name(t) for t in (x, operands.lowrank_t, operands.fullrank_x, operands.bias,
                                             operands.residual)) + (str(operands.out_dtype),)
    key = ("conv", m_bucket(rows), n, channels, geometry.kernel, geometry.stride, tuple(sorted(flags.items())), dtypes)
    candidates = conv_candidates(target, lowrank_fp32 or fullrank_fp32, n, quantize_in_loop)
    _gemm_tuner.run(key, target, candidates, launch)
    return _finished(out, row_absmax, operands.requant_bits)


# The pre-kernel's T dot holds a [BLOCK_K, BLOCK_R] tile of A (and the [BLOCK_M, BLOCK_K]
# activations) as operands: at most this many values of A per chunk (64 registers a thread at 4
# warps in fp16; a rank-128 fp32 A at BLOCK_K 256 needed ~297 KB of shared memory with 3 stages),
# half of it for an fp32 A, whose tf32x3 dot holds three products' operands (ptxas -v). The
# [BLOCK_M, BLOCK_R] fp32 T accumulator grows with the rank too: at BLOCK_R 128 four warps hit
# sm_90's 128 registers a thread and spilled (fp16 A, BLOCK_K 64), so 128-wide T gets 8 warps.
_PREOP_DOWN_TILE_VALUES = 8192
_PREOP_WIDE_T = 128


def preop_blocks(target: Target, features: int, rank: int, fp32_down: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_R, num_warps) of the activation pre-kernel for K = `features`, T of
    `rank` columns; 128-wide K chunks at most (256 spilled in the LayerNorm passes)."""
    block_r = max(16, triton.next_power_of_2(max(rank, 1)))
    widest = 64 if target.interpreter else 128
    down_values = _PREOP_DOWN_TILE_VALUES // (2 if fp32_down else 1)
    block_k = min(widest, triton.next_power_of_2(features), down_values // block_r)
    return 16, block_k, block_r, 8 if block_r >= _PREOP_WIDE_T else 4


def _preop_outputs(x, rank: int, float_output: bool, t_out) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q: codes, or rows in x.dtype with `float_output`; scale [M]; T [M, rank], or `t_out`)."""
    rows, k = x.shape
    q = torch.empty((rows, k), dtype=x.dtype if float_output else torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    t = torch.empty((rows, rank), dtype=x.dtype, device=x.device) if t_out is None else t_out
    return q, scale, t


def quantize_activation(
    x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj, t_out=None,
    float_output=False, down_from_input=False, normed_out=None, rotate=False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`t_out`, when given, receives T in place (it may be a column slice of a wider buffer).
    `float_output`: return the normalized activations in x.dtype instead of int8 codes (bits unused).
    `down_from_input`: T = x·A from the raw input instead of norm(x)·A. `normed_out` (contiguous
    [M, K]) receives the normalized activations beside the codes. `rotate`: the codes of
    norm(x)·R, on the rotating pre-kernel."""
    if rotate:
        return rotate_quantize(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                               down_proj, t_out, down_from_input, normed_out)
    rows, k = x.shape
    rank = 0 if down_proj is None else down_proj.shape[1]
    q, scale, t = _preop_outputs(x, rank, float_output, t_out)
    if rows and k:
        qmin, qmax = qrange(bits)
        block_m, block_k, block_r, warps = preop_blocks(target_of(x.device), k, rank,
                                                 down_proj is not None and down_proj.dtype == torch.float32)
        dummy = x
        # The pre-kernel streams x (three or four passes from L2); one stage keeps its shared memory
        # small for any A, and many resident programs hide the load latency instead.
        run_kernel(quantize_activation_kernel, (triton.cdiv(rows, block_m),), x.device, (
            x, q, scale, static_scale if static_scale is not None else dummy,
            zero_point if zero_point is not None else dummy,
            norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
            down_proj if down_proj is not None else dummy, t, normed_out if normed_out is not None else dummy,
            rows, k, rank, float(norm_eps),
            x.stride(0), q.stride(0), down_proj.stride(0) if down_proj is not None else 0, t.stride(0),
        ), QMIN=qmin, QMAX=qmax, NORM=NORM_KINDS.index(norm_kind), HAS_NORM_WEIGHT=norm_weight is not None,
            HAS_NORM_BIAS=norm_bias is not None, STATIC=static_scale is not None, HAS_ZERO=zero_point is not None,
            CENTER=zero_point is not None and bits <= 7, HAS_T=down_proj is not None,
            T_FP32=down_proj is not None and down_proj.dtype == torch.float32, T_FROM_INPUT=down_from_input,
            FLOAT_OUTPUT=float_output, NORMED_OUTPUT=normed_out is not None,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps, num_stages=1, enable_fp_fusion=False)
    return q, scale, t


def rotation_of(k: int):
    """The rotating pre-kernel's row tile for K = k (`rotation_tile`), or None where it does not run."""
    return rotation_tile(k, kernel_factors(k)[1].shape[0])


@functools.lru_cache(maxsize=None)
def _rotation_operands(k: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(D/√K [K], the ±1 mixing matrix [C, C]: H_m, or H_m ⊗ H_2 where the tile merges a factor 2)
    on `device`: constants of the width, made once."""
    signs, paley, _ = kernel_factors(k)
    mixing = rotation_of(k)[0]
    if mixing > paley.shape[0]:
        paley = torch.kron(paley, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    return signs.to(device), paley.contiguous().to(device)


# The rotating kernel's warps by its row tile: 512 values a warp, 4 to 8 warps (16 spilled on
# sm_80, whose ptxas then kept 64 registers a thread; ptxas -v), and 8 with a 64-wide factor,
# whose generated ±1 matrix takes 32 registers a thread at 4 warps ([16, 64] with a static scale
# and zero point spilled 4 B there on sm_90).
_ROTATION_TILE_PER_WARP = 512
_WIDE_FACTOR = 64


def rotate_quantize(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
                    t_out=None, down_from_input=False, normed_out=None, float_output=False):
    """quantize_activation's launch for rotate=True (x [M, K] with `rotation_of(K)`): codes of
    norm(x)·R, T and `normed_out` of the unrotated values; `float_output`: norm(x)·R in x.dtype."""
    rows, k = x.shape
    rank = 0 if down_proj is None else down_proj.shape[1]
    q, scale, t = _preop_outputs(x, rank, float_output, t_out)
    if rows and k:
        _, c_pad, (f0, f1, f2) = rotation_of(k)
        signs, mixing = _rotation_operands(k, x.device)
        qmin, qmax = qrange(bits)
        _, block_k, block_r, t_warps = preop_blocks(target_of(x.device), k, rank,
                                                    down_proj is not None and down_proj.dtype == torch.float32)
        dummy = x
        arguments = (
            x, q, scale, static_scale if static_scale is not None else dummy,
            zero_point if zero_point is not None else dummy,
            norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
            down_proj if down_proj is not None else dummy, t, normed_out if normed_out is not None else dummy,
            signs, mixing,
            rows, k, rank, mixing.shape[0], float(norm_eps),
            x.stride(0), q.stride(0), down_proj.stride(0) if down_proj is not None else 0, t.stride(0),
        )
        flags = dict(QMIN=qmin, QMAX=qmax, NORM=NORM_KINDS.index(norm_kind), HAS_NORM_WEIGHT=norm_weight is not None,
                     HAS_NORM_BIAS=norm_bias is not None, STATIC=static_scale is not None,
                     HAS_ZERO=zero_point is not None, CENTER=zero_point is not None and bits <= 7,
                     T_FP32=down_proj is not None and down_proj.dtype == torch.float32, T_FROM_INPUT=down_from_input,
                     FLOAT_OUTPUT=float_output, C_PAD=c_pad, F0=f0, F1=f1, F2=f2, BLOCK_K=block_k,
                     BLOCK_R=block_r, num_stages=1, enable_fp_fusion=False)
        if down_proj is not None or normed_out is not None:  # T and the normalized rows: 16 rows a program
            run_kernel(rotate_quantize_kernel, (triton.cdiv(rows, 16),), x.device, arguments,
                       HAS_T=down_proj is not None, NORMED_OUTPUT=normed_out is not None, ROTATED_ROWS=False,
                       BLOCK_M=16, num_warps=t_warps, **flags)
        tile_warps = min(8, max(4, triton.next_power_of_2(c_pad * f0 * f1 * f2 // _ROTATION_TILE_PER_WARP)))
        if max(f0, f1, f2) >= _WIDE_FACTOR:
            tile_warps = 8
        run_kernel(rotate_quantize_kernel, (rows,), x.device, arguments, HAS_T=False, NORMED_OUTPUT=False,
                   ROTATED_ROWS=True, BLOCK_M=1, num_warps=tile_warps, **flags)
    return q, scale, t


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """ops.hadamard_rotate on the rotating pre-kernel (x validated, `rotation_of` its width)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    rotated, _, _ = rotate_quantize(rows, 8, None, None, "none", None, None, 0.0, None, float_output=True)
    return rotated.reshape(x.shape)


def normalize_activation(x, norm_kind, norm_weight, norm_bias, norm_eps, down_proj) -> Tuple[torch.Tensor, torch.Tensor]:
    normed, _, t = quantize_activation(x, 8, None, None, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
                                       float_output=True)
    return normed, t


def normalize_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                                  down_proj, down_from_input=False, rotate=False):
    normed = torch.empty_like(x, memory_format=torch.contiguous_format)
    q, scale, t = quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                                      down_proj, down_from_input=down_from_input, normed_out=normed, rotate=rotate)
    return normed, q, scale, t


def supports_quantize_activation(down_proj: Optional[torch.Tensor]) -> bool:
    return down_proj is None or down_proj.shape[1] <= MAX_PREOP_RANK


def dwsep_tile(target: Target, rank: int) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_C, BLOCK_R, num_warps) of the DW-separable down kernel. 64 tokens make the
    down dot wgmma-eligible on sm_90; wider channel slices spill with the nine neighbour tiles live
    (ptxas -v, checked by the AOT test), and so does a 32-wide slice at rank 128."""
    block_r = max(16, triton.next_power_of_2(rank))
    if target.interpreter:
        return 16, 32, block_r, 4
    return 64, 32 if block_r <= 64 else 16, block_r, 8


def dwsep_down(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias) -> torch.Tensor:
    """The Triton launch of ops.dwsep_down for calls without a token mask (`supports_dwsep_down`)."""
    batch, tokens, dim = h.shape
    rank = down_weight.shape[0]
    t = torch.empty((batch * tokens, rank), dtype=h.dtype, device=h.device)
    if t.numel():
        down = down_weight.t().to(h.dtype).contiguous()  # [D, r]
        if dw_weight.shape[1] == 3:  # a 1-D conv's taps on a 1 × W grid: the middle row of 3 × 3
            dw_weight = torch.nn.functional.pad(dw_weight, (3, 3))
        block_t, block_c, block_r, warps = dwsep_tile(target_of(h.device), rank)
        run_kernel(dwsep_down_kernel, (triton.cdiv(tokens, block_t), batch), h.device, (
            h, dw_weight, dw_bias if dw_bias is not None else h, down, down_bias if down_bias is not None else h, t,
            tokens, dim, rank, height, width, prefix_tokens,
            h.stride(0), h.stride(1), down.stride(0), t.stride(0),
        ), HAS_DW_BIAS=dw_bias is not None, HAS_DOWN_BIAS=down_bias is not None, FP32=h.dtype == torch.float32,
            BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps, num_stages=1, enable_fp_fusion=True)
    return t


def supports_dwsep_down(down_weight: torch.Tensor, token_mask: Optional[torch.Tensor]) -> bool:
    """Up to the pre-kernels' rank, without a token mask (the kernel does not read one yet: a
    padded batch of sequences runs on the reference)."""
    return down_weight.shape[0] <= MAX_PREOP_RANK and token_mask is None


def attention_tile(target: Target, head_dim: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, warps) of the quantized attention kernel: 64 queries per program
    (wgmma's M on sm_90) against 64 keys per step, the head dimension padded to a power of two of at
    least 32 (int8 dots reduce over ≥ 32), 8 warps (with 4, sm_80 spilled at head_dim 64 and the
    masked sm_90 launch took all 255 registers: ptxas -v). Before Hopper ptxas holds these launches
    to 128 registers, and with a mask they spilled (ptxas -v, the AOT check): with 64 keys per step
    at head_dim 32 and with 64 queries at head_dim 64, hence 32 keys per step, and 32 queries on 4
    warps at head_dim 64; at head_dim 128 with 32 queries on 4 or 8 warps and 16 on 4, not with 64
    on 8; at head_dim 256 with 64 on 8 and 32 on 4, not with 32 on 8. Small tiles in the
    interpreter."""
    block_d = max(32, triton.next_power_of_2(head_dim))
    if target.interpreter:
        return 16, 32, block_d, 4
    if target.capability[0] >= 9:
        return 64, 64 if block_d <= 128 else 32, block_d, 8
    if block_d == 64:
        return 32, 32, block_d, 4
    return 64 if block_d <= 128 else 32, 32, block_d, 8


def quantized_attention(query, key, value, bits, scales, zeros, scaling, mask, tokenwise_log2=False) -> torch.Tensor:
    """The attention core on static quantizers (`scales`, `zeros`), or with `tokenwise_log2` the
    `paper` preset's (scales and zeros None)."""
    batch, heads, q_tokens, head_dim = query.shape
    k_tokens = key.shape[2]
    out = torch.empty_like(query)
    if out.numel() == 0:
        return out
    low, high = qrange(bits)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        mask = mask.expand(batch, heads, q_tokens, k_tokens)  # stride 0 along broadcast dimensions
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    block_m, block_n, block_d, warps = attention_tile(target_of(query.device), head_dim)
    mask_strides = (0, 0, 0, 0) if mask is None else mask.stride()
    unused = scales if scales is not None else query  # stands in for pointers a launch does not read
    run_kernel(quantized_attention_kernel, (triton.cdiv(q_tokens, block_m), batch * heads), query.device, (
        query, key, value, out, unused, zeros if zeros is not None else unused, mask if mask is not None else unused,
        q_tokens, k_tokens, heads, head_dim, float(scaling),
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3], *mask_strides,
    ), LOW=float(low), HIGH=float(high), HAS_ZEROS=zeros is not None, HAS_MASK=mask is not None,
        TOKENWISE_LOG2=tokenwise_log2, LOG2_LARGEST=(1 << bits) - 1 if tokenwise_log2 else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=1,
        # the reference scales S and then adds the mask: no contraction into one rounding
        enable_fp_fusion=False)
    return out
