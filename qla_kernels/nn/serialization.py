"""save_quantized / load_quantized: a quantized model as one safetensors file.

The header records, per QuantLinear, its config and shape, per block with a QwT compensation, its
shape and where it is added, and for QLA adapters their placement and blocks, so `load_quantized`
can rebuild the modules on an unquantized skeleton of the same architecture before loading the
tensors. Lowering (qwt.lower, qla.fuse) and block fusion are runtime conversions: save before them.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from ..formats.checkpoint import read_checkpoint, write_checkpoint
from ..quant.config import QuantConfig
from .adapters import AdapterPlacement, attach_adapters
from .compensation import ConvQwTCompensation, QwTCompensation, attach, compensated_blocks
from .quant_conv import QuantConv2d
from .quant_linear import QuantLinear, linear_weight
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

    Atomic: the whole conversion is first staged on a copy of the skeleton on the meta device
    (no memory), and every tensor's name, shape and dtype is checked against what the staged
    model expects (quantized buffers exactly; floating-point parameters may change precision). Any
    mismatch, a corrupted or foreign file, or a header that does not fit the tensors it comes
    with is a ValueError naming the key, and the skeleton is left as it was."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (the fp skeleton), got {type(model).__name__}")
    on_meta = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
               if tensor.is_meta]
    if on_meta:
        raise ValueError(f"the skeleton has tensors on the meta device ({on_meta[0]!r}): materialize it first "
                         "(model.to_empty(device=...)), the file's tensors are copied into it")
    tensors, metadata = read_checkpoint(path)
    version = metadata.get("qla_kernels.format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported qla_kernels checkpoint version {version!r} (expected {FORMAT_VERSION})")
    _check_against(_staged(model, tensors, metadata, path), tensors, path)
    _convert(model, tensors, metadata, path)
    model.load_state_dict(tensors, strict=True)
    route_weight_reads(model, (QuantLinear,))
    return model


def _staged(model: nn.Module, tensors: dict, metadata: dict, path: str) -> nn.Module:
    """The conversion applied to a copy of `model` whose tensors are on the meta device."""
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    staged = copy.deepcopy(model, memo)
    _convert(staged, tensors, metadata, path)
    return staged


def _convert(model: nn.Module, tensors: dict, metadata: dict, path: str) -> None:
    """Rebuilds the saved modules on `model` (QuantLinears, QwT compensations, QLA adapters)."""
    try:
        layouts = dict(metadata["qla_kernels.quant_linears"])
        compensations = dict(metadata.get("qla_kernels.qwt", {}))
        adapters = metadata.get("qla_kernels.qla")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: the header has no valid qla_kernels layout ({error})") from None
    for name, layout in layouts.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the model has no module {name!r} to quantize") from None
        if not (is_linear(module) or isinstance(module, QuantLinear)):
            raise ValueError(f"{path}: module {name!r} is a {type(module).__name__}, not a linear layer")
        device = next(iter(module.buffers() if isinstance(module, QuantLinear) else module.parameters())).device
        weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
        try:
            config = QuantConfig.from_dict(layout["config"])
            shape = (layout["out_features"], layout["in_features"], layout["bias"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: the layout of {name!r} is incomplete ({error})") from None
        if weight is None or weight.dim() != 2 or weight.shape[0] != shape[0] or (bias is not None) != shape[2]:
            raise ValueError(f"{path}: the header's shape of {name!r} ({shape[0]} outputs, bias={shape[2]}) does "
                             f"not match its tensors ({None if weight is None else tuple(weight.shape)})")
        own = ((module.out_features, module.in_features) if isinstance(module, QuantLinear)
               else tuple(linear_weight(module).shape))
        if own != shape[:2]:
            raise ValueError(f"{path}: {name!r} is {own[0]}×{own[1]} (out × in) in the model, "
                             f"{shape[0]}×{shape[1]} in the file")
        layer = QuantLinear(shape[1], shape[0], shape[2], config, device=device,
                            dtype=None if bias is None else bias.dtype)
        for buffer in _OPTIONAL_BUFFERS:
            if f"{name}.{buffer}" in tensors:
                setattr(layer, buffer, torch.empty_like(tensors[f"{name}.{buffer}"], device=device))
        model.set_submodule(name, layer)
    for name, layout in compensations.items():
        try:
            block = model.get_submodule(name)
            device = next(iter(block.buffers()), torch.empty(0)).device
            empty = lambda shape: None if shape is None else torch.empty(shape, device=device)  # noqa: E731
            attach(block, QwTCompensation(empty(layout["weight"]), empty(layout["weight"][:1]), empty(layout["down"]),
                                          layout["output_norm"]))
        except (AttributeError, KeyError, TypeError, RuntimeError) as error:
            raise ValueError(f"{path}: the QwT compensation of {name!r} does not fit the model ({error})") from None
    if adapters is not None:
        try:
            attach_adapters(model, adapters["blocks"], AdapterPlacement.from_dict(adapters["placement"]))
        except (AttributeError, KeyError, TypeError, RuntimeError) as error:
            raise ValueError(f"{path}: the QLA adapters do not fit the model ({error})") from None


def _check_against(staged: nn.Module, tensors: dict, path: str) -> None:
    """ValueError naming the first tensor the staged model lacks, does not expect, or expects in
    another shape or dtype (floating-point parameters may change precision, as load_state_dict
    casts them; quantized buffers and every integer tensor must match exactly)."""
    expected = staged.state_dict()
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model does not"
        raise ValueError(f"{path}: the file {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    quantized = {f"{name}.{buffer}" for name, module in staged.named_modules() if isinstance(module, QuantLinear)
                 for buffer, value in module._buffers.items() if value is not None}
    for key, want in expected.items():
        have = tensors[key]
        if tuple(have.shape) != tuple(want.shape):
            raise ValueError(f"{path}: {key!r} has shape {tuple(have.shape)}, the model expects {tuple(want.shape)}")
        castable = have.is_floating_point() and want.is_floating_point() and key not in quantized
        if have.dtype != want.dtype and not castable:
            raise ValueError(f"{path}: {key!r} is {have.dtype}, the model expects {want.dtype}")
