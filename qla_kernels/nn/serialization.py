"""save_quantized / load_quantized: a quantized model as one safetensors file.

The header records, per QuantLinear, its config and shape, per block with a QwT compensation, its
shape and where it is added, and for QLA adapters their placement and blocks, so `load_quantized`
can rebuild the modules on an unquantized skeleton of the same architecture before loading the
tensors. Lowering (qwt.lower, qla.fuse) and block fusion are runtime conversions: save before them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.checkpoint import read_checkpoint, write_checkpoint
from ..quant.config import QuantConfig
from .adapters import AdapterPlacement, attach_adapters
from .compensation import ConvQwTCompensation, QwTCompensation, attach, compensated_blocks
from .quant_conv import QuantConv2d
from .quant_linear import QuantLinear
from .module_kinds import is_linear
from .weight_reads import route_weight_reads

FORMAT_VERSION = 1
_OPTIONAL_BUFFERS = ("input_scale", "input_zero_point", "weight_colsum")


def save_quantized(model: nn.Module, path: str) -> None:
    """Writes every parameter and buffer of `model` plus the layout of its QuantLinears, QwT
    compensations and QLA adapters. A model with lowered corrections is refused (their folded
    biases would be saved without the segments that go with them)."""
    lowered = [name for name, m in model.named_modules()
               if getattr(m, "lowered_qwt", None) is not None or getattr(m, "lowered_adapter", None) is not None]
    if lowered:
        raise ValueError(f"{lowered[0]!r} carries a lowered correction (qwt.lower / qla.fuse are runtime "
                         "conversions): save before lowering, lower after loading")
    simulated = [name for name, m in model.named_modules() if isinstance(m, (QuantConv2d, ConvQwTCompensation))]
    if simulated:
        raise ValueError(f"{simulated[0]!r} is simulation only (no convolution kernels yet): nothing to deploy or save")
    layers = {
        name: {"config": module.config.to_dict(), "in_features": module.in_features,
               "out_features": module.out_features, "bias": module.bias is not None}
        for name, module in model.named_modules() if isinstance(module, QuantLinear)
    }
    compensations = {
        name: {"output_norm": block.qwt.output_norm, "weight": list(block.qwt.weight.shape),
               "down": None if block.qwt.down is None else list(block.qwt.down.shape)}
        for name, block in compensated_blocks(model)
    }
    metadata = {"qla_kernels.format_version": FORMAT_VERSION, "qla_kernels.quant_linears": layers,
                "qla_kernels.qwt": compensations}
    placement = getattr(model, "_qla_placement", None)
    if placement is not None:
        metadata["qla_kernels.qla"] = {"blocks": model._qla_block_names, "placement": placement.to_dict()}
    write_checkpoint(path, model.state_dict(), metadata)


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Turns `model` (the fp architecture, any weights) into the saved quantized model, in place.

    Its linears named in the file become QuantLinears; then every tensor is loaded strictly, so a
    skeleton of another architecture is an error, not a partial load.
    """
    tensors, metadata = read_checkpoint(path)
    version = metadata.get("qla_kernels.format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported qla_kernels checkpoint version {version!r} (expected {FORMAT_VERSION})")
    for name, layout in metadata["qla_kernels.quant_linears"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the model has no module {name!r} to quantize") from None
        if not (is_linear(module) or isinstance(module, QuantLinear)):
            raise ValueError(f"{path}: module {name!r} is a {type(module).__name__}, not a linear layer")
        device = next(iter(module.buffers() if isinstance(module, QuantLinear) else module.parameters())).device
        bias = tensors.get(f"{name}.bias")
        layer = QuantLinear(layout["in_features"], layout["out_features"], layout["bias"],
                            QuantConfig.from_dict(layout["config"]), device=device,
                            dtype=None if bias is None else bias.dtype)
        for buffer in _OPTIONAL_BUFFERS:
            if f"{name}.{buffer}" in tensors:
                setattr(layer, buffer, torch.empty_like(tensors[f"{name}.{buffer}"], device=device))
        model.set_submodule(name, layer)
    for name, layout in metadata.get("qla_kernels.qwt", {}).items():
        block = model.get_submodule(name)
        device = next(iter(block.buffers()), torch.empty(0)).device
        empty = lambda shape: None if shape is None else torch.empty(shape, device=device)  # noqa: E731
        attach(block, QwTCompensation(empty(layout["weight"]), empty(layout["weight"][:1]), empty(layout["down"]),
                                      layout["output_norm"]))
    adapters = metadata.get("qla_kernels.qla")
    if adapters is not None:
        attach_adapters(model, adapters["blocks"], AdapterPlacement.from_dict(adapters["placement"]))
    model.load_state_dict(tensors, strict=True)
    route_weight_reads(model, (QuantLinear,))
    return model
