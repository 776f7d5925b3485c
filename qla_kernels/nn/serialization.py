"""save_quantized / load_quantized: a quantized model as one safetensors file.

The header records, per QuantLinear, its config and shape, per QuantConv2d its config, channels
and geometry, per block with a QwT compensation its shape and where it is added (and for CNN
blocks its groups and stride), for QLA adapters their placement and blocks, for CNN adapters
their sizes, and per quantized attention core (nn/quant_attention.py) its bits and symmetry, so
`load_quantized` can rebuild the modules on an unquantized skeleton of the same architecture
before loading the tensors. Lowering (qwt.lower, qla.fuse), block fusion and
convert_for_runtime's folding are runtime conversions: save before them.
"""

from __future__ import annotations

import copy
import itertools
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..formats.checkpoint import read_checkpoint, write_checkpoint
from ..quant.config import QuantConfig
from .adapters import AdapterPlacement, attach_adapters
from .compensation import ConvQwTCompensation, QwTCompensation, attach, compensated_blocks
from .conv_adapters import conv_adapters, rebuild_conv_adapters
from ..ops.conv import ConvGeometry
from .quant_conv import QuantConv2d
from .quant_attention import QuantizedAttention, register_attention
from .quant_linear import QuantLinear, linear_weight
from .quantize import announce_quantized
from .module_kinds import is_linear
from .weight_reads import route_weight_reads

FORMAT_VERSION = 1
_OPTIONAL_BUFFERS = ("input_scale", "input_zero_point", "weight_colsum")
_OPTIONAL_BUFFER_SHAPES = {"input_scale": lambda out: (1,), "input_zero_point": lambda out: (1,),
                           "weight_colsum": lambda out: (out,)}
_OPTIONAL_BUFFER_DTYPES = {"input_scale": torch.float32, "input_zero_point": torch.int8, "weight_colsum": torch.int32}


def quantized_layout(model: nn.Module) -> dict:
    """The header entries that let `rebuild` turn an fp skeleton into `model`'s quantized
    architecture: per QuantLinear its config, shape and optional buffers, per block with a QwT
    compensation its shape and where it is added, the QLA adapters' placement and blocks. A model
    with lowered corrections is refused (their folded biases would be saved without the segments
    that go with them), and so is one with simulation-only modules."""
    lowered = [name for name, m in model.named_modules()
               if getattr(m, "lowered_qwt", None) is not None or getattr(m, "lowered_adapter", None) is not None]
    if lowered:
        raise ValueError(f"{lowered[0]!r} carries a lowered correction (qwt.lower / qla.fuse are runtime "
                         "conversions): save before lowering, lower after loading")
    training = [name for name, m in model.named_modules()
                if getattr(m, "attention_quantizer", None) is not None
                and not isinstance(m.attention_quantizer, QuantizedAttention)]
    if training:
        raise ValueError(f"{training[0]!r} carries a trainable attention quantizer (a QAT student): export it first "
                         "(methods.aqdetr.export)")
    folded = [name for name, m in model.named_modules() if isinstance(m, QuantConv2d) and
              (m.folded_affine is not None or m.fused_activation != "none")]
    if folded:
        raise ValueError(f"{folded[0]!r} has a BatchNorm or activation folded in (convert_for_runtime is a runtime "
                         "conversion): save before converting, convert after loading")
    layers = {
        name: {"config": module.config.to_dict(), "in_features": module.in_features,
               "out_features": module.out_features, "bias": module.bias is not None,
               "buffers": [buffer for buffer in _OPTIONAL_BUFFERS if getattr(module, buffer) is not None]}
        for name, module in model.named_modules() if isinstance(module, QuantLinear)
    }
    convs = {
        name: {"config": module.config.to_dict(), "in_channels": module.in_channels,
               "out_channels": module.out_channels, **_geometry_entry(module.geometry), "bias": module.bias is not None,
               "buffers": [buffer for buffer in _OPTIONAL_BUFFERS if getattr(module, buffer) is not None]}
        for name, module in model.named_modules() if isinstance(module, QuantConv2d)
    }
    if not layers and not convs:
        raise ValueError("the model has no QuantLinear or QuantConv2d: quantize_ (or quantize_convs_) it first")
    attention = {name: {"bits": m.attention_quantizer.bits, "symmetric": m.attention_quantizer.zeros is None}
                 for name, m in model.named_modules() if isinstance(getattr(m, "attention_quantizer", None),
                                                                     QuantizedAttention)}
    compensations = {name: _compensation_entry(block.qwt) for name, block in compensated_blocks(model)}
    layout = {"qla_kernels.format_version": FORMAT_VERSION, "qla_kernels.quant_linears": layers,
              "qla_kernels.qwt": compensations}
    if convs:
        layout["qla_kernels.quant_convs"] = convs
    if attention:
        layout["qla_kernels.quant_attention"] = attention
    adapters = conv_adapters(model)
    if adapters:
        layout["qla_kernels.qla_conv"] = {name: adapter.to_dict() for name, adapter in adapters.items()}
    placement = getattr(model, "_qla_placement", None)
    if placement is not None:
        layout["qla_kernels.qla"] = {"blocks": model._qla_block_names, "placement": placement.to_dict()}
    return layout


def _geometry_entry(geometry: ConvGeometry) -> dict:
    return {"kernel": list(geometry.kernel), "stride": list(geometry.stride), "padding": list(geometry.padding),
            "dilation": list(geometry.dilation), "groups": geometry.groups}


def _compensation_entry(compensation: QwTCompensation) -> dict:
    entry = {"output_norm": compensation.output_norm, "weight": list(compensation.weight.shape),
             "down": None if compensation.down is None else list(compensation.down.shape)}
    if isinstance(compensation, ConvQwTCompensation):
        entry["conv"] = {"groups": compensation.groups, "stride": compensation.stride}
    return entry


def save_quantized(model: nn.Module, path: str) -> None:
    """Writes every parameter and buffer of `model` plus its `quantized_layout` in the header."""
    write_checkpoint(path, model.state_dict(), quantized_layout(model))


def _check_ties(model: nn.Module, tensors: dict, path: str) -> None:
    """ValueError when the staged model (the skeleton as the file's layout makes it) still shares
    one parameter under names the file holds as different tensors (a tied LM head the saved model
    had untied, as `methods.rotation.fold_rotation` does, and left in floating point): loading
    would keep one of them for both."""
    names_by_parameter: dict = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_parameter.setdefault(id(parameter), []).append(name)
    for names in names_by_parameter.values():
        saved = [name for name in names if name in tensors]
        if any(not torch.equal(tensors[saved[0]], tensors[name]) for name in saved[1:]):
            raise ValueError(f"{path}: the skeleton ties {' and '.join(saved)} (one parameter) but the file holds "
                             "different tensors for them: build the skeleton untied (e.g. "
                             "config.tie_word_embeddings=False)")


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
    check_layout_version(metadata, path)
    specs = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
    staged = _staged(model, metadata, path, tensors)
    _check_ties(staged, tensors, path)
    check_tensors(staged, specs, path)
    rebuild(model, metadata, path, tensors)
    model.load_state_dict(tensors, strict=True)
    route_weight_reads(model, (QuantLinear,))
    announce_quantized(model)
    return model


def check_layout_version(layout: dict, source: str) -> None:
    version = layout.get("qla_kernels.format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{source}: unsupported qla_kernels checkpoint version {version!r} (expected {FORMAT_VERSION})")


def _staged(model: nn.Module, layout: dict, source: str, tensors: Optional[dict]) -> nn.Module:
    """`rebuild` applied to a copy of `model` whose tensors are on the meta device."""
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    staged = copy.deepcopy(model, memo)
    rebuild(staged, layout, source, tensors)
    return staged


def rebuild(model: nn.Module, layout: dict, source: str, tensors: Optional[dict] = None) -> None:
    """Rebuilds the modules `layout` (`quantized_layout`) describes on `model`, in place:
    QuantLinears (empty, on each linear's device), QwT compensations, QLA adapters. `tensors`, the
    file's, when at hand: their shapes are checked against the layout, and in files written
    before the layout listed a layer's optional buffers, they say which it has. ValueError naming
    the module that does not fit (then `model` may be part-rebuilt: stage it first)."""
    try:
        layouts = dict(layout["qla_kernels.quant_linears"])
        conv_layouts = dict(layout.get("qla_kernels.quant_convs", {}))
        conv_adapter_layouts = dict(layout.get("qla_kernels.qla_conv", {}))
        compensations = dict(layout.get("qla_kernels.qwt", {}))
        attention = dict(layout.get("qla_kernels.quant_attention", {}))
        adapters = layout.get("qla_kernels.qla")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: the header has no valid qla_kernels layout ({error})") from None
    for name, entry in layouts.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: the model has no module {name!r} to quantize") from None
        if not (is_linear(module) or isinstance(module, QuantLinear)):
            raise ValueError(f"{source}: module {name!r} is a {type(module).__name__}, not a linear layer")
        device = next(iter(module.buffers() if isinstance(module, QuantLinear) else module.parameters())).device
        try:
            config = QuantConfig.from_dict(entry["config"])
            shape = (entry["out_features"], entry["in_features"], entry["bias"])
            buffers = entry.get("buffers")
            if buffers is not None and not set(buffers) <= set(_OPTIONAL_BUFFERS):
                raise TypeError(f"unknown buffers {sorted(set(buffers) - set(_OPTIONAL_BUFFERS))}")
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: the layout of {name!r} is incomplete ({error})") from None
        if buffers is None:
            if tensors is None:
                raise ValueError(f"{source}: the layout of {name!r} does not list its buffers")
            buffers = [buffer for buffer in _OPTIONAL_BUFFERS if f"{name}.{buffer}" in tensors]
        own_bias = getattr(module, "bias", None)
        bias_dtype = None if own_bias is None else own_bias.dtype
        if tensors is not None:
            weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
            if weight is None or weight.dim() != 2 or weight.shape[0] != shape[0] or (bias is not None) != shape[2]:
                raise ValueError(f"{source}: the header's shape of {name!r} ({shape[0]} outputs, bias={shape[2]}) "
                                 f"does not match its tensors ({None if weight is None else tuple(weight.shape)})")
            bias_dtype = None if bias is None else bias.dtype
        own = ((module.out_features, module.in_features) if isinstance(module, QuantLinear)
               else tuple(linear_weight(module).shape))
        if own != shape[:2]:
            raise ValueError(f"{source}: {name!r} is {own[0]}×{own[1]} (out × in) in the model, "
                             f"{shape[0]}×{shape[1]} in the file")
        layer = QuantLinear(shape[1], shape[0], shape[2], config, device=device, dtype=bias_dtype)
        for buffer in buffers:
            setattr(layer, buffer, torch.empty(_OPTIONAL_BUFFER_SHAPES[buffer](shape[0]),
                                               dtype=_OPTIONAL_BUFFER_DTYPES[buffer], device=device))
        model.set_submodule(name, layer)
    for name, entry in conv_layouts.items():
        model.set_submodule(name, _empty_conv(model, name, entry, source, tensors))
    for name, entry in compensations.items():
        try:
            block = model.get_submodule(name)
            device = next(iter(block.buffers()), torch.empty(0)).device
            empty = lambda shape: None if shape is None else torch.empty(shape, device=device)  # noqa: E731
            conv = entry.get("conv")
            if conv is not None:
                compensation = ConvQwTCompensation(empty(entry["weight"]), empty(entry["weight"][:1]),
                                                   int(conv["groups"]), int(conv["stride"]))
            else:
                compensation = QwTCompensation(empty(entry["weight"]), empty(entry["weight"][:1]), empty(entry["down"]),
                                               entry["output_norm"])
            attach(block, compensation)
        except (AttributeError, KeyError, TypeError, RuntimeError) as error:
            raise ValueError(f"{source}: the QwT compensation of {name!r} does not fit the model ({error})") from None
    if attention:
        _rebuild_attention(model, attention, source)
    try:
        rebuild_conv_adapters(model, conv_adapter_layouts)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{source}: the QLA convolution adapters do not fit the model ({error})") from None
    if adapters is not None:
        try:
            attach_adapters(model, adapters["blocks"], AdapterPlacement.from_dict(adapters["placement"]))
        except (AttributeError, KeyError, TypeError, RuntimeError) as error:
            raise ValueError(f"{source}: the QLA adapters do not fit the model ({error})") from None


def _rebuild_attention(model: nn.Module, entries: dict, source: str) -> None:
    """Empty QuantizedAttention cores on the named attention modules, and the model's attention
    implementation switched to the one that runs them."""
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{source}: quantized attention needs a transformers model (AttentionInterface); "
                         f"got a {type(model).__name__}")
    for name, entry in entries.items():
        try:
            module = model.get_submodule(name)
            bits, symmetric = entry["bits"], entry["symmetric"]
            if not isinstance(symmetric, bool):
                raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
            device = next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device
            module.attention_quantizer = QuantizedAttention(bits, symmetric, device=device)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: the quantized attention of {name!r} does not fit the model ({error})") from None
    model.set_attn_implementation(register_attention())


def _empty_conv(model: nn.Module, name: str, entry: dict, source: str, tensors: Optional[dict]) -> QuantConv2d:
    """The empty QuantConv2d a conv layout entry describes, in place of the model's nn.Conv2d of
    the same geometry (ValueError naming the module otherwise)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source}: the model has no module {name!r} to quantize") from None
    if not isinstance(module, (nn.Conv2d, QuantConv2d)):
        raise ValueError(f"{source}: module {name!r} is a {type(module).__name__}, not a convolution")
    try:
        config = QuantConfig.from_dict(entry["config"])
        geometry = ConvGeometry(tuple(entry["kernel"]), tuple(entry["stride"]), tuple(entry["padding"]),
                                tuple(entry["dilation"]), entry["groups"])
        shape = (entry["in_channels"], entry["out_channels"], bool(entry["bias"]))
        buffers = list(entry["buffers"])
        if not set(buffers) <= set(_OPTIONAL_BUFFERS):
            raise TypeError(f"unknown buffers {sorted(set(buffers) - set(_OPTIONAL_BUFFERS))}")
    except (KeyError, TypeError) as error:
        raise ValueError(f"{source}: the layout of {name!r} is incomplete ({error})") from None
    own_geometry = module.geometry if isinstance(module, QuantConv2d) else ConvGeometry.of(module)
    if (module.in_channels, module.out_channels) != shape[:2] or own_geometry != geometry:
        raise ValueError(f"{source}: {name!r} is a {module.in_channels}→{module.out_channels} convolution with "
                         f"{own_geometry} in the model, {shape[0]}→{shape[1]} with {geometry} in the file")
    own_bias = getattr(module, "bias", None)
    bias_dtype = None if own_bias is None else own_bias.dtype
    if tensors is not None and f"{name}.bias" in tensors:
        bias_dtype = tensors[f"{name}.bias"].dtype
    device = next(iter(module.buffers() if isinstance(module, QuantConv2d) else module.parameters())).device
    layer = QuantConv2d(shape[0], shape[1], geometry.kernel, geometry.stride, geometry.padding, geometry.dilation,
                        geometry.groups, shape[2], config, device=device, dtype=bias_dtype)
    for buffer in buffers:
        setattr(layer, buffer, torch.empty(_OPTIONAL_BUFFER_SHAPES[buffer](shape[1]),
                                           dtype=_OPTIONAL_BUFFER_DTYPES[buffer], device=device))
    return layer


def check_tensors(staged: nn.Module, specs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]], source: str,
                  keys: Optional[set] = None) -> None:
    """ValueError naming the first tensor the staged model lacks, does not expect, or expects in
    another shape or dtype; `specs`: the file's (shape, dtype) by name. Floating-point parameters
    may change precision, as loading casts them; quantized buffers and every integer tensor must
    match exactly. `keys`: check only these of the model's keys (and of the file's)."""
    expected = staged.state_dict()
    if keys is not None:
        expected = {key: value for key, value in expected.items() if key in keys}
        specs = {key: value for key, value in specs.items() if key in keys}
    missing = [key for key in expected if key not in specs]
    unexpected = [key for key in specs if key not in expected]
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model does not"
        raise ValueError(f"{source}: the file {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    quantized = {f"{name}.{buffer}" for name, module in staged.named_modules()
                 if isinstance(module, (QuantLinear, QuantConv2d))
                 for buffer, value in module._buffers.items() if value is not None}
    for key, want in expected.items():
        shape, dtype = specs[key]
        if tuple(shape) != tuple(want.shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(shape)}, the model expects {tuple(want.shape)}")
        castable = dtype.is_floating_point and want.is_floating_point() and key not in quantized
        if dtype != want.dtype and not castable:
            raise ValueError(f"{source}: {key!r} is {dtype}, the model expects {want.dtype}")
