"""`convert_for_runtime`: a calibrated quantized model's runtime form, made once and one way.

The calibration form (after `quantize_`) assembles every GEMM's operands per call, because
methods change them (scales, adapters, compensations) and run under `simulate`. The runtime
form freezes them: every QuantLinear holds a validated `LinearPlan` (ops/linear_plan.py), and
with an example every block that fits a template runs its fused chain from frozen plans. A
runtime forward prepares only what depends on its input, keeps no state on modules
(nn/forward_context.py), and raises where the calibration form would quietly run something else
(training mode, `simulate`, a fused chain that does not apply to a call).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn.compensation import attach, compensated_blocks, lower_into_linear, primary_output
from ..nn.fused import FUSED_MODULE_TYPES
from ..nn.quant_conv import QuantConv2d
from ..nn.quant_linear import QuantLinear
from ..ops.dispatch import use_backend
from .conv_blocks import fuse_residual_convs
from .conv_epilogues import fold_conv_epilogues
from .facts import describe
from .fusion import FusionReport, block_inputs, fuse_blocks, refuse_task_loras

LOWERING_TOLERANCE = 1e-4  # relative to the block output's max: summation order passes, a wrong placement does not


@dataclasses.dataclass
class RuntimeReport:
    """What `convert_for_runtime` did beyond freezing every QuantLinear."""

    fusion: Optional[FusionReport]  # which blocks run fused (None without an example)
    lowered_qwt: List[str] = dataclasses.field(default_factory=list)  # linears running a block's QwT
    hooked_qwt: Dict[str, str] = dataclasses.field(default_factory=dict)  # block → why its QwT stays a hook
    # convolution → the modules after it folded into its epilogue (BatchNorm, activation)
    folded_into_convs: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    residual_blocks: Dict[str, str] = dataclasses.field(default_factory=dict)  # block → fused, or why not


@torch.no_grad()
def lower_qwt(model: nn.Module, batch: Any, strict: bool = True) -> Tuple[List[str], Dict[str, str]]:
    """Runs each block's QwT compensation inside the GEMM of the block's last linear (the MLP
    output): (x·V)·Uᵀ in its low-rank segment after `truncate`, else x·Wᵀ in its full-rank
    segment; the compensation bias joins the linear's bias. `batch` finds the linears
    (`describe`) and checks each block: its output on the block input the batch produces must
    not change (a LayerScale between that linear and the residual add would change it); such a
    block keeps its hook-based compensation. Returns (the linears lowered, block → why not).
    `strict`: any block that does not lower is a ValueError, and then no block is lowered."""
    blocks = list(compensated_blocks(model))
    if not blocks:
        raise ValueError("the model has no QwT compensation to lower (run qwt.calibrate first)")
    try:
        facts = describe(model, batch)
    except ValueError as reason:  # no MLP output linear to find (GPT-J's parallel attention and MLP)
        if strict:
            raise
        return [], {name: f"the block's last linear cannot be found: {reason}" for name, _ in blocks}
    was_training = model.training
    model.eval()
    lowered = []  # (block, linear, compensation, the linear's bias before): what undoes each
    kept: Dict[str, str] = {}
    try:
        with use_backend("simulate"):
            calls = block_inputs(model, [block for _, block in blocks], batch)
            for index, (name, block) in enumerate(blocks):
                linear_name = f"{name}.{facts.block.mlp_output}"
                linear = block.get_submodule(facts.block.mlp_output)
                if not isinstance(linear, QuantLinear):
                    kept[name] = f"{linear_name} is a {type(linear).__name__}, not a QuantLinear"
                    continue
                if index not in calls:
                    kept[name] = "the batch does not reach this block"
                    continue
                x, args, kwargs = calls[index]
                before = primary_output(block(x, *args, **kwargs)).float()
                lowered.append((block, linear, block.qwt, None if linear.bias is None else linear.bias.detach().clone()))
                lower_into_linear(block, linear)
                after = primary_output(block(x, *args, **kwargs)).float()
                if float((after - before).abs().max()) > LOWERING_TOLERANCE * float(before.abs().max()):
                    _unlower(*lowered.pop())
                    kept[name] = (f"lowering QwT into {linear_name} changes the block's output: something other "
                                  "than a plain residual add follows that linear")
        if strict and kept:
            name, why = next(iter(kept.items()))
            raise ValueError(f"{name}: {why}; keep the hook-based compensation for this model")
    except BaseException:
        for undo in reversed(lowered):  # nothing half-done
            _unlower(*undo)
        raise
    finally:
        model.train(was_training)
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(linear)] for _, linear, _, _ in lowered], kept


def _unlower(block: nn.Module, linear: QuantLinear, compensation, bias: Optional[torch.Tensor]) -> None:
    del linear.lowered_qwt
    if bias is None:
        linear.bias = None
    else:
        linear.bias.data.copy_(bias)
    attach(block, compensation)


def convert_for_runtime(model: nn.Module, example: Optional[Any] = None, backend: str = "auto") -> RuntimeReport:
    """Converts a quantized (and calibrated) `model` to its runtime form, in place.

    Level one, always (no example needed: what loaders call): every QuantLinear and
    QuantConv2d freezes its operands, each validated once. Level two, with `example` (one input
    batch): each convolution's following BatchNorm and activation are folded into its epilogue
    (`models.conv_epilogues`, found on `example`); QwT compensations still attached as hooks are
    lowered into their blocks' last GEMM where that is the same computation (`lower_qwt`), then
    `fuse_blocks` (checked on `example` under `backend`); then each residual block's shortcut add
    and activation (and its convolutional QwT) join its last convolution's epilogue
    (`models.conv_blocks`, checked on `example`), and every fused block freezes its chain. Lower
    QLA adapters (`methods.qla.fuse`)
    before. Casts and moves afterwards (`.to`, `.half`) rebuild the plans. ValueError when the
    model has no QuantLinear or QuantConv2d, is already converted, or a layer's operands do not fit; then no
    layer is converted (lowerings and fusions done by then stay: both are calibration-form
    steps too)."""
    layers = [module for module in model.modules() if isinstance(module, (QuantLinear, QuantConv2d))]
    if not layers:
        raise ValueError("the model has no QuantLinear or QuantConv2d: quantize_ it first")
    if any(layer.runtime_plan is not None for layer in layers):
        raise ValueError("the model is already converted for runtime")
    if example is not None:
        refuse_task_loras(model)  # before QwT is lowered: nothing half-done
    report = RuntimeReport(None)
    if example is not None:
        convolutional = any(isinstance(layer, QuantConv2d) for layer in layers)
        if convolutional:
            report.folded_into_convs = fold_conv_epilogues(model, example)
        if any(True for _ in compensated_blocks(model)):
            report.lowered_qwt, report.hooked_qwt = lower_qwt(model, example, strict=False)
        if any(isinstance(layer, QuantLinear) for layer in layers):
            report.fusion = fuse_blocks(model, example, backend)
        if convolutional:  # last: the rewritten blocks are traced graphs, no longer repeated module classes
            report.residual_blocks = fuse_residual_convs(model, example)
            for name in [name for name, why in report.residual_blocks.items() if "QwT compensation" in why]:
                report.hooked_qwt.pop(name, None)
    try:
        for layer in layers:
            layer.freeze()
        for module in model.modules():
            if isinstance(module, FUSED_MODULE_TYPES):
                module.freeze()
    except ValueError:
        for module in model.modules():
            if isinstance(module, (QuantLinear, QuantConv2d, *FUSED_MODULE_TYPES)):
                module.thaw()
        raise
    return report
