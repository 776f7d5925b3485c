"""Task LoRAs on a quantized base: ΔY = (x·Aᵀ)·(s·B)ᵀ in the quantized GEMM's low-rank segment.

A task adapter (PEFT's LoRA, trained on the fp model) is never merged into the quantized weight
and nothing is dequantized: on each QuantLinear it targets, A [r, in] gives the per-call T = x·Aᵀ
(beside the QLA / QwT columns of T) and U = scaling·B [out, r] joins the plan's U, so the GEMM's
epilogue adds T·Uᵀ with the other corrections. Several adapters may be loaded; one is active.

Switching is cheap by construction: on a converted layer (`freeze`) every loaded adapter's plan
is built when the adapter is loaded (the base plan with U extended; the packed weight is shared,
not repacked), so `set_lora` only changes which plan each layer's forward picks.

Adapters live in non-persistent buffers: `save_pretrained` / `save_quantized` write the base
model only; adapters are loaded again from their own files. Layers inside fused blocks
(`fuse_blocks`) take no task LoRA (their chains build T for the block's own corrections only).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .fused import FUSED_MODULE_TYPES
from .quant_linear import QuantLinear


class TaskLoRA(nn.Module):
    """One adapter on one QuantLinear: `down` A [r, in_features] and `up` scaling·B [out_features, r]."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.register_buffer("down", down.detach().float().contiguous(), persistent=False)
        self.register_buffer("up", up.detach().float().contiguous(), persistent=False)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def attach_loras(model: nn.Module, name: str, weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                 activate: bool = True) -> List[str]:
    """Loads adapter `name`: `weights` maps a QuantLinear's qualified name to (A [r, in], scaling·B
    [out, r]). Atomic: every layer and tensor is checked before any layer changes (ValueError
    naming the first that does not fit). `activate`: make it the active adapter (`set_lora`).
    Returns the layers that got it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not weights:
        raise ValueError(f"adapter {name!r} has no LoRA weights")
    if name in loaded_loras(model):
        raise ValueError(f"adapter {name!r} is already loaded: unload_lora it first, or give this one another name")
    layers = {}
    fused_parts = _fused_parts(model)
    for layer_name, (down, up) in weights.items():
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            raise ValueError(f"adapter {name!r}: the model has no module {layer_name!r}") from None
        if not isinstance(layer, QuantLinear):
            raise ValueError(f"adapter {name!r}: {layer_name!r} is a {type(layer).__name__}, not a QuantLinear (a task "
                             "LoRA runs in a quantized GEMM's epilogue; quantize that layer too, or leave it out)")
        if layer_name in fused_parts:
            raise ValueError(f"adapter {name!r}: {layer_name!r} is part of a fused block; load task LoRAs on a model "
                             "converted without an example (convert_for_runtime(model)), or before fuse_blocks")
        if layer.weight.is_meta:
            raise ValueError(f"adapter {name!r}: {layer_name!r} has its weights on the meta device (offloaded by "
                             "accelerate, or a skeleton): load adapters on a model whose layers are materialized")
        for what, tensor in (("A", down), ("B", up)):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 2:
                raise ValueError(f"adapter {name!r}: {what} of {layer_name!r} must be a 2-D floating-point tensor")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"adapter {name!r}: {what} of {layer_name!r} has NaN or Inf values")
        rank = down.shape[0]
        if rank == 0 or down.shape != (rank, layer.in_features) or up.shape != (layer.out_features, rank):
            raise ValueError(f"adapter {name!r}: {layer_name!r} is {layer.out_features}×{layer.in_features} (out × in); "
                             f"its A is {tuple(down.shape)} and B {tuple(up.shape)}, expected ({rank}, "
                             f"{layer.in_features}) and ({layer.out_features}, {rank})")
        device = layer.weight.device
        layers[layer_name] = (layer, TaskLoRA(down.to(device), up.to(device)))
    plans = {layer_name: layer.plan_with(adapter) for layer_name, (layer, adapter) in layers.items()
             if layer.runtime_plan is not None}  # checked before any layer changes
    for layer_name, (layer, adapter) in layers.items():
        layer.task_loras[name] = adapter
        if layer_name in plans:
            layer.lora_plans[name] = plans[layer_name]
        layer.select_lora(layer.active_lora)
    if activate:
        set_lora(model, name)
    return list(layers)


def set_lora(model: nn.Module, name: Optional[str]) -> None:
    """Makes adapter `name` the active one on every layer that has it (and no adapter active on the
    others); None: the base model alone. ValueError for a name no layer has. Switch between
    calls: a call running meanwhile may see the old adapter in some layers and the new one in
    others (each layer's switch is atomic, QuantLinear.select_lora)."""
    layers = [module for module in model.modules() if isinstance(module, QuantLinear)]
    if name is not None and not any(name in layer.task_loras for layer in layers):
        raise ValueError(f"no adapter {name!r} is loaded (loaded: {loaded_loras(model)})")
    for layer in layers:
        layer.select_lora(name if name in layer.task_loras else None)


def unload_lora(model: nn.Module, name: str) -> None:
    """Removes adapter `name` from every layer (the base weights are untouched)."""
    layers = [module for module in model.modules() if isinstance(module, QuantLinear) and name in module.task_loras]
    if not layers:
        raise ValueError(f"no adapter {name!r} is loaded (loaded: {loaded_loras(model)})")
    for layer in layers:
        if layer.active_lora == name:
            layer.select_lora(None)
        del layer.task_loras[name]
        layer.lora_plans.pop(name, None)


def loaded_loras(model: nn.Module) -> List[str]:
    names: Dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            names.update(dict.fromkeys(module.task_loras))
    return list(names)


def _fused_parts(model: nn.Module) -> set:
    """Qualified names of the QuantLinears inside fused blocks."""
    parts = set()
    for name, module in model.named_modules():
        if isinstance(module, FUSED_MODULE_TYPES):
            parts.update(f"{name}.{child}" if name else child for child, sub in module.named_modules()
                         if isinstance(sub, QuantLinear))
    return parts
