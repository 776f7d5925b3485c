"""Host-side validation shared by every backend: each problem is a ValueError naming the argument.

Values are never inspected (that would cost a host sync on the GPU): NaN/Inf propagate.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..formats.weights import INTEGER_FORMATS, PANEL_COLUMNS, check_weight, panels_shape, weight_in_features
from ..quant.hadamard import check_rotatable
from ..quant.primitives import qrange
from .operands import FusedLinearOperands
from .reference import ACTIVATIONS, GATED_ACTIVATIONS, NORM_KINDS, output_features
from .row_maps import RowMap

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    tensor: Optional[torch.Tensor],
    *,
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    shape: Optional[Sequence[Optional[int]]] = None,
    contiguous: bool = True,
) -> None:
    """dtype, device, shape (None entries match anything) and contiguity of one argument."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the input's device)")
    if shape is not None:
        if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def check_scale_rows(name: str, tensor: Optional[torch.Tensor], rows: int) -> None:
    """Per-token ([M]) or per-tensor ([1]) parameters."""
    if tensor is not None and tensor.shape not in ((rows,), (1,)):
        raise ValueError(f"{name} must have shape ({rows},) or (1,), got {tuple(tensor.shape)}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_bits(name: str, bits) -> None:
    try:
        qrange(bits)
    except ValueError:
        raise ValueError(f"{name} must be an int in [2, 8], got {bits!r}") from None


def check_pair(first: str, a, second: str, b) -> None:
    if (a is None) != (b is None):
        raise ValueError(f"{first} and {second} must be given together")


def check_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
                              t_out=None):
    check_tensor("x", x, device=x.device, dtypes=FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    rows, features = x.shape
    if features == 0:
        raise ValueError("x has no features (shape [tokens, 0]): there is nothing to quantize")
    check_bits("bits", bits)
    check_tensor("static_scale", static_scale, device=x.device, dtypes=(torch.float32,), shape=(1,))
    check_tensor("zero_point", zero_point, device=x.device, dtypes=(torch.int8,), shape=(1,))
    if zero_point is not None and static_scale is None:
        raise ValueError("zero_point requires static_scale (asymmetric activations are calibrated, static)")
    check_choice("norm_kind", norm_kind, NORM_KINDS)
    for name, param in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_tensor(name, param, device=x.device, dtypes=FLOAT_DTYPES, shape=(features,))
        if param is not None and norm_kind == "none":
            raise ValueError(f"{name} was given but norm_kind is 'none'")
    if norm_bias is not None and norm_kind == "rmsnorm":
        raise ValueError("norm_bias must be None for norm_kind='rmsnorm'")
    if not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise ValueError(f"norm_eps must be a positive float, got {norm_eps!r}")
    check_tensor("down_proj", down_proj, device=x.device, dtypes=FLOAT_DTYPES, shape=(features, None))
    if t_out is not None:
        if down_proj is None:
            raise ValueError("t_out needs down_proj (T = norm(x)·down_proj is what it receives)")
        check_tensor("t_out", t_out, device=x.device, dtypes=(x.dtype,), shape=(rows, down_proj.shape[1]),
                     contiguous=False)
        if down_proj.shape[1] and t_out.stride(1) != 1:
            raise ValueError("t_out's columns must be contiguous (a column slice of a row-major buffer)")


def check_row_map(name: str, row_map, rows: int, what: str) -> None:
    """A RowMap (or None) that indexes `rows` rows (`what` says whose)."""
    if row_map is None:
        return
    if not isinstance(row_map, RowMap):
        raise ValueError(f"{name} must be a RowMap (check it once with RowMap.build(indices, rows)), "
                         f"got {type(row_map).__name__}")
    if row_map.rows != rows:
        raise ValueError(f"{name} indexes {row_map.rows} rows, but {what} {rows}")


def _check_segment(operands: FusedLinearOperands, rows_name: str, columns_name: str, rows: int,
                   out_features: int) -> None:
    """An extra GEMM segment: left [rows, width] (T or X_c) and right [out_features, width] (U or
    W_c), both given or both None, in one float dtype."""
    left, right = getattr(operands, rows_name), getattr(operands, columns_name)
    check_pair(rows_name, left, columns_name, right)
    check_tensor(rows_name, left, device=operands.a.device, dtypes=FLOAT_DTYPES, shape=(rows, None))
    width = None if left is None else left.shape[1]
    check_tensor(columns_name, right, device=operands.a.device, dtypes=FLOAT_DTYPES, shape=(out_features, width))
    if left is not None and left.dtype != right.dtype:
        raise ValueError(f"{rows_name} ({left.dtype}) and {columns_name} ({right.dtype}) must share a dtype")


def check_fused_linear(operands: FusedLinearOperands) -> None:
    if not isinstance(operands.a, torch.Tensor) or operands.a.dim() != 2:
        raise ValueError(f"a must be a 2-D tensor [tokens, in_features], got {getattr(operands.a, 'shape', type(operands.a))}")
    device = operands.a.device
    check_choice("weight_format", operands.weight_format, ("int8", "int4", "int4_int8_groups", "uint4_asym_groups"))
    integer = operands.weight_format in INTEGER_FORMATS
    check_tensor("a", operands.a, device=device, dtypes=(torch.int8,) if integer else FLOAT_DTYPES)
    for name, tensor in (("weight", operands.weight), ("weight_scale", operands.weight_scale),
                         ("weight_group_scale", operands.weight_group_scale), ("weight_zero", operands.weight_zero)):
        check_tensor(name, tensor, device=device, dtypes=(tensor.dtype,) if tensor is not None else ())
    check_weight(operands.weight_format, operands.weight, operands.weight_scale, operands.weight_group_scale,
                 operands.weight_zero, operands.group_size)
    a_rows = operands.a.shape[0]
    check_tensor("gather_rows", operands.gather_rows, device=device, dtypes=(torch.int32,), shape=(None,))
    gemm_rows = a_rows if operands.gather_rows is None else operands.gather_rows.shape[0]
    check_tensor("scatter_rows", operands.scatter_rows, device=device, dtypes=(torch.int32,), shape=(gemm_rows,))
    if isinstance(operands.out_rows, bool) or not isinstance(operands.out_rows, int) or operands.out_rows < 0:
        raise ValueError(f"out_rows must be a non-negative int, got {operands.out_rows!r}")
    if operands.scatter_rows is None and operands.out_rows != gemm_rows:
        raise ValueError(f"out_rows={operands.out_rows} must equal the GEMM's {gemm_rows} rows without scatter_rows")
    rows = operands.out_rows
    out_features = operands.weight.shape[0]
    in_features = weight_in_features(operands.weight_format, operands.weight)
    if operands.a.shape[1] != in_features:
        raise ValueError(f"a has {operands.a.shape[1]} features but the weight expects in_features={in_features}")
    if integer:
        if operands.a_scale is None:
            raise ValueError("a_scale is required for int8 activations")
        check_tensor("a_scale", operands.a_scale, device=device, dtypes=(torch.float32,))
        check_scale_rows("a_scale", operands.a_scale, a_rows)
    elif operands.a_scale is not None or operands.a_zero_point is not None:
        raise ValueError("a_scale and a_zero_point must be None for floating-point activations (W4A16)")
    check_tensor("a_zero_point", operands.a_zero_point, device=device, dtypes=(torch.int8,))
    check_scale_rows("a_zero_point", operands.a_zero_point, a_rows)
    if operands.a_zero_point is not None and operands.weight_colsum is None:
        raise ValueError("weight_colsum is required with a_zero_point (the −z·colsum(W_q) epilogue term)")
    check_tensor("weight_colsum", operands.weight_colsum, device=device, dtypes=(torch.int32,), shape=(out_features,))
    check_tensor("weight_panels", operands.weight_panels, device=device, dtypes=(torch.int8,),
                 shape=panels_shape(out_features, in_features))

    for rows_name, columns_name in (("lowrank_t", "lowrank_u"), ("fullrank_x", "fullrank_w")):
        _check_segment(operands, rows_name, columns_name, rows, out_features)
    if operands.lowrank_u_panels is not None:
        if operands.lowrank_u is None:
            raise ValueError("lowrank_u_panels needs lowrank_u (they are its panels)")
        check_tensor("lowrank_u_panels", operands.lowrank_u_panels, device=device, dtypes=(torch.float32,),
                     shape=(-(-out_features // PANEL_COLUMNS), operands.lowrank_u.shape[1], PANEL_COLUMNS))
    check_tensor("bias", operands.bias, device=device, dtypes=FLOAT_DTYPES, shape=(out_features,))
    check_choice("activation", operands.activation, ACTIVATIONS)
    if operands.activation in GATED_ACTIVATIONS and out_features % 2:
        raise ValueError(f"activation={operands.activation!r} needs an even out_features (gate rows, then up rows), "
                         f"got {out_features}")
    check_tensor("residual", operands.residual, device=device, dtypes=FLOAT_DTYPES,
                 shape=(rows, output_features(out_features, operands.activation)))
    if not isinstance(operands.residual_before_activation, bool):
        raise ValueError(f"residual_before_activation must be a bool, got {operands.residual_before_activation!r}")
    if operands.residual_before_activation:
        if operands.residual is None:
            raise ValueError("residual_before_activation needs a residual")
        if operands.activation in GATED_ACTIVATIONS:
            raise ValueError(f"residual_before_activation does not combine with the gated activation "
                             f"{operands.activation!r} (its output is half the GEMM's width)")
    check_choice("out_dtype", operands.out_dtype, FLOAT_DTYPES)
    if operands.requant_bits != 0:
        check_bits("requant_bits", operands.requant_bits)
    check_rotation("requant_rotate", operands.requant_rotate, output_features(out_features, operands.activation),
                   "the output's width")
    if operands.requant_rotate and not operands.requant_bits:
        raise ValueError("requant_rotate rotates the output before its re-quantization: it needs requant_bits")


def check_rotation(name: str, rotate, features: int, what: str = "x.shape[1]") -> None:
    """`rotate` a bool, and when True, `features` a width the Hadamard rotation covers."""
    if not isinstance(rotate, bool):
        raise ValueError(f"{name} must be a bool, got {rotate!r}")
    if rotate:
        check_rotatable(features, what)


def check_dwsep_down(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias, token_mask=None):
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise ValueError(f"h must be a 3-D tensor [batch, tokens, dim], got {getattr(h, 'shape', type(h))}")
    check_tensor("h", h, device=h.device, dtypes=FLOAT_DTYPES)
    batch, tokens, dim = h.shape
    for name, value in (("height", height), ("width", width), ("prefix_tokens", prefix_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "prefix_tokens" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'prefix_tokens' else 'positive'} int, "
                             f"got {value!r}")
    if tokens != prefix_tokens + height * width:
        raise ValueError(f"h has {tokens} tokens, expected prefix_tokens + height·width = "
                         f"{prefix_tokens} + {height}·{width}")
    if isinstance(dw_weight, torch.Tensor) and dw_weight.dim() == 2 and dw_weight.shape[1] == 3:
        if height != 1:  # a 1-D conv's taps: the sequence is a 1 × L grid
            raise ValueError(f"dw_weight of shape [dim, 3] (a 1-D conv's taps) needs height 1, got height {height}")
        check_tensor("dw_weight", dw_weight, device=h.device, dtypes=FLOAT_DTYPES, shape=(dim, 3), contiguous=False)
    else:  # (the op makes the taps contiguous)
        check_tensor("dw_weight", dw_weight, device=h.device, dtypes=FLOAT_DTYPES, shape=(dim, 9), contiguous=False)
    check_tensor("dw_bias", dw_bias, device=h.device, dtypes=FLOAT_DTYPES, shape=(dim,))
    check_tensor("down_weight", down_weight, device=h.device, dtypes=FLOAT_DTYPES, shape=(None, dim))
    rank = down_weight.shape[0]
    check_tensor("down_bias", down_bias, device=h.device, dtypes=FLOAT_DTYPES, shape=(rank,))
    check_tensor("token_mask", token_mask, device=h.device, dtypes=(*FLOAT_DTYPES, torch.bool, torch.int64, torch.int32),
                 shape=(batch, height * width), contiguous=False)
