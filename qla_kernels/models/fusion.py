"""Which blocks of a quantized model can run as fused blocks (nn/fused/), found by
structure and confirmed numerically.

The architecture facts name each block's norms and linears; the template adds what the fused
chain assumes. Pre-norm (timm ViT/DeiT): one packed qkv linear whose parent module holds the head
count, a GELU (or ReLU) MLP, and nothing else on the residual branches but LayerScales (x·γ,
recognised on a probe; γ folds into the GEMM before it);
with [B, H, W, C] input (Swin) the window order is read off the block by a probe and the mask it
hands its attention is recorded. Post-norm (BERT/RoBERTa): query/key/value in one attention
module, a LayerNorm after each residual add, a one-activation MLP. Decoders (GPT-2/LLaMA), and
encoders with separate q/k/v (HF ViT, DeiT): the attention runs as the model's own module (its
q/k/v as one packed GEMM handed over), norms and MLP fused. Every candidate is then checked on
a real block input: the fused chain must reproduce the block's own forward (the same QuantLinears
run one by one). QLA adapters join the chain once lowered (`methods.qla.fuse`): their down paths
feed the low-rank segments of proj and fc2. A block that fails either test keeps its QuantLinears
(its MLP alone may still fuse) and the report says why."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn.adapters import DWSepAdapter, LoRAAdapter, window_rows
from ..nn.fused import (
    ACTIVATIONS,
    FUSED_MODULE_TYPES,
    ModelAttentionTemplate,
    MLPTemplate,
    PackedQKVTemplate,
    PostNormTemplate,
    WindowLayout,
    check_packable,
    fuse_block,
    fuse_mlp,
    unfuse_block,
)
from ..nn.module_kinds import is_any_linear, is_norm
from ..ops.dispatch import use_backend
from .blocks import find_blocks
from .facts import BlockFacts, describe_block, example_input, run_hooked, without_kv_cache

# Relative error of the fused chain against the block's module-by-module forward above which the
# template is judged not to fit: per-token requantization of the same values can flip roundings
# (~1e-3 relative); a structural mismatch (a missed scale, a reordered norm) is far above it.
MATCH_TOLERANCE = 2e-2

_PASSIVE = (nn.Identity, nn.Dropout)


@dataclasses.dataclass
class FusionReport:
    fused: List[str]
    skipped: Dict[str, str]  # block name → why no block template fits it
    fused_mlps: List[str] = dataclasses.field(default_factory=list)  # MLPs fused inside skipped blocks


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


def _activation(mlp: nn.Module, linears: set) -> str:
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
    activation = _activation(fc1_parent, {block.get_submodule(fc1), block.get_submodule(facts.mlp_output)})
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
        activation = _activation(mlp_module, not_activations)
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
    activation = _activation(block.get_submodule(mlp), linears)
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


BlockCall = Tuple[torch.Tensor, tuple, dict]


def block_inputs(model: nn.Module, blocks: List[nn.Module], batch: Any) -> Dict[int, BlockCall]:
    """Each block's first call on `batch`: (hidden states, other positional arguments, keyword
    arguments), with KV caches dropped so that re-running a block leaves them untouched."""
    inputs: Dict[int, BlockCall] = {}

    def record(index, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and index not in inputs:
            rest, kwargs = without_kv_cache(args[1:], kwargs)
            inputs[index] = (args[0].detach().clone(), rest, kwargs)

    handles = [block.register_forward_pre_hook(
        lambda module, args, kwargs, index=index: record(index, args, kwargs), with_kwargs=True)
        for index, block in enumerate(blocks)]
    run_hooked(model, batch, handles)
    return inputs


def _relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    reference, value = reference.float(), value.float()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def _window_layout(block: nn.Module, template: PackedQKVTemplate, call: BlockCall):
    """(the block's output on `call`, its WindowLayout): the window order read off the block by a
    probe (nn.adapters.window_rows), the window size and mask from what the block hands its
    attention module on this call."""
    x, args, kwargs = call
    height, width, dim = x.shape[1:]
    rows = window_rows(block, template.norm1, template.qkv, height, width, dim)
    seen = {}

    def capture(module, module_args, module_kwargs):
        if "tokens" not in seen:
            seen["tokens"] = module_args[0].shape[-2]
            seen["mask"] = module_kwargs.get("mask", module_args[1] if len(module_args) > 1 else None)

    handle = block.get_submodule(template.attention).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        expected = block(x, *args, **kwargs)
    finally:
        handle.remove()
    mask = seen.get("mask")
    if "tokens" not in seen or (mask is not None and not isinstance(mask, torch.Tensor)):
        raise ValueError("the windowed attention module was not called with [windows, tokens, dim] input and a mask")
    return expected, WindowLayout((height, width), rows, seen["tokens"], mask)


@torch.no_grad()
def _fuse_checked(block: nn.Module, facts: BlockFacts, call: Optional[BlockCall]) -> str:
    """Fuses `block` if it fits and reproduces its own forward on its example call; else says why not."""
    try:
        template = template_for(block, facts)
    except ValueError as reason:
        return str(reason)
    if call is None or call[0].dim() not in (3, 4):
        return "the example does not reach this block with [batch, tokens, width] or [batch, height, width, dim] input"
    x, args, kwargs = call
    windows = None
    if x.dim() == 4:
        if not isinstance(template, PackedQKVTemplate):
            return "[batch, height, width, dim] input needs packed-qkv windowed attention"
        try:
            expected, windows = _window_layout(block, template, call)
        except ValueError as reason:
            return str(reason)
    else:
        expected = block(x, *args, **kwargs)
    returns_tuple = isinstance(expected, tuple)
    if returns_tuple:  # older transformers layers return (hidden_states, ...)
        if len(expected) != 1 or isinstance(template, ModelAttentionTemplate):
            return (f"the block returns a {len(expected)}-tuple; the fused chain returns the hidden states (newer "
                    "transformers)")
        expected = expected[0]
    try:
        fuse_block(block, template, windows)
    except ValueError as reason:
        return str(reason)
    reason = block.why_not_fused(x, args, kwargs)
    if reason:
        unfuse_block(block)
        return reason
    block._qla_returns_tuple = returns_tuple
    try:
        fused = block(x, *args, **kwargs)
    except (RuntimeError, ValueError, TypeError) as reason:  # an attention module that does not call packed
        # q/k/v, or does not take the block's arguments (CaiT's class attention: x_cls)
        unfuse_block(block)
        return f"the fused chain fails on this block: {reason}"
    error = _relative_error(expected, fused[0] if isinstance(fused, tuple) else fused)
    if error > MATCH_TOLERANCE:
        unfuse_block(block)
        return f"the fused chain differs from the block's forward (relative error {error:.3g})"
    return ""


@torch.no_grad()
def _fuse_mlp_checked(block: nn.Module, facts: BlockFacts, call: Optional[BlockCall]) -> str:
    """In a block no block template fits: fuses its fc1 → activation → fc2 MLP module if it has one
    and the block's output on its example call stays the same. Returns the MLP's name, or ""."""
    mlp_name, _, fc2 = facts.mlp_output.rpartition(".")
    if call is None or not mlp_name or len(facts.mlp_inputs) != 1:
        return ""
    fc1_parent, _, fc1 = facts.mlp_inputs[0].rpartition(".")
    if fc1_parent != mlp_name:
        return ""
    mlp = block.get_submodule(mlp_name)
    x, args, kwargs = call
    calls = []
    try:
        activation = _activation(mlp, {mlp.get_submodule(fc1), mlp.get_submodule(fc2)})
        handle = mlp.register_forward_pre_hook(lambda module, a, k: calls.append((a, k)), with_kwargs=True)
        try:
            expected = block(x, *args, **kwargs)
        finally:
            handle.remove()
        if len(calls) != 1 or len(calls[0][0]) != 1 or calls[0][1]:
            return ""  # the fused MLP takes the hidden states alone (Bloom's also takes the residual)
        fuse_mlp(mlp, MLPTemplate(fc1, fc2, activation))
    except ValueError:
        return ""
    fused = block(x, *args, **kwargs)
    primary = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    hidden = calls[0][0][0]
    if mlp.why_not_fused(hidden, (), {}) or _relative_error(primary(expected), primary(fused)) > MATCH_TOLERANCE:
        unfuse_block(mlp)
        return ""
    return mlp_name


def _unfuse(block: nn.Module) -> None:
    for module in block.modules():
        if isinstance(module, FUSED_MODULE_TYPES):
            unfuse_block(module)


def fuse_blocks(model: nn.Module, example: Optional[Any] = None, backend: str = "auto") -> FusionReport:
    """Turns every block of a quantized `model` that fits a fused template into a fused block (in
    place); in the blocks that do not fit, an fc1 → activation → fc2 MLP is fused on its own.
    `example` is one input batch (built from the model's config when omitted); each block is
    checked on its input from that batch under `backend`. Call after quantization, calibration,
    QwT lowering (`methods.qwt.lower`) and QLA lowering (`methods.qla.fuse`); calling it again
    (after any of them) fuses the blocks anew."""
    example = example if example is not None else example_input(model)
    named = find_blocks(model)
    was_training = model.training
    model.eval()
    report = FusionReport([], {})
    facts_by_class: Dict[type, Any] = {}  # blocks of one class share their facts (CaiT has two classes)
    try:
        with use_backend(backend):
            inputs = block_inputs(model, [block for _, block in named], example)
            for index, (name, block) in enumerate(named):
                _unfuse(block)  # fusing again re-derives every template from the model as it is now
                if type(block) not in facts_by_class:
                    try:
                        facts_by_class[type(block)] = describe_block(model, name, block, example)[0]
                    except ValueError as reason:  # parallel attention and MLP, no norms, ...
                        facts_by_class[type(block)] = f"no block template: {reason}"
                facts = facts_by_class[type(block)]
                if isinstance(facts, str):
                    report.skipped[name] = facts
                    continue
                reason = _fuse_checked(block, facts, inputs.get(index))
                if not reason:
                    report.fused.append(name)
                    continue
                report.skipped[name] = reason
                mlp = _fuse_mlp_checked(block, facts, inputs.get(index))
                if mlp:
                    report.fused_mlps.append(f"{name}.{mlp}")
    finally:
        model.train(was_training)
    return report
