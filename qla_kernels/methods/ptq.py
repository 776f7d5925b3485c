"""Post-training quantization: calibrated static activation scales for every QuantLinear and QuantConv2d.

`quantize_` already gives round-to-nearest per-channel weights and dynamic per-token activations
(no calibration needed). `calibrate` replaces the dynamic activation scales by static per-tensor
ones (and zero points when asymmetric), chosen from observed inputs, which the kernels then apply
without computing a per-token absmax. Observation runs under the `simulate` backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..models.batches import materialize, run_model
from ..nn.quant_conv import QuantConv2d
from ..nn.quant_linear import QuantLinear
from ..ops.dispatch import use_backend
from ..quant.observers import METHODS, ActivationObserver, static_scale


@dataclasses.dataclass
class ActivationScale:
    scale: float
    zero_point: int
    rows_seen: int


@torch.no_grad()
def calibrate(
    model_q: nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "percentile",
    symmetric: bool = True,
    max_rows: int = 2048,
    progress: bool = True,
) -> Dict[str, ActivationScale]:
    """Observes every activation-quantized QuantLinear's (and QuantConv2d's) input over `batches` and fixes its static
    scale by `method` ("minmax", "percentile" or "mse", see quant/observers.py). Returns the chosen
    scale and zero point per layer name."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layers = {name: m for name, m in model_q.named_modules()
              if isinstance(m, (QuantLinear, QuantConv2d)) and m.config.act_bits}
    if not layers:
        raise ValueError("the model has no QuantLinear or QuantConv2d with activation quantization (run qk.quantize_ "
                         "first)")
    batches = materialize(batches)
    observers = {name: ActivationObserver(max_rows, seed=i) for i, name in enumerate(layers)}
    handles = [layer.register_forward_pre_hook(lambda m, args, obs=observers[name]: obs.observe(m.activation_input(args[0])))
               for name, layer in layers.items()]
    was_training = model_q.training
    model_q.eval()
    try:
        with use_backend("simulate"):
            for batch in tqdm(batches, desc="PTQ observe", unit="batch", disable=not progress):
                run_model(model_q, batch)
    finally:
        for handle in handles:
            handle.remove()
        model_q.train(was_training)
    chosen = {}
    for name, layer in tqdm(layers.items(), desc="PTQ scales", unit="layer", disable=not progress):
        weight = None
        if method == "percentile":
            weight = layer.pixel_weight() if isinstance(layer, QuantConv2d) else layer.quantized_weight().dequantize()
        scale, zero = static_scale(observers[name], layer.config.act_bits, method, symmetric, weight)
        layer.set_static_activation(torch.tensor(scale), None if symmetric else torch.tensor(zero))
        chosen[name] = ActivationScale(scale, zero, observers[name].seen)
    return chosen
