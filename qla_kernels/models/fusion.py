"""Which blocks of a quantized model can run as fused blocks (nn/fused_block.py), found by
structure and confirmed numerically.

The architecture facts name each block's norms and linears; the template adds what the fused
chain assumes: pre-norm, one packed qkv linear whose parent module holds `num_heads`/`head_dim`,
a GELU (or ReLU) MLP, and nothing else on the residual branches (no LayerScale, no gate). Every
candidate is then checked on a real block input: the fused chain must reproduce the block's own
forward (the same QuantLinears run one by one). QLA adapters join the chain once lowered
(`methods.qla.fuse`): their down paths feed the low-rank segments of proj and fc2. A block that fails either test keeps its
QuantLinears and the report says why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..nn.adapters import DWSepAdapter, LoRAAdapter
from ..nn.fused_block import PackedQKVTemplate, fuse_block, unfuse_block
from ..ops.dispatch import use_backend
from .blocks import find_blocks
from .facts import BlockFacts, describe, example_input, run_hooked

# Relative error of the fused chain against the block's module-by-module forward above which the
# template is judged not to fit: per-token requantization of the same values can flip roundings
# (~1e-3 relative); a structural mismatch (a missed scale, a reordered norm) is far above it.
MATCH_TOLERANCE = 2e-2

_PASSIVE = (nn.Identity, nn.Dropout)


@dataclasses.dataclass
class FusionReport:
    fused: List[str]
    skipped: Dict[str, str]  # block name → why it keeps its QuantLinears


def _activation(mlp: nn.Module, linears: set) -> str:
    """The MLP's single activation, as fused_linear names it; ValueError for anything else inside."""
    found = []
    for name, child in mlp.named_children():
        if child in linears or isinstance(child, _PASSIVE):
            continue
        if isinstance(child, nn.GELU):
            found.append("gelu" if child.approximate == "none" else "gelu_tanh")
        elif isinstance(child, nn.ReLU):
            found.append("relu")
        else:
            raise ValueError(f"the MLP has a {type(child).__name__} ({name!r}) the fused chain would skip")
    if len(found) != 1:
        raise ValueError(f"the MLP needs exactly one GELU/ReLU activation, found {len(found)}")
    return found[0]


def _is_passive(module: nn.Module) -> bool:
    return isinstance(module, _PASSIVE) or "DropPath" in type(module).__name__


def template_for(block: nn.Module, facts: BlockFacts) -> PackedQKVTemplate:
    """The packed-qkv pre-norm template of `block`, or ValueError saying what does not fit."""
    if facts.norm_position != "pre":
        raise ValueError("post-norm blocks (BERT/RoBERTa) have no fused template yet")
    if facts.mlp_kind != "gelu_mlp" or len(facts.mlp_inputs) != 1:
        raise ValueError(f"{facts.mlp_kind} MLPs have no fused template yet")
    if len(facts.attention_inputs) != 1:
        raise ValueError(f"separate attention input linears {facts.attention_inputs} (packed qkv only so far)")
    qkv, proj = facts.attention_inputs[0], facts.attention_output
    attention = qkv.rpartition(".")[0]
    if not attention or proj.rpartition(".")[0] != attention:
        raise ValueError(f"qkv {qkv!r} and proj {proj!r} do not share an attention module")
    fc1, fc2 = facts.mlp_inputs[0], facts.mlp_output
    mlp = fc1.rpartition(".")[0]
    if not mlp or fc2.rpartition(".")[0] != mlp:
        raise ValueError(f"fc1 {fc1!r} and fc2 {fc2!r} do not share an MLP module")
    if getattr(block.get_submodule(attention), "gate", None) is not None:
        raise ValueError("gated attention has no fused template yet")
    linears = {block.get_submodule(name) for name in (fc1, fc2)}
    activation = _activation(block.get_submodule(mlp), linears)
    roots = {name.partition(".")[0] for name in (facts.attention_norm, attention, facts.mlp_norm, mlp)}
    lowered = getattr(block.get_submodule(proj), "lowered_adapter", None) is not None
    for name, child in block.named_children():
        if name in roots or _is_passive(child):
            continue
        if isinstance(child, (DWSepAdapter, LoRAAdapter)):
            if lowered:
                continue
            raise ValueError(f"{name!r}: QLA adapters run in the fused chain once lowered (methods.qla.fuse)")
        raise ValueError(f"{name!r} ({type(child).__name__}) acts on a residual branch the fused chain skips")
    return PackedQKVTemplate(facts.attention_norm, attention, qkv, proj, facts.mlp_norm, fc1, fc2, activation)


def _block_inputs(model: nn.Module, blocks: List[nn.Module], batch: Any) -> Dict[int, torch.Tensor]:
    inputs: Dict[int, torch.Tensor] = {}
    handles = [block.register_forward_pre_hook(
        lambda module, args, index=index: inputs.setdefault(index, args[0].detach().clone()))
        for index, block in enumerate(blocks)]
    run_hooked(model, batch, handles)
    return inputs


def _relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    reference, value = reference.float(), value.float()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


@torch.no_grad()
def _fuse_checked(block: nn.Module, facts: BlockFacts, x: Optional[torch.Tensor]) -> str:
    """Fuses `block` if it fits and reproduces its own forward on `x`; else says why not."""
    try:
        template = template_for(block, facts)
    except ValueError as reason:
        return str(reason)
    if x is None or x.dim() != 3:
        return "the example does not reach this block with [batch, tokens, width] input"
    expected = block(x)
    try:
        fuse_block(block, template)
    except ValueError as reason:
        return str(reason)
    if not block._fused_chain_applies(x, (), {}):
        unfuse_block(block)
        return "a module the fused chain bypasses carries hooks (observers), or the backend is 'simulate'"
    error = _relative_error(expected, block(x))
    if error > MATCH_TOLERANCE:
        unfuse_block(block)
        return f"the fused chain differs from the block's forward (relative error {error:.3g})"
    return ""


def fuse_blocks(model: nn.Module, example: Optional[Any] = None, backend: str = "auto") -> FusionReport:
    """Turns every block of a quantized `model` that fits a fused template into a fused block (in
    place). `example` is one input batch (built from the model's config when omitted); each block
    is checked on its input from that batch under `backend`. Call after quantization and after
    QwT lowering (`methods.qwt.lower`) and QLA lowering (`methods.qla.fuse`)."""
    example = example if example is not None else example_input(model)
    facts = describe(model, example)
    named = find_blocks(model)
    was_training = model.training
    model.eval()
    report = FusionReport([], {})
    try:
        with use_backend(backend):
            inputs = _block_inputs(model, [block for _, block in named], example)
            for index, (name, block) in enumerate(named):
                reason = _fuse_checked(block, facts.block, inputs.get(index))
                if reason:
                    report.skipped[name] = reason
                else:
                    report.fused.append(name)
    finally:
        model.train(was_training)
    return report
