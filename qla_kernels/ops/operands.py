"""The fused linear's operands as one schema: the order every backend's custom op takes them in.

`ops.fused_linear` builds a `FusedLinearOperands` from its public arguments once; the registry
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


def _signature() -> inspect.Signature:
    """The custom ops' Python signature, from which torch.library infers their schema."""
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
                  for name, annotation in typing.get_type_hints(FusedLinearOperands).items()]
    return inspect.Signature(parameters, return_annotation=Tuple[Tensor, Tensor])


def fused_linear_custom_op(name: str, body: Callable[[FusedLinearOperands], Tuple[Tensor, Tensor]],
                           fake: Callable[[FusedLinearOperands], Tuple[Tensor, Tensor]]):
    """Registers `body` as the custom op `name` taking the operands flat, in the schema's order
    (and `fake` as its fake): the one place where the operands become op arguments."""
    def flat(*args):
        return body(FusedLinearOperands(*args))

    flat.__signature__ = _signature()
    op = torch.library.custom_op(name, mutates_args=())(flat)
    op.register_fake(lambda *args: fake(FusedLinearOperands(*args)))
    return op
