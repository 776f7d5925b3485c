"""Fusion is a change of the block's class, not of its module tree: `fuse_block` swaps the class
for a subclass whose forward runs the chain on the block's own QuantLinears and norms, so every
name, the state dict, checkpoints and hooks on the block stay as they were. The subclass is made
once per (block class, template mixin), since the block classes are the model library's; it
pickles as the two classes it is made of (chain.FusedModule).

In the calibration form the block runs its original forward (the same QuantLinears one by one)
whenever the chain would not be the same computation: under the `simulate` backend (calibration
and training need the differentiable module tree), in training mode, with arguments the chain
does not take, or when a module the chain bypasses carries hooks (QLA adapters not yet lowered,
observers). Converted for runtime (`convert_for_runtime`) it raises instead.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ...ops.reference import GATED_ACTIVATIONS
from ...ops.row_maps import RowMap
from ..adapters import DWSepAdapter, LoRAAdapter
from ..module_kinds import read_norm
from ..quant_linear import QuantLinear
from .chain import bypassed_modules, fused_class
from .mlp import FusedMLP
from .model_attention import FusedModelAttentionBlock
from .packed_qkv import FusedPackedQKVBlock
from .packing import check_packable
from .post_norm import FusedPostNormBlock
from .templates import (
    ACTIVATIONS,
    MLPTemplate,
    ModelAttentionTemplate,
    PackedQKVTemplate,
    PostNormTemplate,
    WindowLayout,
    attention_heads,
)


def fuse_mlp(mlp: nn.Module, template: MLPTemplate) -> nn.Module:
    """Makes the MLP module run fc1 → activation → fc2 fused (in place; returns it). ValueError when
    its linears are not activation-quantized QuantLinears or fc1 carries a lowered correction."""
    if isinstance(mlp, FusedMLP):
        raise ValueError(f"{type(mlp).__name__} is already fused")
    if template.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {template.activation!r}")
    for name in template.linears():
        layer = mlp.get_submodule(name)
        if not isinstance(layer, QuantLinear) or layer.config.act_bits is None:
            raise ValueError(f"{name!r} must be a QuantLinear with activation quantization, got {layer!r}")
    fc1 = mlp.get_submodule(template.fc1)
    if getattr(fc1, "lowered_qwt", None) is not None or getattr(fc1, "lowered_adapter", None) is not None:
        raise ValueError(f"{template.fc1!r} carries a lowered correction; only fc2 may")
    return _swap_class(mlp, template)


_FUSED_MIXINS = {PackedQKVTemplate: FusedPackedQKVBlock, PostNormTemplate: FusedPostNormBlock,
                 ModelAttentionTemplate: FusedModelAttentionBlock, MLPTemplate: FusedMLP}
FUSED_BLOCK_TYPES = (FusedPackedQKVBlock, FusedPostNormBlock, FusedModelAttentionBlock)
FUSED_MODULE_TYPES = FUSED_BLOCK_TYPES + (FusedMLP,)  # every mixin fuse_block / fuse_mlp puts in front


def original_class(module: nn.Module) -> type:
    """The class a fused block (or fused MLP) had before `fuse_block` put its mixin in front of it
    (the fused class's second base; its MRO also holds the mixin's own bases); a module that is
    not fused keeps its class."""
    cls = type(module)
    return cls.__bases__[1] if issubclass(cls, FUSED_MODULE_TYPES) else cls


def fuse_block(block: nn.Module, template, windows: Optional[WindowLayout] = None) -> nn.Module:
    """Makes `block` run the fused chain of `template` (a PackedQKVTemplate, PostNormTemplate or
    ModelAttentionTemplate; in place; returns it); `windows` for a packed-qkv block with windowed
    attention (Swin). Raises ValueError naming what does not fit: every linear must be an
    activation-quantized QuantLinear (decoders also take W4A16), the norms must compute what the
    pre-kernels do (`read_norm`), the attention module must expose its head count, only the last
    linear may carry a lowered QwT, lowered adapters need the block's own adapters, and packed
    groups must quantize their input alike."""
    if isinstance(block, FUSED_BLOCK_TYPES):
        raise ValueError(f"{type(block).__name__} is already fused")
    if windows is not None:
        if not isinstance(template, PackedQKVTemplate):
            raise ValueError(f"windowed attention needs a PackedQKVTemplate, got {type(template).__name__}")
        windows.check()
    if template.activation not in ACTIVATIONS and not isinstance(template, ModelAttentionTemplate):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {template.activation!r}")
    post_norm, decoder = isinstance(template, PostNormTemplate), isinstance(template, ModelAttentionTemplate)
    for name in (template.norm1, template.norm2):
        read_norm(block.get_submodule(name))
    proj, fc2 = ((template.attention_output, template.mlp_output) if decoder else (template.proj, template.fc2))
    for name in template.linears() + ((template.attention_output,) if decoder else ()):
        layer = block.get_submodule(name)
        if not isinstance(layer, QuantLinear) or (layer.config.act_bits is None and not decoder):
            raise ValueError(f"{name!r} must be a QuantLinear with activation quantization, got {layer!r}")
        if name != fc2 and getattr(layer, "lowered_qwt", None) is not None:
            raise ValueError(f"{name!r} carries a lowered QwT compensation; only the block's last linear may")
        if name not in (proj, fc2) and getattr(layer, "lowered_adapter", None) is not None:
            raise ValueError(f"{name!r} carries a lowered adapter; the chain runs them on proj and fc2 only")
    if getattr(block.get_submodule(proj), "lowered_adapter", None) is not None and not isinstance(
            getattr(block, "qla_attention", None), DWSepAdapter):
        raise ValueError(f"{proj!r} carries a lowered adapter but the block has no qla_attention adapter")
    if getattr(block.get_submodule(fc2), "lowered_adapter", None) is not None and not isinstance(
            getattr(block, "qla_ffn", None), LoRAAdapter):
        raise ValueError(f"{fc2!r} carries a lowered adapter but the block has no qla_ffn adapter")
    if decoder:
        gated = template.activation in GATED_ACTIVATIONS
        if template.activation not in ACTIVATIONS + GATED_ACTIVATIONS or (len(template.mlp_inputs) == 2 and not gated):
            raise ValueError(f"activation {template.activation!r} does not fit MLP inputs {template.mlp_inputs}")
        check_packable([block.get_submodule(name) for name in template.packed_attention_inputs])
        if template.packed_mlp_inputs:
            if len(template.mlp_inputs) != 2:
                raise ValueError("only a gated MLP's gate and up run as one packed GEMM")
            check_packable([block.get_submodule(name) for name in template.mlp_inputs])
        _swap_class(block, template)
        block.pack()
        return block
    attention = block.get_submodule(template.attention)
    query = block.get_submodule(template.query if post_norm else template.qkv)
    heads, head_dim = attention_heads(attention, query.out_features // (1 if post_norm else 3))
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ValueError(f"{template.attention!r} ({type(attention).__name__}) has no int head count / head size")
    if post_norm and template.packed_qkv:
        check_packable([block.get_submodule(name) for name in template.packed_groups()[0]])
    projections = (template.query, template.key, template.value) if post_norm else (template.qkv,)
    width = heads * head_dim * (1 if post_norm else 3)
    for name in projections:
        if block.get_submodule(name).out_features != width:
            raise ValueError(f"{name!r} does not produce {'' if post_norm else 'packed q, k, v for '}{heads} heads "
                             f"of {head_dim}")
    _swap_class(block, template)
    if post_norm:
        block.pack()
    if windows is not None:
        device = block.get_submodule(template.qkv).weight_scale.device
        block._qla_window_grid, block._qla_window_tokens = tuple(windows.grid), windows.window_tokens
        window_map = RowMap.build(windows.rows, windows.grid[0] * windows.grid[1])
        block.register_buffer("_qla_window_rows", window_map.indices.to(device), persistent=False)
        block.register_buffer("_qla_window_mask", None if windows.mask is None else windows.mask.to(device),
                              persistent=False)
    return block


def _swap_class(block: nn.Module, template) -> nn.Module:
    block.__class__ = fused_class(type(block), _FUSED_MIXINS[type(template)])
    block._qla_template = template
    block._qla_bypassed = bypassed_modules(block, template.bypassed())
    return block


def unfuse_block(block: nn.Module) -> nn.Module:
    """Restores the block's (or fused MLP's) original class (in place; returns it)."""
    if not isinstance(block, FUSED_MODULE_TYPES):
        raise ValueError(f"{type(block).__name__} is not a fused block")
    block.__class__ = original_class(block)
    del block._qla_template
    for name in ("_qla_bypassed", "_qla_returns_tuple", "_qla_window_grid", "_qla_window_tokens", "_qla_packed",
                 "_qla_packed_quantization", "_qla_warned_stale", "_qla_plans"):
        block.__dict__.pop(name, None)
    for name in ("_qla_window_rows", "_qla_window_mask"):
        block._buffers.pop(name, None)
    return block
