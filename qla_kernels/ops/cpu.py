"""The `cpu` backend: the x86-64 kernels of `qla_kernels._cpu` (csrc/cpu/) as custom ops.

Covers, on CPU tensors:
- `fused_linear` for the integer weight formats (W8A8, W4A8, W4A4; int4 unpacked at packing) with
  its whole contract: zero point, low-rank T·Uᵀ (in the epilogue up to rank 16, else like X_c·W_cᵀ),
  full-rank X_c·W_cᵀ (its product from torch's sgemm, added in the epilogue), bias, every activation, residual, per-token re-quantization and
  row maps; K up to 65,535 (the exact int32 bound of u8 × s8 sums);
- `quantize_activation` without a norm (dynamic per token, or static with a zero point), bit for
  bit the reference's;
- `normalize_quantize_activation` / `normalize_activation` (LayerNorm / RMSNorm, then the codes
  from the fp32 normalized values): the norm's sums in another order than torch's (ulps), the
  quantization of them exact;
- in all three the down-projection T = norm(x)·A or x·A (LoRA, QwT): up to rank 16 (fp32 A) in
  the kernel, each chunk of rows projected as it is normalized or read (fused multiply-adds: within
  a bound of the reference); wider, by torch's sgemm as the reference forms it.
- `fused_linear` for W4A16 at M <= 16 (decode): the weight's nibbles read once for all rows.
- `attention_rows` in fp32: per head, kᵀ and v copied once into lanes, q read in place, the scores
  of 4 query rows at a time, softmax and P·v in fp32 (fused multiply-adds: within a bound of the
  reference, not bit for bit), the context written into the output projection's rows.
- `dwsep_down` (QLA's DW-separable down path, 3 × 3 on a grid or 3 taps along a sequence) in fp32:
  conv, GELU and down-projection per token in registers (fused multiply-adds: within a bound).
Other calls (W4A16 at more rows, where dequantizing for torch's sgemm is the right algorithm) run
on the reference.

Weights: the kernels read panels (csrc/cpu/kernels.h), packed once by `with_panels` when a plan is
frozen (`QuantizedWeight.panels`); a weight without them is packed per call. The instruction-set
path is the fastest this CPU has (AMX-INT8, AVX-512 VNNI, AVX-VNNI, AVX2), or QLA_CPU_ISA's; `isa()` names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from ..formats.weights import INTEGER_FORMATS, PANEL_COLUMNS, PANEL_QUAD, QuantizedWeight, panels_shape
from ..quant.hadamard import kernel_factors
from ..quant.primitives import absmax_scale
from . import reference
from .attention import AttentionQuantization, cpu_attention, simulated_log2_attention
from .device import built_reason, cpu_extension
from .dispatch import register, register_backend
from .library import (
    attention_fake,
    dwsep_down_fake,
    fused_linear_fake,
    normalize_activation_fake,
    normalize_quantize_activation_fake,
    quantize_activation_fake,
)
from .operands import FusedLinearOperands, fused_linear_custom_op, refuse_backward

MAX_IN_FEATURES = 65535  # (code + 128) · w summed over K stays below 2^31
ISA_VARIABLE = "QLA_CPU_ISA"
_ACTIVATION_CODES = {name: code for code, name in enumerate(reference.ACTIVATIONS)}
_forced = threading.local()


# Asked of the extension once, here: backend resolution reads them inside torch.compile'd code,
# which cannot trace into a pybind11 function.
_MODULE, _MISSING = cpu_extension()
_PATHS = tuple(_MODULE.supported_isas()) if _MODULE is not None else ()
_UNUSED_FEATURES = tuple(_MODULE.unused_features()) if _MODULE is not None else ()


def supported_isas() -> List[str]:
    """The instruction-set paths this CPU runs, fastest first (empty without `_cpu`)."""
    return list(_PATHS)


def _choose_isa() -> Tuple[Optional[str], Optional[str]]:
    """(path, None), or (None, why the backend cannot run here)."""
    if _MODULE is None:
        return None, _MISSING
    paths = supported_isas()
    wanted = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if wanted:
        if wanted not in paths:
            return None, f"{ISA_VARIABLE}={wanted!r} is not a path this CPU runs (it runs {paths})"
        return wanted, None
    if not paths:
        return None, "this CPU has no AVX2 + FMA (the CPU kernels need at least that)"
    return paths[0], None


# Chosen once, at import (torch.compile'd code reads it: plain data, nothing to trace).
_DEFAULT_ISA, _UNAVAILABLE = _choose_isa()


def isa() -> str:
    """The instruction-set path the kernels run on in this thread."""
    forced = getattr(_forced, "isa", None)
    if forced is not None:
        return forced
    if _DEFAULT_ISA is None:
        raise RuntimeError(_UNAVAILABLE)
    return _DEFAULT_ISA


@contextlib.contextmanager
def using_isa(name: str) -> Iterator[None]:
    """Runs the block's kernels on path `name` (one of `supported_isas()`; ValueError otherwise):
    for tests and benchmarks of each path on one machine."""
    if name not in supported_isas():
        raise ValueError(f"{name!r} is not a CPU path this machine runs; it runs {supported_isas()}")
    previous = getattr(_forced, "isa", None)
    _forced.isa = name
    try:
        yield
    finally:
        _forced.isa = previous


def describe() -> str:
    """The path and the CPU features it leaves unused, for `qk.backends()` and benchmark labels."""
    if not _UNUSED_FEATURES:
        return isa()
    why = built_reason("cpu_amx_reason") if "amx_int8" in _UNUSED_FEATURES else None
    return f"{isa()} (present, not used: {', '.join(_UNUSED_FEATURES)}{'; ' + why if why else ''})"


def cpu_name() -> str:
    """The CPU's model name (benchmark and demo labels)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _status() -> Optional[str]:
    return _UNAVAILABLE


def pack_panels(weight: Tensor) -> Tensor:
    """The kernels' layout of an integer weight int8 [N, K] (csrc/cpu/kernels.h): int8
    [ceil(N/16), ceil(K/4) + 2, 16, 4], quads of k per column, then each panel's column sums and max |W|.
    The specification of `_cpu.pack_panels`, which packs (one pass, threaded; 20x faster at 14336 x 4096)."""
    columns, depth = weight.shape
    panels, quads = -(-columns // PANEL_COLUMNS), -(-depth // PANEL_QUAD)
    padded = torch.zeros((panels * PANEL_COLUMNS, quads * PANEL_QUAD), dtype=torch.int8, device=weight.device)
    padded[:columns, :depth] = weight
    body = padded.reshape(panels, PANEL_COLUMNS, quads, PANEL_QUAD).permute(0, 2, 1, 3)
    colsum = padded.sum(dim=1, dtype=torch.int32).reshape(panels, PANEL_COLUMNS)
    max_abs = torch.zeros((panels, PANEL_COLUMNS), dtype=torch.int32, device=weight.device)
    max_abs[:, 0] = padded.to(torch.int32).abs().reshape(panels, -1).amax(dim=1) if padded.numel() else 0
    header = torch.stack([colsum, max_abs], dim=1).view(torch.int8).reshape(panels, 2, PANEL_COLUMNS, PANEL_QUAD)
    return torch.cat([body, header], dim=1).contiguous()


def weight_panels(operands_weight: QuantizedWeight) -> Tensor:
    """Panels of a QuantizedWeight's integer matrix (|q4·g| <= 119 fits int8 for every integer format),
    packed by `_cpu` (a calibration-form weight is packed per call: the packing's speed is its cost)."""
    weight = operands_weight
    matrix = weight.data if weight.format == "int8" else weight.integer().to(torch.int8)
    matrix = matrix.contiguous()
    columns, depth = matrix.shape
    panels = torch.empty(panels_shape(columns, depth), dtype=torch.int8)
    _MODULE.pack_panels(matrix.data_ptr(), columns, depth, panels.data_ptr())
    return panels


def with_panels(weight: QuantizedWeight) -> QuantizedWeight:
    """`weight` with its kernel panels when the `cpu` backend can run it (a CPU weight of an integer
    format, the backend available), else unchanged: what a frozen plan holds."""
    if (weight.data.device.type != "cpu" or weight.format not in INTEGER_FORMATS or _status() is not None
            or weight.in_features > MAX_IN_FEATURES):
        return weight
    return dataclasses.replace(weight, panels=weight_panels(weight))


# T·Uᵀ runs in the epilogue up to this rank; above it torch's sgemm forms it (reusing U across rows)
# and the epilogue adds it as it adds X_c·W_cᵀ. Measured on AMX, 2 threads, r = 8 / 16 / 32 / 64:
# 1152x1536->384 +0.08 / 0.16 / 0.30 / 0.63 ms in the epilogue, +0.08 / 0.09 / 0.14 / 0.22 by sgemm;
# 2048x768->3072 +1.4 / 2.2 / 4.0 / 11.0 against +2.2 / 2.4 / 2.8 / 6.2.
EPILOGUE_MAX_RANK = 16

DECODE_MAX_ROWS = 16  # W4A16: the rows one read of the weight serves (decode); more rows run on the reference


def supports_fused_linear(operands: FusedLinearOperands) -> bool:
    if operands.a.device.type != "cpu":
        return False
    if operands.weight_format == "uint4_asym_groups":
        return (1 <= operands.a.shape[0] <= DECODE_MAX_ROWS and operands.a.shape[1] % 16 == 0
                and operands.group_size % 16 == 0 and operands.gather_rows is None and operands.scatter_rows is None)
    return operands.weight_format in INTEGER_FORMATS and operands.a.shape[1] <= MAX_IN_FEATURES


# The dtype W4A16 rounds its dequantized weights to: the activations' (csrc/cpu/isa_common.h).
_WEIGHT_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _w4a16_decode(operands: FusedLinearOperands) -> Tuple[Tensor, Tensor]:
    """W4A16 at M <= 16: x·Wᵀ from the stored nibbles on the kernel (every weight byte read once;
    weights rounded to the activation dtype, as the reference does; fp32 sums), then the epilogue as
    the reference computes it (M·N values: no GEMM left in it)."""
    a = operands.a.float()
    rows, depth = a.shape
    group = operands.group_size
    a = a.contiguous()
    weight, scale, zero = operands.weight.contiguous(), operands.weight_scale.contiguous(), operands.weight_zero
    zero = zero.contiguous()
    y = torch.empty((rows, weight.shape[0]), dtype=torch.float32)
    _MODULE.w4a16_rows(isa(), a.data_ptr(), rows, depth, weight.data_ptr(),
                       scale.data_ptr(), zero.data_ptr(), group, _WEIGHT_ROUNDING[operands.a.dtype], weight.shape[0],
                       y.data_ptr())
    y = reference.epilogue(y, operands.lowrank_t, operands.lowrank_u, operands.fullrank_x, operands.fullrank_w,
                           operands.bias, operands.activation, operands.residual, operands.residual_before_activation)
    if operands.requant_bits:
        return reference.quantize_output(hadamard_rotate(y) if operands.requant_rotate else y, operands.requant_bits)
    return y.to(operands.out_dtype), y.new_empty((0,))


def _fp32_contiguous(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return None if tensor is None else tensor.float().contiguous()


def _fp32_rows(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """fp32 with unit column stride (rows may keep their stride)."""
    if tensor is None:
        return None
    tensor = tensor.float()
    return tensor if tensor.shape[-1] <= 1 or tensor.stride(-1) == 1 else tensor.contiguous()


def _panels_of_rows(u: Tensor) -> Tensor:
    """U [N, r] as the kernel reads it: [ceil(N/16), r, 16] fp32, each panel's 16 columns per rank
    index contiguous, zero beyond N."""
    columns, rank = u.shape
    padded = torch.nn.functional.pad(u.float(), (0, 0, 0, -(-columns // PANEL_COLUMNS) * PANEL_COLUMNS - columns))
    return padded.reshape(-1, PANEL_COLUMNS, rank).transpose(1, 2).contiguous()


def lowrank_panels(u: Optional[Tensor]) -> Optional[Tensor]:
    """U [N, r] in the panels the epilogue reads (`_panels_of_rows`) when the `cpu` backend runs
    its T·Uᵀ (a CPU U of rank <= EPILOGUE_MAX_RANK, the backend available), else None: what a
    frozen plan holds, so that no call packs it again."""
    if u is None or u.device.type != "cpu" or u.shape[1] > EPILOGUE_MAX_RANK or _status() is not None:
        return None
    return _panels_of_rows(u)


def _address(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def fused_linear(operands: FusedLinearOperands) -> Tuple[Tensor, Tensor]:
    """ops.fused_linear on the CPU kernels (a call `supports_fused_linear` accepted, validated)."""
    if operands.weight_format == "uint4_asym_groups":
        return _w4a16_decode(operands)
    a = operands.a.contiguous()
    columns = operands.weight.shape[0]
    gather, scatter = operands.gather_rows, operands.scatter_rows
    rows = a.shape[0] if gather is None else gather.shape[0]
    out_rows = operands.out_rows
    a_scale = operands.a_scale.float().expand(a.shape[0]) if operands.a_scale.numel() == 1 else operands.a_scale
    zero = operands.a_zero_point
    if gather is not None:  # the reference's padding rows: scale 0, zero point 0 per row
        valid = (gather >= 0) & (gather < a.shape[0])
        index = torch.where(valid, gather, 0).long()
        a_scale = torch.where(valid, a_scale[index], 0.0)
        if zero is not None and zero.numel() > 1:
            zero = torch.where(valid, zero[index], 0)
    a_scale = a_scale.float().contiguous()
    zero = None if zero is None else zero.to(torch.int32).contiguous()
    panels = operands.weight_panels
    if panels is None:
        panels = weight_panels(QuantizedWeight(operands.weight, operands.weight_format, operands.weight_scale,
                                               operands.weight_group_scale, operands.weight_zero, operands.group_size))
    lowrank_t = _fp32_rows(operands.lowrank_t)
    rank = 0 if lowrank_t is None else lowrank_t.shape[1]
    addend = None
    if operands.fullrank_x is not None:
        addend = operands.fullrank_x.float() @ operands.fullrank_w.float().t()
    if rank > EPILOGUE_MAX_RANK:  # T·Uᵀ by torch's sgemm, added where the epilogue adds X_c·W_cᵀ
        product = lowrank_t @ operands.lowrank_u.float().t()
        addend = product if addend is None else addend + product
        rank = 0
    lowrank_u_panels = None
    if rank:
        lowrank_u_panels = (operands.lowrank_u_panels if operands.lowrank_u_panels is not None
                            else _panels_of_rows(operands.lowrank_u))
    residual = _fp32_rows(operands.residual)
    bias = _fp32_rows(operands.bias)  # held here: the kernel reads it after this line's temporaries are gone
    width = reference.output_features(columns, operands.activation)
    bits = operands.requant_bits
    fill = torch.zeros if scatter is not None else torch.empty
    if bits:
        out = None
        out_q = fill((out_rows, width), dtype=torch.int8)
        out_scale = (absmax_scale(torch.zeros(out_rows), bits) if scatter is not None
                     else torch.empty(out_rows, dtype=torch.float32))
    else:
        out = fill((out_rows, width), dtype=torch.float32)
        out_q = out_scale = None
    scatter64 = None if scatter is None else scatter.to(torch.int64)
    gather64 = None if gather is None else gather.to(torch.int64)
    factors = kernel_factors(width) if operands.requant_rotate else None
    _MODULE.fused_linear(
        isa(), _address(a), a.shape[1], a.shape[0], _address(gather64), rows, a.shape[1], _address(panels), columns,
        _address(zero), zero is not None and zero.numel() > 1, _address(a_scale), _address(operands.weight_scale),
        _address(lowrank_t if rank else None), lowrank_t.stride(0) if rank else 0, rank, _address(lowrank_u_panels),
        _address(addend), 0 if addend is None else addend.stride(0), _address(bias),
        _ACTIVATION_CODES[operands.activation], _address(residual), 0 if residual is None else residual.stride(0),
        _address(scatter64), out_rows, _address(out), width, _address(out_q), _address(out_scale), bits,
        _rotation_arguments(factors), operands.residual_before_activation)
    if bits:
        return out_q, out_scale
    return out.to(operands.out_dtype), out.new_empty((0,))


def _zero_point_arguments(zero_point: Optional[Tensor], bits: int) -> Tuple[int, bool, bool]:
    """(z, has_zero, subtract_zero) as the quantizer kernels take them: at <= 7 bits the codes hold
    q − z (quantize_activation's contract)."""
    if zero_point is None:
        return 0, False, False
    return int(zero_point.item()), True, bits <= 7


_NORM_CODES = {"layernorm": 1, "rmsnorm": 2}


def supports_quantize_activation(x: Tensor, static_scale, zero_point, norm_kind: str, down_proj) -> bool:
    return x.device.type == "cpu" and (norm_kind == "none" or norm_kind in _NORM_CODES)


class _Projection:
    """A pre-op's T = rows·A: on the kernel, beside the rows it normalized or read, for an fp32 A of
    rank up to EPILOGUE_MAX_RANK (sums in the kernel's order: within a bound of the reference's);
    else by torch's sgemm as the reference forms it (a wider A is a GEMM, which sgemm blocks better)."""

    def __init__(self, x: Tensor, down_proj: Optional[Tensor]):
        self.down_proj = down_proj
        self.in_kernel = (down_proj is not None and down_proj.dtype == torch.float32
                          and down_proj.shape[1] <= EPILOGUE_MAX_RANK)
        self.a_t = down_proj.t().contiguous() if self.in_kernel else None
        self.t = torch.empty((x.shape[0], down_proj.shape[1]), dtype=torch.float32) if self.in_kernel else None

    def arguments(self) -> Tuple[int, int, int]:
        """(Aᵀ, rank, T) for the kernel: zeros when T is not formed there."""
        return (self.a_t.data_ptr(), self.a_t.shape[0], self.t.data_ptr()) if self.in_kernel else (0, 0, 0)

    def result(self, x: Tensor, rows: Tensor, down_from_input: bool) -> Tensor:
        """T in x.dtype; `rows` the fp32 rows the kernel normalized (or read)."""
        if self.down_proj is None:
            return x.new_empty((x.shape[0], 0))
        if self.in_kernel:
            return self.t.to(x.dtype)
        return reference.down_projection(x.float() if down_from_input else rows, self.down_proj, x.dtype)


def quantize_activation(x: Tensor, bits: int, static_scale: Optional[Tensor], zero_point: Optional[Tensor],
                        norm_kind: str, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], norm_eps: float,
                        down_proj: Optional[Tensor], down_from_input: bool = False,
                        rotate: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """ops.quantize_activation on the CPU kernels (T = norm(x)·A or x·A, `_Projection`; with
    `rotate`, each row rotated in a row buffer before it is quantized)."""
    if norm_kind != "none":
        normed, q, scale, t = _normalize(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias,
                                         norm_eps, down_proj, down_from_input, rotate)
        return q, scale, t
    rows = x.float().contiguous()
    q = torch.empty(rows.shape, dtype=torch.int8)
    scale = torch.empty(rows.shape[0], dtype=torch.float32)
    static = _fp32_contiguous(static_scale)
    projection = _Projection(x, down_proj)
    factors = kernel_factors(rows.shape[1]) if rotate else None
    _MODULE.quantize_rows(isa(), rows.data_ptr(), rows.shape[1], rows.shape[0], rows.shape[1], bits,
                          _address(static), *_zero_point_arguments(zero_point, bits), _rotation_arguments(factors),
                          q.data_ptr(), scale.data_ptr(), *projection.arguments())
    return q, scale, projection.result(x, rows, down_from_input)


def supports_normalize(x: Tensor, norm_kind: str, down_proj) -> bool:
    return x.device.type == "cpu" and norm_kind in _NORM_CODES


def _normalize(x: Tensor, bits: int, static_scale, zero_point, norm_kind: str, norm_weight, norm_bias,
               norm_eps: float, down_proj: Optional[Tensor] = None, down_from_input: bool = False,
               rotate: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(norm(x) fp32, q, scale, T) on the kernel: q and scale empty at bits 0 (with `rotate`, of
    the rotated norm), T (`_Projection`) empty without down_proj."""
    rows = x.float().contiguous()
    weight, bias, static = (_fp32_contiguous(t) for t in (norm_weight, norm_bias, static_scale))
    normed = torch.empty_like(rows)
    q = torch.empty(rows.shape if bits else (0,), dtype=torch.int8)
    scale = torch.empty(rows.shape[0] if bits else 0, dtype=torch.float32)
    projection = _Projection(x, down_proj)
    factors = kernel_factors(rows.shape[1]) if rotate else None
    _MODULE.normalize_rows(isa(), rows.data_ptr(), rows.shape[0], rows.shape[1], _NORM_CODES[norm_kind],
                           _address(weight), _address(bias), float(norm_eps), normed.data_ptr(), bits,
                           _address(static), *_zero_point_arguments(zero_point, bits), _rotation_arguments(factors),
                           _address(q if bits else None), _address(scale if bits else None),
                           *projection.arguments(), down_from_input)
    return normed, q, scale, projection.result(x, normed, down_from_input)


def normalize_quantize_activation(x: Tensor, bits: int, static_scale: Optional[Tensor], zero_point: Optional[Tensor],
                                  norm_kind: str, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                                  norm_eps: float, down_proj: Optional[Tensor], down_from_input: bool = False,
                                  rotate: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """ops.normalize_quantize_activation: the codes from the fp32 norm (rotated with `rotate`),
    T = norm(x)·A (or x·A), `_Projection`."""
    normed, q, scale, t = _normalize(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                                     down_proj, down_from_input, rotate)
    return normed.to(x.dtype), q, scale, t


def normalize_activation(x: Tensor, norm_kind: str, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                         norm_eps: float, down_proj: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """ops.normalize_activation (T = norm(x)·A, `_Projection`)."""
    normed, _, _, t = _normalize(x, 0, None, None, norm_kind, norm_weight, norm_bias, norm_eps, down_proj)
    return normed.to(x.dtype), t


@torch.library.custom_op("qla::normalize_quantize_activation_cpu", mutates_args=())
def normalize_quantize_activation_op(x: Tensor, bits: int, static_scale: Optional[Tensor],
                                     zero_point: Optional[Tensor], norm_kind: str, norm_weight: Optional[Tensor],
                                     norm_bias: Optional[Tensor], norm_eps: float, down_proj: Optional[Tensor],
                                     down_from_input: bool = False,
                                     rotate: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return normalize_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias,
                                         norm_eps, down_proj, down_from_input, rotate)


@torch.library.custom_op("qla::normalize_activation_cpu", mutates_args=())
def normalize_activation_op(x: Tensor, norm_kind: str, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                            norm_eps: float, down_proj: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return normalize_activation(x, norm_kind, norm_weight, norm_bias, norm_eps, down_proj)


@torch.library.custom_op("qla::quantize_activation_cpu", mutates_args=())
def quantize_activation_op(x: Tensor, bits: int, static_scale: Optional[Tensor], zero_point: Optional[Tensor],
                           norm_kind: str, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                           norm_eps: float, down_proj: Optional[Tensor], down_from_input: bool = False,
                           rotate: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    return quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps,
                               down_proj, down_from_input, rotate)


quantize_activation_op.register_fake(quantize_activation_fake)
normalize_quantize_activation_op.register_fake(normalize_quantize_activation_fake)
normalize_activation_op.register_fake(normalize_activation_fake)
for _op in (quantize_activation_op, normalize_quantize_activation_op, normalize_activation_op):
    refuse_backward(_op)
fused_linear_custom_op("qla::fused_linear_cpu", fused_linear, fused_linear_fake)


def supports_attention_rows(query: Tensor, key: Tensor, value: Tensor, tokens: int, heads: int, scale, mask) -> bool:
    return query.device.type == "cpu" and query.dtype == torch.float32


def _unit_columns(rows: Tensor) -> Tensor:
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def attention_rows(query: Tensor, key: Tensor, value: Tensor, tokens: int, heads: int, scale: Optional[float],
                   mask: Optional[Tensor]) -> Tensor:
    """ops.attention_rows on the kernel (fp32 rows, validated): q, k and v read where they are."""
    rows, width = query.shape
    sequences, head_dim = rows // tokens, width // heads
    query, key, value = (_unit_columns(t) for t in (query, key, value))
    mask_strides = (0, 0, 0)
    if mask is not None:  # additive fp32, broadcast by strides (a broadcast key axis made real)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
        mask = mask.float().expand(sequences, heads, tokens, tokens)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_strides = mask.stride()[:3]
    out = torch.empty((rows, width), dtype=torch.float32)
    _MODULE.attention_rows(isa(), query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0), value.data_ptr(),
                           value.stride(0), sequences, tokens, heads, head_dim,
                           1.0 / math.sqrt(head_dim) if scale is None else float(scale), _address(mask),
                           *mask_strides, out.data_ptr(), width)
    return out


@torch.library.custom_op("qla::attention_rows_cpu", mutates_args=())
def attention_rows_op(query: Tensor, key: Tensor, value: Tensor, tokens: int, heads: int, scale: Optional[float],
                      mask: Optional[Tensor]) -> Tensor:
    return attention_rows(query, key, value, tokens, heads, scale, mask)


attention_rows_op.register_fake(attention_fake)
refuse_backward(attention_rows_op)


@torch.library.custom_op("qla::quantized_attention_cpu", mutates_args=())
def quantized_attention_op(query: Tensor, key: Tensor, value: Tensor, bits: int, scales: Tensor,
                           zeros: Optional[Tensor], scaling: float, mask: Optional[Tensor]) -> Tensor:
    """The attention core's integer products as fp32 GEMMs (exact: ops/attention.py cpu_attention)."""
    return cpu_attention(query, key, value, AttentionQuantization(bits, scales, zeros), scaling, mask)


quantized_attention_op.register_fake(attention_fake)
refuse_backward(quantized_attention_op)


@torch.library.custom_op("qla::log2_attention_cpu", mutates_args=())
def log2_attention_op(query: Tensor, key: Tensor, value: Tensor, bits: int, scaling: float,
                      mask: Optional[Tensor]) -> Tensor:
    """The `paper` preset's core as fp32 GEMMs (ops/attention.py simulated_log2_attention)."""
    with torch.no_grad():
        return simulated_log2_attention(query, key, value, bits, scaling, mask)


log2_attention_op.register_fake(attention_fake)
refuse_backward(log2_attention_op)
def supports_dwsep_down(h: Tensor, height: int, width: int, prefix_tokens: int, dw_weight: Tensor, dw_bias,
                        down_weight: Tensor, down_bias, token_mask) -> bool:
    return h.device.type == "cpu" and h.dtype == torch.float32


def dwsep_down(h: Tensor, height: int, width: int, prefix_tokens: int, dw_weight: Tensor, dw_bias: Optional[Tensor],
               down_weight: Tensor, down_bias: Optional[Tensor], token_mask: Optional[Tensor]) -> Tensor:
    """ops.dwsep_down on the kernel (fp32 h, validated): the conv, GELU and down-projection per
    token in registers, h read where it is (rows of any stride)."""
    batch, tokens, dim = h.shape
    rows = h.reshape(batch * tokens, dim)  # a view where h's rows are evenly spaced
    if dim > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    weights = [_fp32_contiguous(w) for w in (dw_weight, dw_bias, down_weight, down_bias, token_mask)]
    rank = down_weight.shape[0]
    out = torch.empty((batch * tokens, rank), dtype=torch.float32)
    if out.numel():
        _MODULE.dwsep_rows(isa(), rows.data_ptr(), rows.stride(0), batch * tokens, tokens, prefix_tokens, height,
                           width, dim, weights[0].data_ptr(), weights[0].shape[1], _address(weights[1]),
                           weights[2].data_ptr(), _address(weights[3]), _address(weights[4]), rank, out.data_ptr())
    return out


@torch.library.custom_op("qla::dwsep_down_cpu", mutates_args=())
def dwsep_down_op(h: Tensor, height: int, width: int, prefix_tokens: int, dw_weight: Tensor, dw_bias: Optional[Tensor],
                  down_weight: Tensor, down_bias: Optional[Tensor], token_mask: Optional[Tensor]) -> Tensor:
    return dwsep_down(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias, token_mask)


dwsep_down_op.register_fake(dwsep_down_fake)
refuse_backward(dwsep_down_op)


def _rotation_arguments(factors: Optional[Tuple[Tensor, Tensor, int]]) -> Optional[Tuple[int, int, int, int]]:
    """The kernels' rotation (None, or signs, dense, m, P) from `kernel_factors(k)`, which the
    caller holds while the kernel runs."""
    if factors is None:
        return None
    signs, dense, chunk = factors
    return signs.data_ptr(), dense.data_ptr(), dense.shape[0], chunk


def supports_hadamard_rotate(x: Tensor) -> bool:
    return x.device.type == "cpu"


def hadamard_rotate(x: Tensor) -> Tensor:
    """ops.hadamard_rotate on the kernel (x validated): per row in fp32, the signs, a fast
    Walsh-Hadamard transform of each power-of-two chunk, then the Paley factor across chunks
    (quant/hadamard.kernel_factors), while the row is in cache."""
    k = x.shape[-1]
    factors = kernel_factors(k)
    rows = _fp32_rows(x.reshape(-1, k))
    out = torch.empty(rows.shape, dtype=torch.float32)
    if out.numel():
        _MODULE.rotate_rows(isa(), rows.data_ptr(), rows.stride(0), rows.shape[0], k, _rotation_arguments(factors),
                            out.data_ptr())
    return out.reshape(x.shape).to(x.dtype)


@torch.library.custom_op("qla::hadamard_rotate_cpu", mutates_args=())
def hadamard_rotate_op(x: Tensor) -> Tensor:
    return hadamard_rotate(x)


@hadamard_rotate_op.register_fake
def _(x):
    return torch.empty_like(x)


refuse_backward(hadamard_rotate_op)

register_backend("cpu", _status, lambda: f"path {describe()}")
register("fused_linear", "cpu", lambda operands: torch.ops.qla.fused_linear_cpu(*operands), supports_fused_linear,
         body=fused_linear)
register("quantize_activation", "cpu", torch.ops.qla.quantize_activation_cpu,
         lambda x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj, *_:
         supports_quantize_activation(x, static_scale, zero_point, norm_kind, down_proj),
         body=quantize_activation)
register("normalize_quantize_activation", "cpu", torch.ops.qla.normalize_quantize_activation_cpu,
         lambda x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj, *_:
         supports_normalize(x, norm_kind, down_proj), body=normalize_quantize_activation)
register("attention_rows", "cpu", torch.ops.qla.attention_rows_cpu, supports_attention_rows, body=attention_rows)
register("quantized_attention", "cpu", torch.ops.qla.quantized_attention_cpu)
register("dwsep_down", "cpu", torch.ops.qla.dwsep_down_cpu, supports_dwsep_down, body=dwsep_down)
register("hadamard_rotate", "cpu", torch.ops.qla.hadamard_rotate_cpu, supports_hadamard_rotate, body=hadamard_rotate)
register("log2_attention", "cpu", torch.ops.qla.log2_attention_cpu)
register("normalize_activation", "cpu", torch.ops.qla.normalize_activation_cpu,
         lambda x, norm_kind, norm_weight, norm_bias, norm_eps, down_proj: supports_normalize(x, norm_kind, down_proj),
         body=normalize_activation)
