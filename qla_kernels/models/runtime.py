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

from typing import Any, Optional

from torch import nn

from ..nn.fused import FUSED_MODULE_TYPES
from ..nn.quant_linear import QuantLinear
from .fusion import FusionReport, fuse_blocks


def convert_for_runtime(model: nn.Module, example: Optional[Any] = None, backend: str = "auto") -> Optional[FusionReport]:
    """Converts a quantized (and calibrated, lowered) `model` to its runtime form, in place.

    Level one, always (no example needed: what loaders call): every QuantLinear freezes its
    operands, each validated once. Level two, with `example` (one input batch): `fuse_blocks`
    first (checked on `example` under `backend`), then every fused block freezes its chain.
    Casts and moves afterwards (`.to`, `.half`) rebuild the plans. Returns the fusion report, or
    None without an example. ValueError when the model has no QuantLinear, is already converted,
    or a layer's operands do not fit (then nothing is converted)."""
    layers = [module for module in model.modules() if isinstance(module, QuantLinear)]
    if not layers:
        raise ValueError("the model has no QuantLinear: quantize_ it first")
    if any(layer.runtime_plan is not None for layer in layers):
        raise ValueError("the model is already converted for runtime")
    report = fuse_blocks(model, example, backend) if example is not None else None
    try:
        for layer in layers:
            layer.freeze()
        for module in model.modules():
            if isinstance(module, FUSED_MODULE_TYPES):
                module.freeze()
    except ValueError:
        for module in model.modules():
            if isinstance(module, (QuantLinear, *FUSED_MODULE_TYPES)):
                module.thaw()
        raise
    return report
