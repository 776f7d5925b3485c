"""GPTQ for whole models: weights of any format chosen against calibration inputs (quant/gptq.py).

Every linear's input Hessian is collected from the fp model in one pass over the batches (not
layer by layer on the partially quantized model as the GPTQ paper does: one pass keeps
calibration linear in model depth; the per-layer objective is the same), then each linear is
replaced by a QuantLinear holding its GPTQ weights. Hessians are K×K fp64 per layer: for large
models run it on a subset of layers at a time with `filter_fn`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..models.batches import materialize, run_model
from ..nn.quant_linear import QuantLinear, linear_weight
from ..nn.quantize import announce_quantized, select_linears
from ..nn.weight_reads import route_weight_reads, weight_reads_routed
from ..quant.config import QuantConfig
from ..quant.gptq import gptq_quantize, hessian


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any],
    *,
    act_order: bool = False,
    damping: float = 0.01,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    progress: bool = True,
) -> nn.Module:
    """Replaces (in place) each selected linear by a QuantLinear for `config` (W8A8, W4A8 with or
    without groups, W4A16, W4A4) whose weight codes GPTQ chose; returns `model`. Activations stay
    as the config quantizes them (per token; calibrate static scales afterwards if wanted)."""
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig (W8A8, W4A8, W4A16, W4A4), got {config!r}")
    targets = select_linears(model, config, filter_fn)
    hessians: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def collect(name):
        def hook(module, inputs):
            # The layer quantizes x·R against W·R.
            hessians[name] = hessians.get(name, 0) + hessian(config.rotated(inputs[0])).cpu()
            counts[name] = counts.get(name, 0) + 1
        return hook

    handles = [module.register_forward_pre_hook(collect(name)) for name, module in targets.items()]
    was_training = model.training
    model.eval()
    try:
        with weight_reads_routed(model):
            for batch in tqdm(materialize(batches), desc="GPTQ inputs", unit="batch", disable=not progress):
                run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name, module in tqdm(targets.items(), desc="GPTQ layers", unit="layer", disable=not progress):
        if name not in hessians:
            raise ValueError(f"{name!r} was never called on the calibration batches")
        weight = config.rotated(linear_weight(module))
        qweight = gptq_quantize(weight, hessians[name] / counts[name], config, act_order=act_order, damping=damping)
        model.set_submodule(name, QuantLinear.from_float(module, config, qweight=qweight))
    route_weight_reads(model, (QuantLinear,))
    announce_quantized(model)
    return model
