"""QuantLinear: the drop-in replacement for nn.Linear and Hugging Face's Conv1D."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .. import ops
from . import forward_context
from ..formats.weights import QuantizedWeight
from ..ops.checks import FLOAT_DTYPES, check_tensor
from ..ops.cpu import lowrank_panels
from ..ops.linear_plan import LinearPlan
from ..quant.config import QuantConfig
from ..quant.primitives import qrange
from ..quant.weight import quantize_weight

# Buffers whose fp32 precision is part of the format: model.half() must not round them.
_FP32_BUFFERS = ("weight_scale", "input_scale")


def conv1d_class():
    """transformers' Conv1D (GPT-2 style, weight stored [in, out]), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out_features, in_features] weight of an nn.Linear or HF Conv1D."""
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise ValueError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def output_scaled(weight: QuantizedWeight, bias: Optional[torch.Tensor], segments: dict,
                  gamma: Optional[torch.Tensor]) -> Tuple[QuantizedWeight, Optional[torch.Tensor], dict]:
    """The GEMM operands whose output is γ ⊙ (x·Wᵀ + bias + T·Uᵀ): every format's fp32 weight
    scale has one row per output channel, so γ folds into it exactly."""
    if gamma is None:
        return weight, bias, segments
    gamma = gamma.float()
    weight = dataclasses.replace(weight, scale=weight.scale * (gamma if weight.scale.dim() == 1 else gamma[:, None]))
    bias = None if bias is None else bias * gamma.to(bias.dtype)
    segments = dict(segments)
    for name in ("lowrank_u", "fullrank_w"):
        if segments.get(name) is not None:
            segments[name] = (segments[name] * gamma[:, None].to(segments[name].dtype)).contiguous()
    return weight, bias, segments


def register_activation_buffers(module: nn.Module, out_features: int, bias: bool, device, dtype) -> None:
    """The buffers every quantized layer holds beside its weight: `weight_colsum`, `input_scale`
    and `input_zero_point` (None until a static calibration), and the fp `bias` (or None)."""
    module.register_buffer("weight_colsum", None)
    module.register_buffer("input_scale", None)
    module.register_buffer("input_zero_point", None)
    if bias:
        module.bias = nn.Parameter(torch.zeros((out_features,), dtype=dtype or torch.float32, device=device),
                                   requires_grad=False)
    else:
        module.register_parameter("bias", None)


def checked_static_activation(scale, zero_point, act_bits: int, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(scale fp32 [1], zero point int8 [1] or None) from a calibrated per-tensor scale and
    signed-domain integer zero point, or ValueError naming what does not fit."""
    try:
        scale = torch.as_tensor(scale, dtype=torch.float32, device=device)
        zero = None if zero_point is None else torch.as_tensor(zero_point, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"scale and zero_point must be numbers or tensors ({error})") from None
    if scale.numel() != 1:
        raise ValueError(f"scale must be one number (a per-tensor scale), got {scale.numel()} values")
    scale = scale.reshape(1)
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"scale must be a positive finite number, got {scale.tolist()}")
    if zero is not None:
        if zero.numel() != 1:
            raise ValueError(f"zero_point must be one integer (per tensor), got {zero.numel()} values")
        zero = zero.reshape(1)
        lo, hi = qrange(act_bits)
        if zero.dtype.is_floating_point or not lo <= int(zero) <= hi:
            raise ValueError(f"zero_point must be an integer in [{lo}, {hi}], got {zero.tolist()}")
        zero = zero.to(torch.int8)
    return scale, zero


def apply_keeping_fp32(module: nn.Module, fn, recurse: bool) -> None:
    """nn.Module._apply, except that the buffers whose fp32 precision is part of the format
    (`_FP32_BUFFERS`) only move: model.half() must not round them."""
    kept = {name: module._buffers[name] for name in _FP32_BUFFERS if module._buffers.get(name) is not None}
    nn.Module._apply(module, fn, recurse)
    for name, original in kept.items():
        device = module._buffers[name].device  # from the meta device (to_empty) there is nothing to copy
        module._buffers[name] = torch.empty_like(original, device=device) if original.is_meta else original.to(device)


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized and whose forward runs the qla ops.

    Holds only buffers (plus the optional fp bias): `weight` (packed codes), `weight_scale`, and per
    format `weight_group_scale` / `weight_zero` (formats/weights.py documents each layout). Inputs
    of any leading shape [..., in_features] in fp16/bf16/fp32; output in the input's dtype.
    Activations are quantized per token on the fly unless `set_static_activation` fixed a
    per-tensor scale (and zero point). The backend (`qk.use_backend`) decides how it runs.
    """

    takes_bias_override = True  # see forward

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Optional[QuantConfig] = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig (W8A8, W4A8, W4A16, W4A4), got {config!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        config.check_in_features(in_features)
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.weight_format = config.weight_format
        group = config.group_size or in_features
        packed = in_features if self.weight_format == "int8" else in_features // 2
        empty = lambda shape, dt: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        self.register_buffer("weight", empty((out_features, packed), torch.int8 if self.weight_format == "int8" else torch.uint8))
        if self.weight_format == "uint4_asym_groups":
            self.register_buffer("weight_scale", empty((out_features, in_features // group), torch.float32))
            self.register_buffer("weight_zero", empty((out_features, in_features // group), torch.uint8))
        else:
            self.register_buffer("weight_scale", empty((out_features,), torch.float32))
            self.register_buffer("weight_zero", None)
        groups = self.weight_format == "int4_int8_groups"
        self.register_buffer("weight_group_scale", empty((out_features, in_features // group), torch.int8) if groups else None)
        register_activation_buffers(self, out_features, bias, device, dtype)
        # Task LoRAs (nn/task_lora.py) by name: not submodules, so the module tree and the state
        # dict are the base model's; `_apply` moves them.
        self.task_loras: Dict[str, nn.Module] = {}
        self.lora_plans: Dict[str, LinearPlan] = {}  # a converted layer's plan per task LoRA

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig,
                   qweight: Optional[QuantizedWeight] = None) -> "QuantLinear":
        """Quantizes an nn.Linear or transformers Conv1D (its [in, out] weight is transposed).

        `qweight` supplies weights already quantized for `config` by another method (GPTQ, clipped
        rounding); by default the weight is rounded to nearest. The bias is copied either way. A
        module on the meta device gives the quantized layer on the meta device (shapes only).
        With `config.rotate`, the stored weight is W·R (quant/hadamard.py; a `qweight` must be
        the quantization of W·R too) and the forward rotates its input to match."""
        weight = linear_weight(module)
        out_features, in_features = weight.shape
        bias = getattr(module, "bias", None)
        layer = cls(in_features, out_features, bias is not None, config, device=weight.device,
                    dtype=bias.dtype if bias is not None else None)
        if qweight is not None and qweight.data.shape[0] != out_features:
            raise ValueError(f"qweight has {qweight.data.shape[0]} output channels, the module {out_features}")
        if weight.is_meta:  # a skeleton (no values to quantize): the quantized layer's shapes, to be loaded
            return layer
        if qweight is None:
            qweight = quantize_weight(config.rotated(weight), config)
        layer.load_quantized_weight(qweight.to(weight.device))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def load_quantized_weight(self, qweight: QuantizedWeight) -> None:
        if qweight.format != self.weight_format or qweight.in_features != self.in_features:
            raise ValueError(f"quantized weight ({qweight.format}, in_features={qweight.in_features}) does not "
                             f"match this layer ({self.weight_format}, in_features={self.in_features})")
        qweight.check()
        self.weight.copy_(qweight.data)
        self.weight_scale.copy_(qweight.scale)
        if self.weight_group_scale is not None:
            self.weight_group_scale.copy_(qweight.group_scale)
        if self.weight_zero is not None:
            self.weight_zero.copy_(qweight.zero)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight, self.weight_format, self.weight_scale, self.weight_group_scale,
                               self.weight_zero, self.config.group_size, self.weight_colsum)

    def set_static_activation(self, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None) -> None:
        """Fixes a calibrated per-tensor activation scale (and signed-domain integer zero point)."""
        if self.runtime_plan is not None:
            raise ValueError("this layer is converted for runtime (convert_for_runtime): set static activations on "
                             "the calibration model, then convert again")
        if self.config.act_bits is None:
            raise ValueError(f"{type(self.config).__name__} has no activation quantization to make static")
        scale, zero = checked_static_activation(scale, zero_point, self.config.act_bits, self.weight.device)
        self.input_scale, self.input_zero_point = scale, zero
        self.weight_colsum = None if zero is None else self.quantized_weight().integer().sum(dim=1, dtype=torch.int32)

    def forward(self, x: torch.Tensor, bias_override: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`bias_override` replaces the layer's bias for this call (a parent that assembles the
        bias per call and passes this layer's weight to F.linear: nn/weight_reads.py)."""
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} input features, expected in_features={self.in_features}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.weight.device}")
        handed_over = forward_context.take(self, "output")
        if handed_over is not None:
            if handed_over.shape[0] * self.in_features != x.numel():
                raise RuntimeError(f"the output handed over has {handed_over.shape[0]} rows; this call has "
                                   f"{x.numel() // self.in_features}")
            return handed_over.reshape(*x.shape[:-1], self.out_features)
        rows = x.reshape(-1, self.in_features).contiguous()
        residual, scaled_plan = forward_context.take(self, "epilogue", (None, None))
        if residual is not None and residual.shape != (rows.shape[0], self.out_features):
            raise RuntimeError(f"the residual for this call is {tuple(residual.shape)}, its output "
                               f"{(rows.shape[0], self.out_features)}")
        plan = scaled_plan or self.runtime_plan
        converted = plan is not None
        _, lora, lora_plan = self._active_lora or (None, None, None)  # one read: set_lora may switch it meanwhile
        if not converted:  # the calibration form: its operands may change between calls
            plan = self.build_plan(None, x.dtype, check=False, lora=lora)
        elif lora is not None:
            if scaled_plan is not None:
                raise RuntimeError("a fused block ran a layer that carries a task LoRA (fuse_blocks refuses those)")
            plan = lora_plan
        if bias_override is not None:
            check_tensor("bias_override", bias_override, device=x.device, dtypes=FLOAT_DTYPES,
                         shape=(self.out_features,))
            plan = dataclasses.replace(plan, bias=bias_override)
        lowrank_t, fullrank_x = self.correction_inputs(rows, plan, lora=lora)  # from x itself, not x·R
        if converted:
            y = plan.run(rows, lowrank_t, fullrank_x, residual)  # rotated as the plan quantizes them
        else:
            y = ops.quantized_linear(self.activation_input(rows), plan.weight, plan.act_bits,
                                     static_scale=plan.input_scale, zero_point=plan.input_zero_point, bias=plan.bias,
                                     lowrank_t=lowrank_t, lowrank_u=plan.lowrank_u, fullrank_x=fullrank_x,
                                     fullrank_w=plan.fullrank_w, residual=residual)
        return y.reshape(*x.shape[:-1], self.out_features)

    def activation_input(self, x: torch.Tensor) -> torch.Tensor:
        """What this layer's activation quantizer sees of its input x: x·R with a rotating config
        (the stored weight is W·R; `ops.hadamard_rotate`, on the selected backend), else x.
        Calibration observes this (methods.ptq)."""
        return ops.hadamard_rotate(x) if self.config.rotate else x

    def hand_over(self, y: torch.Tensor) -> None:
        """Makes this layer's next call in the current forward scope (nn/forward_context.py) return
        y [rows, out_features] instead of running its GEMM: a fused block computed it in one packed
        GEMM with its siblings (LLaMA's q/k/v), while the model's own attention code still calls
        this layer."""
        forward_context.put(self, "output", y)

    def add_to_next_output(self, residual: torch.Tensor, plan: Optional[LinearPlan] = None) -> None:
        """Makes this layer's next call in the current forward scope add `residual` [rows,
        out_features] in its GEMM epilogue, running `plan` (this layer's `build_plan(γ)` with a
        LayerScale γ folded in) instead of its own operands: a fused decoder block's residual
        stream, when the model's own attention code calls its output projection."""
        forward_context.put(self, "epilogue", (residual, plan))

    runtime_plan: Optional[LinearPlan] = None  # set by `freeze` (convert_for_runtime)
    # (name, TaskLoRA, converted plan or None) of the task LoRA this layer's forward adds.
    _active_lora: Optional[Tuple[str, nn.Module, Optional[LinearPlan]]] = None

    @property
    def active_lora(self) -> Optional[str]:
        """The name of the task LoRA this layer's forward adds (nn/task_lora.py set_lora), or None."""
        return None if self._active_lora is None else self._active_lora[0]

    def select_lora(self, name: Optional[str]) -> None:
        """Makes task LoRA `name` (loaded on this layer) the one its forward adds; None: none. The
        forward reads the (name, adapter, plan) triple in one step, so a switch during a call gives
        that call one adapter or the other on this layer, never a mix (across layers it may:
        switch between calls)."""
        self._active_lora = None if name is None else (name, self.task_loras[name], self.lora_plans.get(name))

    def build_plan(self, gamma: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                   check: bool = True, lora: Optional[nn.Module] = None) -> LinearPlan:
        """This layer's GEMM operands as a plan (ops/linear_plan.py): its weight, bias and static
        activation scale, the U of its lowered corrections (adapter, then QwT, then the task
        `lora`) concatenated and QwT's full-rank W_c (in `dtype`, else as stored), with the output
        scale γ [out_features] folded in (a LayerScale after the layer). `check`: the frozen plan
        (validated once, its weight in its kernels' layout: LinearPlan.frozen)."""
        adapter, qwt = getattr(self, "lowered_adapter", None), getattr(self, "lowered_qwt", None)
        cast = (lambda tensor: tensor) if dtype is None else (lambda tensor: tensor.to(dtype))  # noqa: E731
        ups = [cast(correction.up) for correction in (adapter, qwt, lora)
               if correction is not None and (correction is not qwt or qwt.down is not None)]
        segments = {}
        if ups:
            segments["lowrank_u"] = (ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)).contiguous()
        if qwt is not None and qwt.down is None:
            segments["fullrank_w"] = cast(qwt.up).contiguous()
        bias = None if self.bias is None else self.bias.detach()
        weight, bias, segments = output_scaled(self.quantized_weight(), bias, segments, gamma)
        plan = LinearPlan(weight, self.config.act_bits, self.input_scale, self.input_zero_point, bias, **segments,
                          rotate=bool(self.config.rotate))
        return plan.frozen() if check else plan

    def plan_with(self, lora: nn.Module) -> LinearPlan:
        """The converted plan with `lora`'s U after the other corrections' (checked; the packed
        weight is the base plan's, not packed again)."""
        base = self.runtime_plan
        up = lora.up if base.dtype is None else lora.up.to(base.dtype)
        lowrank_u = up if base.lowrank_u is None else torch.cat([base.lowrank_u, up], dim=1)
        lowrank_u = lowrank_u.contiguous()
        plan = dataclasses.replace(base, lowrank_u=lowrank_u, lowrank_u_panels=lowrank_panels(lowrank_u))
        plan.check()
        return plan

    def freeze(self) -> None:
        """Converts this layer to its runtime form: its forward runs `build_plan()`'s operands, built
        now (and one plan per loaded task LoRA), and only the input (and the corrections' T) is
        prepared per call. Casts and moves (`.to`, `.half`) build the plans again."""
        self.runtime_plan = self.build_plan()
        self.lora_plans = {name: self.plan_with(lora) for name, lora in self.task_loras.items()}
        self.select_lora(self.active_lora)

    def thaw(self) -> None:
        """Back to the calibration form (undoes a conversion that failed part-way)."""
        self.__dict__.pop("runtime_plan", None)
        self.lora_plans = {}
        self.select_lora(self.active_lora)

    def correction_inputs(self, rows: torch.Tensor, plan: LinearPlan, adapter_t: Optional[torch.Tensor] = None,
                          qwt_t: Optional[torch.Tensor] = None, lora: Optional[nn.Module] = None
                          ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(T, X_c) of this call for the plan's low-rank and full-rank segments: the lowered
        adapter's T (`adapter_t` when the caller computed it, else what its hook handed over),
        QwT's T = x·V (`qwt_t` when the caller computed it from its read of x) or its X_c = x, from
        the block input handed over in this scope, and the task `lora`'s T = rows·Aᵀ (`rows`:
        this layer's input)."""
        ts, fullrank_x = [], None
        adapter = getattr(self, "lowered_adapter", None)
        if adapter is not None:
            ts.append(adapter.take_t(rows.shape[0], plan.dtype) if adapter_t is None else adapter_t.to(plan.dtype))
        qwt = getattr(self, "lowered_qwt", None)
        if qwt is not None:
            block_input = qwt.take_input()
            if qwt.down is None:
                fullrank_x = block_input.to(plan.dtype).contiguous()
            else:
                ts.append((block_input.float() @ qwt.down.float() if qwt_t is None else qwt_t).to(plan.dtype))
        if lora is not None:
            ts.append(rows.to(plan.dtype) @ lora.down.t().to(plan.dtype))
        if not ts:
            return None, fullrank_x
        return (ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)).contiguous(), fullrank_x

    def drop_untaken_hand_offs(self) -> bool:
        """Drops what the current scope still holds for this layer; True when there was something
        (the code that was to call it did not)."""
        untaken = [forward_context.take(self, slot) for slot in ("output", "epilogue")]
        return any(value is not None for value in untaken)

    def __setstate__(self, state):
        state.setdefault("task_loras", {})  # pickled before task LoRAs existed
        state.setdefault("lora_plans", {})
        super().__setstate__(state)

    def _apply(self, fn, recurse=True):
        apply_keeping_fp32(self, fn, recurse)
        for lora in self.task_loras.values():
            lora._apply(fn, recurse)
        if self.runtime_plan is not None:
            self.freeze()
        return self

    def extra_repr(self) -> str:
        activation = "static" if self.input_scale is not None else "dynamic per-token"
        act = "" if self.config.act_bits is None else f", activations={activation}"
        loras = f", task_loras={list(self.task_loras)}" if self.task_loras else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, config={self.config}, weight_format={self.weight_format}{act}{loras}")
