"""The fused linear's operands as one schema: the order every backend's custom op takes them in.

`fused_linear_operands` fills a `FusedLinearOperands` from a QuantizedWeight and keyword segments
(`ops.fused_linear` from its public arguments, a frozen `LinearPlan` from its own); the registry
hands it to each implementation's `supports` and `run`, which read fields by name or pass it on
flat (`*operands`) to a custom op. The custom ops' schema is inferred from these fields
(`fused_linear_custom_op`), and their bodies (reference, Triton launch, checks) take the tuple.
"""

from __future__ import annotations

import inspect
import typing
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..formats.weights import QuantizedWeight


class FusedLinearOperands(NamedTuple):
    a: Tensor
    a_scale: Optional[Tensor]
    a_zero_point: Optional[Tensor]
    weight: Tensor
    weight_format: str
    weight_scale: Tensor
    weight_group_scale: Optional[Tensor]
    weight_zero: Optional[Tensor]
    group_size: int
    weight_colsum: Optional[Tensor]
    lowrank_t: Optional[Tensor]
    lowrank_u: Optional[Tensor]
    fullrank_x: Optional[Tensor]
    fullrank_w: Optional[Tensor]
    bias: Optional[Tensor]
    activation: str
    residual: Optional[Tensor]
    out_dtype: torch.dtype
    requant_bits: int
    gather_rows: Optional[Tensor]
    scatter_rows: Optional[Tensor]
    out_rows: int
    weight_panels: Optional[Tensor] = None  # the CPU kernels' packed weight (QuantizedWeight.panels)
    residual_before_activation: bool = False  # act(y + residual) instead of act(y) + residual
    requant_rotate: bool = False  # rotate each output row (y·R) before re-quantizing it
    lowrank_u_panels: Optional[Tensor] = None  # the CPU kernels' U by panel (LinearPlan.lowrank_u_panels)


def gemm_zero_point(zero_point: Optional[torch.Tensor], bits: int) -> Optional[torch.Tensor]:
    """The zero point fused_linear takes after quantize_activation: at <= 7 bits the codes already
    hold q − z (None), at 8 bits the GEMM subtracts z·colsum(W_q)."""
    return zero_point if (zero_point is not None and bits == 8) else None


def fused_linear_operands(a: Tensor, a_scale: Optional[Tensor], weight: QuantizedWeight, *,
                          a_zero_point: Optional[Tensor] = None, lowrank_t: Optional[Tensor] = None,
                          lowrank_u: Optional[Tensor] = None, fullrank_x: Optional[Tensor] = None,
                          fullrank_w: Optional[Tensor] = None, bias: Optional[Tensor] = None, activation: str = "none",
                          residual: Optional[Tensor] = None, out_dtype: torch.dtype = torch.float16,
                          requant_bits: int = 0, gather_rows: Optional[Tensor] = None,
                          scatter_rows: Optional[Tensor] = None, out_rows: Optional[int] = None,
                          residual_before_activation: bool = False, requant_rotate: bool = False,
                          lowrank_u_panels: Optional[Tensor] = None) -> FusedLinearOperands:
    """The schema filled from a QuantizedWeight and keyword segments (row maps as index tensors;
    `out_rows` defaults to the GEMM's rows): the one place a caller's arguments become operands."""
    if out_rows is None:
        out_rows = a.shape[0] if gather_rows is None else gather_rows.shape[0]
    return FusedLinearOperands(
        a, a_scale, a_zero_point, weight.data, weight.format, weight.scale, weight.group_scale, weight.zero,
        weight.k_group, weight.colsum, lowrank_t, lowrank_u, fullrank_x, fullrank_w, bias, activation, residual,
        out_dtype, requant_bits, gather_rows, scatter_rows, out_rows, weight.panels, residual_before_activation,
        requant_rotate, lowrank_u_panels)


def _signature() -> inspect.Signature:
    """The custom ops' Python signature, from which torch.library infers their schema."""
    defaults = FusedLinearOperands._field_defaults
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                                    default=defaults.get(name, inspect.Parameter.empty))
                  for name, annotation in typing.get_type_hints(FusedLinearOperands).items()]
    return inspect.Signature(parameters, return_annotation=Tuple[Tensor, Tensor])


def refuse_backward(op) -> None:
    """Backward through the integer op `op` (a custom op, not mutating) is a ValueError that says
    what to do: the integer backends compute no gradient, `simulate` is their differentiable twin."""
    def backward(ctx, *grads):
        raise ValueError(f"{op._qualname} has no gradient (integer kernels): train and calibrate under "
                         "qk.use_backend('simulate'), the differentiable form of the same numerics")

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


def fused_linear_custom_op(name: str, body: Callable[[FusedLinearOperands], Tuple[Tensor, Tensor]],
                           fake: Callable[[FusedLinearOperands], Tuple[Tensor, Tensor]]):
    """Registers `body` as the custom op `name` taking the operands flat, in the schema's order
    (and `fake` as its fake): the one place where the operands become op arguments."""
    def flat(*args):
        return body(FusedLinearOperands(*args))

    flat.__signature__ = _signature()
    op = torch.library.custom_op(name, mutates_args=())(flat)
    op.register_fake(lambda *args: fake(FusedLinearOperands(*args)))
    refuse_backward(op)
    return op
