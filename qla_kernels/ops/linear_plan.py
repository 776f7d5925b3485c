"""A quantized linear's frozen runtime plan: every operand that does not depend on the input,
validated once when it is built, so that a call validates only its input and resolves its
backend once.

The calibration form calls `quantized_linear` / `fused_linear` with operands it assembles per
call (they may change while methods calibrate). A converted model (`convert_for_runtime`) holds
one `LinearPlan` per GEMM instead: the weight as its kernel reads it with scales and gates
folded, the concatenated U of every low-rank correction, QwT's full-rank W_c and V, the static
activation scale and zero point. `run` is the per-call part: quantize the input, then the fused
GEMM with the per-call T, X_c and residual, on the same implementations (and so the same
numbers) as `quantized_linear`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..formats.weights import QuantizedWeight
from .checks import check_fused_linear, check_quantize_activation, check_rotation
from .cpu import lowrank_panels, with_panels
from .dispatch import implementation_for, resolve_backend
from .operands import FusedLinearOperands, fused_linear_operands, gemm_zero_point


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """The input-independent operands of one quantized linear (see the module docstring).

    `act_bits` None: W4A16 (the GEMM reads the activations). `lowrank_u` [N, r] pairs with the
    per-call T [M, r] of `run`; `fullrank_w` [N, K_c] with X_c. `dtype` is the dtype U and W_c
    are stored in (None without them), which T and X_c take. `rotate`: the stored weight is W·R,
    and the activations are quantized as x·R (rotated in the pre-kernel, or in the epilogue of
    the GEMM that re-quantizes for this one)."""

    weight: QuantizedWeight
    act_bits: Optional[int]
    input_scale: Optional[torch.Tensor] = None
    input_zero_point: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    lowrank_u: Optional[torch.Tensor] = None
    fullrank_w: Optional[torch.Tensor] = None
    rotate: bool = False
    # U in the CPU epilogue's panels, packed by `frozen` (None: the kernel packs U per call). A plan
    # replaced with another U packs its own (`QuantLinear.plan_with`).
    lowrank_u_panels: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        bound = self.lowrank_u if self.lowrank_u is not None else self.fullrank_w
        return None if bound is None else bound.dtype

    @property
    def in_features(self) -> int:
        return self.weight.in_features

    @property
    def out_features(self) -> int:
        return self.weight.data.shape[0]

    def frozen(self) -> "LinearPlan":
        """This plan validated (`check`), with its weight and U in the layouts its device's kernels
        read (the CPU panels, ops/cpu.py `with_panels`, `lowrank_panels`): what a converted model
        holds, built once."""
        self.check()
        return dataclasses.replace(self, weight=with_panels(self.weight),
                                   lowrank_u_panels=lowrank_panels(self.lowrank_u))

    def check(self) -> None:
        """ValueError naming the first operand that does not fit (run once, when built)."""
        device = self.weight.data.device
        dtype = self.dtype or torch.float32
        probe = torch.zeros((1, self.in_features), dtype=dtype, device=device)
        bits = self.act_bits or 8
        check_quantize_activation(probe, bits, self.input_scale, self.input_zero_point, "none", None, None, 1.0, None)
        check_rotation("rotate", self.rotate, self.in_features, "in_features")
        if self.rotate and self.act_bits is None:
            raise ValueError("rotate needs quantized activations (act_bits): W4A16 reads its input as it is")
        if self.lowrank_u is not None and self.fullrank_w is not None and self.lowrank_u.dtype != self.fullrank_w.dtype:
            raise ValueError(f"lowrank_u ({self.lowrank_u.dtype}) and fullrank_w ({self.fullrank_w.dtype}) must share "
                             "a dtype")
        a = probe if self.act_bits is None else probe.to(torch.int8)
        scale = None if self.act_bits is None else torch.ones(1, dtype=torch.float32, device=device)
        rank = lambda right: None if right is None else probe.new_zeros((1, right.shape[1]))  # noqa: E731
        check_fused_linear(self._operands(a, scale, rank(self.lowrank_u), rank(self.fullrank_w), None, dtype))

    def _operands(self, a, a_scale, lowrank_t, fullrank_x, residual, out_dtype) -> FusedLinearOperands:
        return fused_linear_operands(a, a_scale, self.weight,
                                     a_zero_point=gemm_zero_point(self.input_zero_point, self.act_bits or 8), lowrank_t=lowrank_t,
                                     lowrank_u=self.lowrank_u, fullrank_x=fullrank_x, fullrank_w=self.fullrank_w,
                                     bias=self.bias, residual=residual, out_dtype=out_dtype,
                                     lowrank_u_panels=self.lowrank_u_panels)

    def run(self, rows: torch.Tensor, lowrank_t: Optional[torch.Tensor] = None,
            fullrank_x: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Y [M, N] in rows.dtype for rows [M, K] (contiguous, on the plan's device: the caller
        checks its input once; unrotated: a rotating plan rotates them as it quantizes them);
        T [M, r] / X_c [M, K_c] in the plan's dtype and the residual
        [M, N] as the plan's U, W_c and shape say (built by the caller from the same rows). The
        output takes the dtype of rows."""
        backend = resolve_backend(rows.device)
        if backend == "simulate":
            raise ValueError("a converted (runtime) model does not run under the 'simulate' backend: calibrate and "
                             "train the model before convert_for_runtime")
        if self.act_bits is None:
            a, a_scale = rows, None
        else:
            args = (rows, self.act_bits, self.input_scale, self.input_zero_point, "none", None, None, 1.0, None, False,
                    self.rotate)
            a, a_scale, _ = implementation_for("quantize_activation", backend, *args).eager(rows)(*args)
        return self.run_quantized(a, a_scale, lowrank_t, fullrank_x, residual, rows.dtype, backend)

    def run_quantized(self, a: torch.Tensor, a_scale: torch.Tensor, lowrank_t: Optional[torch.Tensor] = None,
                      fullrank_x: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                      out_dtype: torch.dtype = torch.float32, backend: Optional[str] = None) -> torch.Tensor:
        """`run` from activations its caller quantized: codes `a` int8 [M, K] with their fp32
        per-token `a_scale` [M] (a tensor-parallel shard of K quantized with the whole row's
        scale: integrations/vllm.py)."""
        backend = backend or resolve_backend(a.device)
        operands = self._operands(a, a_scale, lowrank_t, fullrank_x, residual, out_dtype)
        return implementation_for("fused_linear", backend, operands).eager(a)(operands)[0]

    def fused(self, a: torch.Tensor, a_scale: Optional[torch.Tensor], a_zero_point: Optional[torch.Tensor], *,
              out_dtype: torch.dtype, lowrank_t: Optional[torch.Tensor] = None,
              fullrank_x: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
              activation: str = "none", requant_bits: int = 0, gather_rows=None, scatter_rows=None,
              out_rows: Optional[int] = None, residual_before_activation: bool = False,
              requant_rotate: bool = False):
        """ops.fused_linear of this plan (codes `a`, their scale and GEMM zero point; or W4A16
        activations) with a fused chain's epilogue, without the op's per-call validation: the plan
        was checked when frozen, and a chain builds a, T, X_c, the residual and the row maps
        (`RowMap`s, checked where they are built) from its validated input, so every call of it is
        well-formed (its tests hold each chain to the reference). Y, or (q, scale) with
        `requant_bits` (of Y·R with `requant_rotate`: the next plan rotates)."""
        gather = None if gather_rows is None else gather_rows.indices
        scatter = None if scatter_rows is None else scatter_rows.indices
        operands = fused_linear_operands(
            a, a_scale, self.weight, a_zero_point=a_zero_point, lowrank_t=lowrank_t, lowrank_u=self.lowrank_u,
            fullrank_x=fullrank_x, fullrank_w=self.fullrank_w, bias=self.bias, activation=activation,
            residual=residual, out_dtype=out_dtype, requant_bits=requant_bits, gather_rows=gather,
            scatter_rows=scatter, out_rows=out_rows, residual_before_activation=residual_before_activation,
            requant_rotate=requant_rotate, lowrank_u_panels=self.lowrank_u_panels)
        out, out_scale = implementation_for("fused_linear", resolve_backend(a.device), operands).eager(a)(operands)
        return (out, out_scale) if requant_bits else out
