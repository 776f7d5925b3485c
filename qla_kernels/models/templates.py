"""Which fused template a block of a quantized model fits, read off its structure (the
architecture facts of models/facts.py plus what each chain assumes), never off its class name:
pre-norm with one packed qkv linear whose parent holds the head count and nothing but LayerScales
on the residual branches (timm ViT / DeiT / Swin), post-norm with query/key/value in one attention
module (BERT / RoBERTa), or the model's own attention module between fused norms and MLP
(decoders, encoders with separate q/k/v). models/fusion.py confirms each candidate numerically."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..nn.adapters import DWSepAdapter, LoRAAdapter
from ..nn.fused import ACTIVATIONS, ModelAttentionTemplate, PackedQKVTemplate, PostNormTemplate, check_packable
from ..nn.module_kinds import is_any_linear, is_norm
from .facts import BlockFacts

_PASSIVE = (nn.Identity, nn.Dropout)


# Activation modules of model libraries by class name (Hugging Face transformers.activations), as
# fused_linear names them; the numerical check at fusion confirms each choice.
_LIBRARY_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                        "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "ReLUActivation": "relu",
                        "SiLUActivation": "silu", "BloomGelu": "gelu_tanh", "QuickGELUActivation": "quick_gelu"}


# The gated fused_linear activation act(gate)·up for a gated MLP's activation.
_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


def _activation_name(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.SiLU):
        return "silu"
    return _LIBRARY_ACTIVATIONS.get(type(module).__name__)


def mlp_activation(mlp: nn.Module, linears: set) -> str:
    """The MLP's single activation, as fused_linear names it; ValueError for anything else inside."""
    found = []
    for name, child in mlp.named_children():
        if child in linears or isinstance(child, _PASSIVE):
            continue
        activation = _activation_name(child)
        if activation is None:
            raise ValueError(f"the MLP has a {type(child).__name__} ({name!r}) the fused chain would skip")
        found.append(activation)
    if len(found) != 1:
        raise ValueError(f"the MLP needs exactly one GELU/ReLU activation, found {len(found)}")
    return found[0]


def _is_passive(module: nn.Module) -> bool:
    return isinstance(module, _PASSIVE) or "DropPath" in type(module).__name__


def _post_norm_template(block: nn.Module, facts: BlockFacts) -> PostNormTemplate:
    """BERT / RoBERTa: separate query/key/value sharing an attention module, each residual sum
    normalized by a LayerNorm, a one-activation MLP split over two modules."""
    if len(facts.attention_inputs) != 3:
        raise ValueError(f"post-norm attention needs query, key and value linears, found {facts.attention_inputs}")
    query, key, value = facts.attention_inputs
    attention = query.rpartition(".")[0]
    if not attention or {key.rpartition(".")[0], value.rpartition(".")[0]} != {attention}:
        raise ValueError(f"query/key/value {facts.attention_inputs} do not share an attention module")
    if facts.mlp_kind != "gelu_mlp" or len(facts.mlp_inputs) != 1 or facts.norm_kind != "layernorm":
        raise ValueError(f"post-norm blocks with a {facts.mlp_kind} MLP / {facts.norm_kind} have no fused template")
    fc1 = facts.mlp_inputs[0]
    fc1_parent = block.get_submodule(fc1.rpartition(".")[0])
    activation = mlp_activation(fc1_parent, {block.get_submodule(fc1), block.get_submodule(facts.mlp_output)})
    chain = {block.get_submodule(name) for name in (*facts.attention_inputs, facts.attention_output, facts.mlp_norm,
                                                     fc1, facts.mlp_output, facts.output_norm)}
    lowered = getattr(block.get_submodule(facts.attention_output), "lowered_adapter", None) is not None
    adapters = {sub for child in block.children() if isinstance(child, (DWSepAdapter, LoRAAdapter))
                for sub in child.modules()}
    for name, child in block.named_modules():
        if child in chain or next(child.children(), None) is not None:
            continue
        if child in adapters:
            if lowered:
                continue
            raise ValueError(f"{name!r}: QLA adapters run in the fused chain once lowered (methods.qla.fuse)")
        if next(child.parameters(recurse=False), None) is not None:
            raise ValueError(f"{name!r} ({type(child).__name__}) has weights the fused chain would skip")
    return PostNormTemplate(attention, query, key, value, facts.attention_output, facts.mlp_norm, fc1,
                            facts.mlp_output, facts.output_norm, activation,
                            bool(_packable(block, facts.attention_inputs)))


def _packable(block: nn.Module, names: Tuple[str, ...]) -> Tuple[str, ...]:
    """`names` when they are separate projections of one input that can run as one packed GEMM
    (LLaMA's q/k/v, SwiGLU's gate and up), else ()."""
    if len(names) < 2:
        return ()
    try:
        check_packable([block.get_submodule(name) for name in names])
    except ValueError:
        return ()
    return names


def template_for(block: nn.Module, facts: BlockFacts):
    """The fused template of `block` (PackedQKVTemplate for pre-norm packed-qkv blocks,
    ModelAttentionTemplate for causal pre-norm ones and those with separate q/k/v, PostNormTemplate
    for BERT-style ones), or ValueError saying what does not fit."""
    if facts.norm_position == "post":
        return _post_norm_template(block, facts)
    proj = facts.attention_output
    attention = facts.attention_inputs[0].rpartition(".")[0]
    if not attention or any(name.rpartition(".")[0] != attention for name in (*facts.attention_inputs, proj)):
        raise ValueError(f"attention linears {(*facts.attention_inputs, proj)} do not share an attention module")
    fc2 = facts.mlp_output
    mlp = fc2.rpartition(".")[0]
    causal = getattr(block.get_submodule(attention), "is_causal", False)
    # Decoders, and encoders with separate q/k/v (HF ViT, CLIP), run the model's own attention module.
    own_attention = causal or len(facts.attention_inputs) > 1
    if any(name.rpartition(".")[0] != mlp for name in facts.mlp_inputs) or not (mlp or own_attention):
        raise ValueError(f"MLP linears {(*facts.mlp_inputs, fc2)} do not share an MLP module")
    if getattr(block.get_submodule(attention), "gate", None) is not None:
        raise ValueError("gated attention has no fused template yet")
    known = {block.get_submodule(name) for name in (*facts.attention_inputs, proj)}
    others = [name for name, module in block.get_submodule(attention).named_modules()
              if is_any_linear(module) and module not in known]
    if others and not own_attention:  # talking heads (CaiT), relative-position MLPs: work the chain would skip
        raise ValueError(f"the attention module has other linears {others} the fused chain would skip")
    linears = {block.get_submodule(name) for name in (*facts.mlp_inputs, fc2)}
    if mlp:
        mlp_module, mlp_parts, not_activations = block.get_submodule(mlp), {mlp}, linears
    else:  # MLP linears and activation are the block's own children (OPT)
        mlp_module = block
        not_activations = linears | {block.get_submodule(name) for name in (facts.attention_norm, attention,
                                                                             facts.mlp_norm)}
        not_activations |= {child for child in block.children() if isinstance(child, (DWSepAdapter, LoRAAdapter))}
        mlp_parts = {*facts.mlp_inputs, fc2, *(name for name, child in block.named_children()
                                               if child not in not_activations and _activation_name(child))}
    scales = _layer_scales(block, facts, block.get_submodule(proj).out_features)
    if scales[1] and getattr(block.get_submodule(fc2), "lowered_qwt", None) is not None:
        raise ValueError(f"{fc2!r} carries a lowered QwT compensation, which its LayerScale would scale")
    _check_residual_branches(block, {facts.attention_norm, attention, facts.mlp_norm, *mlp_parts, *filter(None, scales)},
                             proj)
    if own_attention:
        activation = mlp_activation(mlp_module, not_activations)
        fc1 = block.get_submodule(facts.mlp_inputs[0])
        # One linear producing [gate | up] (Phi-3's gate_up_proj) is a gated MLP with its inputs
        # already packed; the numerical check at fusion confirms the halves' order.
        gate_up = len(facts.mlp_inputs) == 1 and fc1.out_features == 2 * block.get_submodule(fc2).in_features
        if facts.mlp_kind == "swiglu" or (activation in _GATED and gate_up):
            if activation not in _GATED:
                raise ValueError(f"a two-input MLP with a {activation} activation has no fused template")
            activation = _GATED[activation]
        return ModelAttentionTemplate(facts.attention_norm, attention, proj, facts.mlp_norm, facts.mlp_inputs, fc2,
                                      activation, len(facts.mlp_inputs) == 2 and bool(_packable(block, facts.mlp_inputs)),
                                      _packable(block, facts.attention_inputs), *scales)
    if facts.mlp_kind != "gelu_mlp" or len(facts.mlp_inputs) != 1:
        raise ValueError(f"{facts.mlp_kind} MLPs in non-causal pre-norm blocks have no fused template yet")
    activation = mlp_activation(block.get_submodule(mlp), linears)
    if activation not in ACTIVATIONS:
        raise ValueError(f"a {activation} MLP has no fused template")
    return PackedQKVTemplate(facts.attention_norm, attention, facts.attention_inputs[0], proj, facts.mlp_norm,
                             facts.mlp_inputs[0], fc2, activation, *scales)


@torch.no_grad()
def _is_layer_scale(module: nn.Module, width: int) -> bool:
    """A leaf module computing x·γ with its one parameter γ [width] (timm's LayerScale, DINOv2's),
    confirmed on a probe."""
    parameters = list(module.parameters())
    if (is_norm(module) or next(module.children(), None) is not None or next(module.buffers(), None) is not None
            or len(parameters) != 1 or parameters[0].shape != (width,)):
        return False  # (a QuantLinear's only parameter is its bias; its weight is buffers)
    probe = torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(parameters[0])
    expected = probe * parameters[0]
    try:  # forward, not __call__: hooks on the module (QLA's, observers) must not see the probe
        return torch.allclose(module.forward(probe.clone()), expected)
    except (RuntimeError, TypeError, ValueError):
        return False


def _layer_scales(block: nn.Module, facts: BlockFacts, width: int) -> Tuple[str, str]:
    """(LayerScale after the attention, LayerScale after the MLP) among the block's children, ""
    where there is none: one registered before the MLP's norm scales the attention branch, one
    after it the MLP branch (the order a block's forward uses them; the numerical check at fusion
    confirms it)."""
    children = [name for name, _ in block.named_children()]
    mlp_norm_position = children.index(facts.mlp_norm.partition(".")[0])
    found = ["", ""]
    for position, (name, child) in enumerate(block.named_children()):
        if _is_layer_scale(child, width):
            branch = 0 if position < mlp_norm_position else 1
            if found[branch]:
                raise ValueError(f"two LayerScale modules on one residual branch: {found[branch]!r}, {name!r}")
            found[branch] = name
    return found[0], found[1]


def _check_residual_branches(block: nn.Module, parts: set, proj: str) -> None:
    """Nothing but the named parts (and dropout / drop-path, and lowered QLA adapters, whose T the
    chain computes) may act on the block's residual branches."""
    roots = {name.partition(".")[0] for name in parts}
    lowered = getattr(block.get_submodule(proj), "lowered_adapter", None) is not None
    for name, child in block.named_children():
        if name in roots or _is_passive(child):
            continue
        if isinstance(child, (DWSepAdapter, LoRAAdapter)):
            if lowered:
                continue
            raise ValueError(f"{name!r}: QLA adapters run in the fused chain once lowered (methods.qla.fuse)")
        raise ValueError(f"{name!r} ({type(child).__name__}) acts on a residual branch the fused chain skips")
