"""The fused linear's operands as one schema: the order every backend's custom op takes them in.

`ops.fused_linear` builds a `FusedLinearOperands` from its public arguments once; the registry
hands it to each implementation's `supports` and `run`, which read fields by name or pass it on
flat (`*operands`) to a custom op.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

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
