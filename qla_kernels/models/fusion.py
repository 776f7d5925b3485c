"""Which blocks of a quantized model run as fused blocks (nn/fused/): each candidate template
(models/templates.py, read off the structure) is confirmed numerically on a real block input:
the fused chain must reproduce the block's own forward (the same QuantLinears run one by one).
With [B, H, W, C] input (Swin) the window order is read off the block by a probe and the mask it
hands its attention is recorded. QLA adapters join the chain once lowered (`methods.qla.fuse`):
their down paths feed the low-rank segments of proj and fc2. A block that fails keeps its
QuantLinears (its MLP alone may still fuse) and the report says why."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn.adapters import window_rows
from ..nn.quant_linear import QuantLinear
from ..nn.fused import (
    FUSED_MODULE_TYPES,
    ModelAttentionTemplate,
    MLPTemplate,
    PackedQKVTemplate,
    WindowLayout,
    fuse_block,
    fuse_mlp,
    unfuse_block,
)
from ..ops.dispatch import resolve_backend, use_backend
from .blocks import find_blocks
from .facts import BlockFacts, describe_block, example_input, run_hooked, without_kv_cache
from .templates import mlp_activation, template_for

# Relative error of the fused chain against the block's module-by-module forward above which the
# template is judged not to fit: per-token requantization of the same values can flip roundings
# (~1e-3 relative); a structural mismatch (a missed scale, a reordered norm) is far above it.
MATCH_TOLERANCE = 2e-2



@dataclasses.dataclass
class FusionReport:
    fused: List[str]
    skipped: Dict[str, str]  # block name → why no block template fits it
    fused_mlps: List[str] = dataclasses.field(default_factory=list)  # MLPs fused inside skipped blocks


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
    if _rotation_not_fused(block):
        return ("its linears rotate their activations (rotate='hadamard'): the cuda backend's fused chains do not "
                "rotate (the triton, cpu and reference ones do)")
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
    if call is None or not mlp_name or len(facts.mlp_inputs) != 1 or _rotation_not_fused(block):
        return ""
    fc1_parent, _, fc1 = facts.mlp_inputs[0].rpartition(".")
    if fc1_parent != mlp_name:
        return ""
    mlp = block.get_submodule(mlp_name)
    x, args, kwargs = call
    calls = []
    try:
        activation = mlp_activation(mlp, {mlp.get_submodule(fc1), mlp.get_submodule(fc2)})
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


def refuse_task_loras(model: nn.Module) -> None:
    """ValueError when a QuantLinear of `model` carries task LoRAs (nn/task_lora.py): the fused
    chains build T for the block's own corrections only."""
    with_loras = [name for name, module in model.named_modules() if isinstance(module, QuantLinear) and module.task_loras]
    if with_loras:
        raise ValueError(f"{with_loras[0]!r} carries task LoRAs, which fused blocks do not run: unload_lora them "
                         "first, or convert without an example (convert_for_runtime(model))")


def _rotation_not_fused(block: nn.Module) -> bool:
    """Whether `block` rotates activations on a backend whose fused chains do not: the cuda
    backend's pre-kernels do not rotate (its chains would run those ops on the reference)."""
    rotating = [module for module in block.modules() if isinstance(module, QuantLinear) and module.config.rotate]
    return bool(rotating) and resolve_backend(rotating[0].weight.device) == "cuda"


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
    refuse_task_loras(model)
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
