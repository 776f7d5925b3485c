"""Host wrappers: allocate outputs, pick a configuration, launch. Arguments arrive validated by
`qla_kernels.ops.checks` (the custom ops are reached only through `qla_kernels.ops`)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ...formats.weights import weight_in_features
from ...quant.primitives import qrange
from ..dispatch import sm_count
from ..reference import ACTIVATIONS, NORM_KINDS, output_features
from .dwsep import dwsep_down_kernel
from .fused_linear import fused_linear_kernel, requantize_rows_kernel
from .quantize import quantize_activation_kernel
from .tuning import Autotuner, gemm_candidates, interpreting, m_bucket

_WEIGHT_FORMAT_CODES = {"int8": 0, "int4": 1, "int4_int8_groups": 2, "uint4_asym_groups": 3}
_GROUPED_FORMATS = ("int4_int8_groups", "uint4_asym_groups")
TRITON_WEIGHT_FORMATS = tuple(_WEIGHT_FORMAT_CODES)
MAX_PREOP_RANK = 128
_gemm_tuner = Autotuner("qla fused_linear")


def _block_r(width: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(width, 1))))


def _largest_power_of_two_dividing(value: int) -> int:
    return value & -value


# Split K when fewer tiles than this many per SM exist (W4A16 at small M), keeping >= 4 K steps each.
_SPLIT_K_TILES_PER_SM = 2
_SPLIT_K_MIN_STEPS = 4


def split_k_plan(tiles: int, k: int, block_k: int, device: torch.device) -> Tuple[int, int]:
    """(splits, K per split) for the W4A16 GEMM: enough programs for `_SPLIT_K_TILES_PER_SM` per SM.
    K per split is a multiple of BLOCK_K (so group scales stay per tile) and every split is non-empty."""
    steps = triton.cdiv(k, block_k)
    wanted = triton.cdiv(_SPLIT_K_TILES_PER_SM * sm_count(device), tiles)
    splits = max(1, min(wanted, steps // _SPLIT_K_MIN_STEPS))
    if splits == 1:
        return 1, k
    k_per_split = triton.cdiv(steps, splits) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def fused_linear(
    a, a_scale, a_zero_point, weight, weight_format, weight_scale, weight_group_scale, weight_zero,
    group_size, weight_colsum, lowrank_t, lowrank_u, fullrank_x, fullrank_w, bias, activation,
    residual, out_dtype, requant_bits, gather_rows, scatter_rows, out_rows,
) -> Tuple[torch.Tensor, torch.Tensor]:
    device = a.device
    gemm_rows = a.shape[0] if gather_rows is None else gather_rows.shape[0]
    n = weight.shape[0]
    k = weight_in_features(weight_format, weight)
    n_out = output_features(n, activation)
    make = torch.zeros if scatter_rows is not None else torch.empty
    out = make((out_rows, n_out), dtype=torch.float32 if requant_bits else out_dtype, device=device)
    row_absmax = torch.zeros((out_rows,), dtype=torch.int32, device=device) if requant_bits else out
    if gemm_rows and n:
        dummy = a
        lowrank_rank = 0 if lowrank_t is None else lowrank_t.shape[1]
        fullrank_k = 0 if fullrank_x is None else fullrank_x.shape[1]
        block_r = _block_r(max(lowrank_rank, fullrank_k))
        flags = dict(
            WEIGHT_FORMAT=_WEIGHT_FORMAT_CODES[weight_format],
            A_SCALE_PER_ROW=a_scale is not None and a_scale.numel() == a.shape[0],
            HAS_ZERO=a_zero_point is not None,
            ZERO_PER_ROW=a_zero_point is not None and a_zero_point.numel() == a.shape[0],
            HAS_LOWRANK=lowrank_t is not None,
            HAS_FULLRANK=fullrank_x is not None,
            MAIN_IEEE=a.dtype == torch.float32,
            LOWRANK_IEEE=lowrank_t is not None and lowrank_t.dtype == torch.float32,
            FULLRANK_IEEE=fullrank_x is not None and fullrank_x.dtype == torch.float32,
            HAS_BIAS=bias is not None,
            ACTIVATION=ACTIVATIONS.index(activation),
            HAS_RESIDUAL=residual is not None,
            REQUANT=bool(requant_bits),
            GATHER=gather_rows is not None,
            SCATTER=scatter_rows is not None,
            BLOCK_R=block_r,
        )

        def launch(config):
            block_k = config.block_k
            if weight_format in _GROUPED_FORMATS:
                # int8 dots need K >= 32 per step, fp16 dots 16; narrower groups use per-element scales.
                smallest = 32 if weight_format == "int4_int8_groups" else 16
                block_k = min(block_k, max(smallest, _largest_power_of_two_dividing(group_size)))
            options = config.launch_options()
            options["BLOCK_K"] = block_k
            if requant_bits:
                row_absmax.zero_()
            tiles = triton.cdiv(gemm_rows, config.block_m) * triton.cdiv(n, config.block_n)
            splits, k_per_split = (split_k_plan(tiles, k, block_k, device)
                                   if weight_format == "uint4_asym_groups" else (1, k))
            partial = a.new_empty((splits, gemm_rows, n), dtype=torch.float32) if splits > 1 else dummy
            phases = ((1, (tiles, splits)), (2, (tiles,))) if splits > 1 else ((0, (tiles,)),)
            for phase, grid in phases:
                launch_phase(options, phase, grid, splits, k_per_split, partial, block_k)

        def launch_phase(options, phase, grid, splits, k_per_split, partial, block_k):
            fused_linear_kernel[grid](
                a, a_scale if a_scale is not None else dummy, a_zero_point if a_zero_point is not None else dummy,
                weight, weight_scale,
                weight_group_scale if weight_group_scale is not None else weight_zero if weight_zero is not None else dummy,
                weight_colsum if weight_colsum is not None else dummy,
                lowrank_t if lowrank_t is not None else dummy, lowrank_u if lowrank_u is not None else dummy,
                fullrank_x if fullrank_x is not None else dummy, fullrank_w if fullrank_w is not None else dummy,
                bias if bias is not None else dummy, residual if residual is not None else dummy,
                out, row_absmax,
                gather_rows if gather_rows is not None else dummy, scatter_rows if scatter_rows is not None else dummy,
                partial,
                gemm_rows, n, k, lowrank_rank, fullrank_k, group_size, k_per_split,
                a.stride(0), weight.stride(0),
                weight_group_scale.stride(0) if weight_group_scale is not None else 0,
                lowrank_t.stride(0) if lowrank_t is not None else 0,
                lowrank_u.stride(0) if lowrank_u is not None else 0,
                fullrank_x.stride(0) if fullrank_x is not None else 0,
                fullrank_w.stride(0) if fullrank_w is not None else 0,
                residual.stride(0) if residual is not None else 0,
                out.stride(0),
                GROUP_SCALE_PER_TILE=weight_format in _GROUPED_FORMATS and group_size % block_k == 0,
                SPLIT_PHASE=phase, K_SPLITS=splits, **flags, **options,
            )

        key = (device.index, m_bucket(gemm_rows), n, k, tuple(sorted(flags.items())))
        launch(_gemm_tuner.select(key, gemm_candidates(device), launch))
    if not requant_bits:
        return out, out.new_empty((0,), dtype=torch.float32)
    q = torch.empty((out_rows, n_out), dtype=torch.int8, device=device)
    scale = torch.empty((out_rows,), dtype=torch.float32, device=device)
    if out_rows and n_out:
        block_m, block_n = 16, min(256, triton.next_power_of_2(n_out))
        requantize_rows_kernel[(triton.cdiv(out_rows, block_m),)](
            out, row_absmax, q, scale, out_rows, n_out, out.stride(0), q.stride(0),
            QMAX=qrange(requant_bits)[1], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
    return q, scale


def quantize_activation(
    x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj, t_out=None,
    float_output=False, down_from_input=False, normed_out=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`t_out`, when given, receives T in place (it may be a column slice of a wider buffer).
    `float_output`: return the normalized activations in x.dtype instead of int8 codes (bits unused).
    `down_from_input`: T = x·A from the raw input instead of norm(x)·A. `normed_out` (contiguous
    [M, K]) receives the normalized activations beside the codes."""
    rows, k = x.shape
    rank = 0 if down_proj is None else down_proj.shape[1]
    q = torch.empty((rows, k), dtype=x.dtype if float_output else torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    t = torch.empty((rows, rank), dtype=x.dtype, device=x.device) if t_out is None else t_out
    if rows and k:
        qmin, qmax = qrange(bits)
        block_m = 16
        block_k = min(64 if interpreting() else 256, triton.next_power_of_2(k))
        dummy = x
        quantize_activation_kernel[(triton.cdiv(rows, block_m),)](
            x, q, scale, static_scale if static_scale is not None else dummy,
            zero_point if zero_point is not None else dummy,
            norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
            down_proj if down_proj is not None else dummy, t, normed_out if normed_out is not None else dummy,
            rows, k, rank, float(norm_eps),
            x.stride(0), q.stride(0), down_proj.stride(0) if down_proj is not None else 0, t.stride(0),
            QMIN=qmin, QMAX=qmax, NORM=NORM_KINDS.index(norm_kind), HAS_NORM_WEIGHT=norm_weight is not None,
            HAS_NORM_BIAS=norm_bias is not None, STATIC=static_scale is not None, HAS_ZERO=zero_point is not None,
            CENTER=zero_point is not None and bits <= 7, HAS_T=down_proj is not None,
            T_IEEE=down_proj is not None and down_proj.dtype == torch.float32, T_FROM_INPUT=down_from_input,
            FLOAT_OUTPUT=float_output, NORMED_OUTPUT=normed_out is not None,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(max(rank, 1))), num_warps=4,
        )
    return q, scale, t


def normalize_activation(x, norm_kind, norm_weight, norm_bias, norm_eps, down_proj) -> Tuple[torch.Tensor, torch.Tensor]:
    normed, _, t = quantize_activation(x, 8, None, None, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
                                       float_output=True)
    return normed, t


def normalize_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                                  down_proj, down_from_input=False):
    normed = torch.empty_like(x, memory_format=torch.contiguous_format)
    q, scale, t = quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                                      down_proj, down_from_input=down_from_input, normed_out=normed)
    return normed, q, scale, t


def supports_quantize_activation(down_proj: Optional[torch.Tensor]) -> bool:
    return down_proj is None or down_proj.shape[1] <= MAX_PREOP_RANK


# (BLOCK_T, BLOCK_C, num_warps): 64 tokens make the down dot wgmma-eligible on sm_90; wider channel
# slices spill with the nine neighbour tiles live (ptxas -v, checked by the AOT test).
DWSEP_TILE = (64, 32, 8)
DWSEP_INTERPRETER_TILE = (16, 32, 4)


def dwsep_down(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias) -> torch.Tensor:
    batch, tokens, dim = h.shape
    rank = down_weight.shape[0]
    t = torch.empty((batch * tokens, rank), dtype=h.dtype, device=h.device)
    if t.numel():
        down = down_weight.t().to(h.dtype).contiguous()  # [D, r]
        block_t, block_c, warps = DWSEP_INTERPRETER_TILE if interpreting() else DWSEP_TILE
        dwsep_down_kernel[(triton.cdiv(tokens, block_t), batch)](
            h, dw_weight, dw_bias if dw_bias is not None else h, down, down_bias if down_bias is not None else h, t,
            tokens, dim, rank, height, width, prefix_tokens,
            h.stride(0), h.stride(1), down.stride(0), t.stride(0),
            HAS_DW_BIAS=dw_bias is not None, HAS_DOWN_BIAS=down_bias is not None, IEEE=h.dtype == torch.float32,
            BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=warps,
        )
    return t


def supports_dwsep_down(down_weight: torch.Tensor) -> bool:
    return down_weight.shape[0] <= MAX_PREOP_RANK
