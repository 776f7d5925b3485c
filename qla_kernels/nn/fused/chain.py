"""What every fused chain shares: its pre-kernels, its GEMMs on `LinearPlan`s, the fused MLP, and
`FusedModule`, the base of the mixins `fuse_block` puts in front of a block's class.

A chain reads its GEMMs' operands from a plan per GEMM (`FusedModule.plans`): frozen once by
`convert_for_runtime` (the runtime form), or assembled per call from the block's modules as they
are (the calibration form, where methods still change scales and corrections)."""

from __future__ import annotations

import functools
import inspect
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ...ops import (
    gemm_zero_point,
    normalize_activation,
    normalize_quantize_activation,
    quantize_activation,
)
from ...ops.dispatch import resolve_backend
from ...ops.linear_plan import LinearPlan
from ..adapters import LOWERED_ADAPTER_HOOKS
from ..module_kinds import norm_arguments
from ..quant_linear import QuantLinear


def quantize_input(x: torch.Tensor, plan: LinearPlan, norm: Optional[nn.Module] = None,
                   down_proj: Optional[torch.Tensor] = None, down_from_input: bool = False):
    """(codes, scales, zero point for the GEMM, T) of x for the GEMM of `plan`, with `norm` applied
    first and T = norm(x)·down_proj (x·down_proj with `down_from_input`) from the same read (no
    columns without `down_proj`); rotated as the plan says."""
    bits = plan.act_bits
    q, scale, t = quantize_activation(x, bits, static_scale=plan.input_scale, zero_point=plan.input_zero_point,
                                      down_proj=down_proj, down_from_input=down_from_input and down_proj is not None,
                                      rotate=plan.rotate, **({} if norm is None else norm_arguments(norm)))
    return q, scale, gemm_zero_point(plan.input_zero_point, bits), t


def normalize_and_quantize(rows: torch.Tensor, norm: nn.Module, plan: LinearPlan,
                           down_proj: Optional[torch.Tensor] = None, down_from_input: bool = False) -> Tuple:
    """(norm(rows) in rows.dtype, codes, scales, zero point for the GEMM, T = norm(rows)·down_proj,
    or rows·down_proj with `down_from_input`) for the GEMM of `plan` from one pre-kernel read."""
    bits = plan.act_bits
    normed, q, scale, t = normalize_quantize_activation(
        rows, bits, static_scale=plan.input_scale, zero_point=plan.input_zero_point, down_proj=down_proj,
        down_from_input=down_from_input and down_proj is not None, rotate=plan.rotate, **norm_arguments(norm))
    return normed, q, scale, gemm_zero_point(plan.input_zero_point, bits), t


def normalize(rows: torch.Tensor, norm: nn.Module,
              down_proj: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(norm(rows) in rows.dtype, T = norm(rows)·down_proj) from one pre-kernel read of rows."""
    return normalize_activation(rows, down_proj=down_proj, **norm_arguments(norm))


def gemm(a: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor], plan: LinearPlan, *,
         out_dtype: torch.dtype, lowrank_t: Optional[torch.Tensor] = None, fullrank_x: Optional[torch.Tensor] = None,
         **epilogue):
    """The fused linear of `plan` on codes a (scale, GEMM zero point) or W4A16 activations a; T
    and X_c pair with the plan's U and W_c; `epilogue`: activation, residual, requant_bits, row maps
    (`LinearPlan.fused`: not validated again per call)."""
    return plan.fused(a, scale, zero, lowrank_t=lowrank_t, fullrank_x=fullrank_x, out_dtype=out_dtype, **epilogue)


def mlp(a: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor], fc1: LinearPlan,
        fc2: LinearPlan, activation: str, residual: Optional[torch.Tensor], dtype: torch.dtype,
        lowrank_t: Optional[torch.Tensor] = None, fullrank_x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fc1 + bias + activation on its input (int8 codes, or activations for W4A16), then fc2 + bias
    + corrections (+ residual) in `dtype`. With dynamic scales for fc2, fc1's epilogue
    re-quantizes per token (rotating first when fc2 rotates): no fp round trip."""
    if fc2.act_bits is None:  # W4A16: fc2 reads fc1's output as it is
        hidden_q = gemm(a, scale, zero, fc1, activation=activation, out_dtype=dtype)
        hidden_scale = hidden_zero = None
    elif fc2.input_scale is None:
        hidden_q, hidden_scale = gemm(a, scale, zero, fc1, activation=activation, out_dtype=dtype,
                                      requant_bits=fc2.act_bits, requant_rotate=fc2.rotate)
        hidden_zero = None
    else:
        hidden = gemm(a, scale, zero, fc1, activation=activation, out_dtype=dtype)
        hidden_q, hidden_scale, hidden_zero, _ = quantize_input(hidden, fc2)
    return gemm(hidden_q, hidden_scale, hidden_zero, fc2, lowrank_t=lowrank_t, fullrank_x=fullrank_x,
                residual=residual, out_dtype=dtype)


def layer_scale(block: nn.Module, name: str) -> Optional[torch.Tensor]:
    """γ of the LayerScale module `name` (its one parameter), or None without one."""
    return next(block.get_submodule(name).parameters()).detach() if name else None


def down_projection(block: nn.Module, layer: QuantLinear, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """The LoRA down-projection A [width, rank] the MLP's pre-kernel multiplies (in `dtype`, else
    as stored) when `layer` carries the lowered LoRA, else None."""
    if getattr(layer, "lowered_adapter", None) is None:
        return None
    weight = block.qla_ffn.down.weight.detach()
    return weight.t().to(dtype or weight.dtype).contiguous()


def bypassed_modules(block: nn.Module, names: Tuple[str, ...]) -> Tuple[Tuple[str, nn.Module], ...]:
    """(name, module) of each module the chain skips (each named one and its parents inside the
    block), in name order: resolved once, when the block is fused."""
    return tuple((name, block.get_submodule(name)) for name in sorted({p for name in names for p in _prefixes(name)}))


def hooked_modules(block: nn.Module, names: Optional[Tuple[str, ...]] = None) -> List[str]:
    """The modules among those the chain skips (`names` and their parents; by default those the
    fused block resolved when it was fused) that have hooks, other than lowered adapters' (the
    chain computes their T itself)."""
    modules = block._qla_bypassed if names is None else bypassed_modules(block, names)
    return [name for name, module in modules
            if module._forward_pre_hooks or any(h not in LOWERED_ADAPTER_HOOKS for h in module._forward_hooks.values())]


def _prefixes(name: str) -> Tuple[str, ...]:
    parts = name.split(".")
    return tuple(".".join(parts[:i]) for i in range(1, len(parts) + 1))


def common_reasons(block: nn.Module, x: torch.Tensor) -> str:
    """Why no fused chain applies to a call of `block` on x, whatever its template ("" if none)."""
    if block.training:
        return "the block is in training mode"
    if resolve_backend(x.device) == "simulate":
        return "the backend is 'simulate'"
    hooked = hooked_modules(block)
    if hooked:
        return f"modules the fused chain bypasses carry hooks (observers, corrections not lowered): {hooked}"
    return ""


def unexpected_arguments(args: tuple, kwargs: dict, first_position: int = 1) -> str:
    """The reason naming the arguments (not None or False) a fused chain does not take, or "";
    positional ones are numbered from `first_position` (the block call's own numbering)."""
    given = [f"argument {i + first_position}" for i, a in enumerate(args) if a is not None and a is not False]
    given += [name for name, value in kwargs.items() if value is not None and value is not False]
    return f"the block is called with arguments the fused chain does not take: {given}" if given else ""


class FusedModule(nn.Module):
    """Base of the mixins `fuse_block` / `fuse_mlp` put in front of a module's class.

    Each mixin says why its chain does not apply to a call (`why_not_fused`, "" when it does) and
    what its GEMMs read (`chain_plans`). In the calibration form the module then runs its own
    forward; converted (`freeze`, by convert_for_runtime) it raises instead, and its plans are
    built once. The fused class is made per (module class, mixin) at run time (`fused_class`), so
    pickling names the two classes it is made of: `torch.save(model)` and `copy.deepcopy`
    rebuild it."""

    def why_not_fused(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str:
        raise NotImplementedError

    def chain_plans(self, dtype: Optional[torch.dtype], check: bool) -> Dict[str, object]:
        """Name → LinearPlan (or the T down-projection tensor) of everything the chain's GEMMs and
        pre-kernels read besides their inputs; tensors in `dtype` (None: as stored)."""
        raise NotImplementedError

    @property
    def converted(self) -> bool:
        return "_qla_plans" in self.__dict__

    def plans(self, dtype: torch.dtype) -> Dict[str, object]:
        """The frozen plans of a converted module, else this call's (in the activation dtype)."""
        frozen = self.__dict__.get("_qla_plans")
        return frozen if frozen is not None else self.chain_plans(dtype, check=False)

    def own_forward(self, why: str, *args, **kwargs):
        """The module's own forward for a call the chain does not apply to (calibration form); a
        ValueError naming `why` once converted."""
        if self.converted:
            raise ValueError(f"{type(self).__name__} is converted for runtime and its fused chain does not apply to "
                             f"this call: {why}. Run such calls on the model before convert_for_runtime.")
        return super(FusedModule, self).forward(*args, **kwargs)

    def freeze(self) -> None:
        """The runtime form: the chain's plans built and validated now, and calls the chain does
        not apply to raise. Casts and moves (`_apply`) build them again."""
        self._qla_plans = self.chain_plans(None, check=True)

    def thaw(self) -> None:
        self.__dict__.pop("_qla_plans", None)

    def pack(self) -> None:
        """Concatenates what packed GEMMs read (fused blocks with packed groups); run at fusion
        and after every cast or move."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.pack()
        if self.converted:
            self.freeze()
        return self

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        return (_new_fused_module, (cls.__bases__[1], cls.__bases__[0]), *reduced[2:])


def _new_fused_module(module_class: type, mixin: type) -> nn.Module:
    return object.__new__(fused_class(module_class, mixin))


@functools.lru_cache(maxsize=None)
def fused_class(block_class: type, mixin: type) -> type:
    # The original forward's signature, read once (decoder blocks bind their call arguments to it).
    attributes = {"__module__": __name__, "_qla_forward_signature": inspect.signature(block_class.forward)}
    return type(f"Fused{block_class.__name__}", (mixin, block_class), attributes)
