"""Per-channel activation scales folded into the preceding norm and the following linears.

Post-LayerNorm activations vary wildly between channels (a few outlier channels set every
token's absmax), which per-token quantization cannot resolve. Dividing the norm's affine by
s (per channel) and multiplying the consuming linears' input columns by s leaves the fp model
unchanged while the quantizer sees balanced channels:

- "smoothquant": s_c = max|X_c|^α / max|W_c|^(1−α) (SmoothQuant), migrating difficulty to weights;
- "repq": s_c = range_c / mean(range) (RepQ-ViT's reparameterization of per-channel activation
  scales into a per-tensor one).

Which linears consume which norm is found by running the model once and matching tensors by
identity (a linear whose input *is* a norm's output), so no architecture is named. A fold is kept
only if the model's output is unchanged afterwards (checked on the first batch): a norm whose
output is also the residual stream (post-norm BERT/RoBERTa) cannot be folded and is restored.
Norms without an affine weight, and inputs reshaped between norm and linear (Swin's window
attention), are left alone. Run it on the fp model, before `qk.quantize_`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List

import torch
from torch import nn

from ..models.batches import materialize, model_output, run_model
from ..nn.module_kinds import is_linear, is_norm
from ..nn.quant_linear import conv1d_class

MODES = ("smoothquant", "repq")
EQUIVALENCE_TOLERANCE = 1e-3  # relative to the output's max: fp32 rounding passes, a broken residual does not


@dataclasses.dataclass
class FoldedGroup:
    norm: str
    linears: List[str]
    max_scale: float
    min_scale: float


def _weight_columns(module: nn.Module) -> torch.Tensor:
    """View of the weight with input channels on dim 1 (transposed for HF Conv1D)."""
    conv1d = conv1d_class()
    return module.weight.t() if conv1d is not None and isinstance(module, conv1d) else module.weight


@torch.no_grad()
def fold_activation_scales(
    model: nn.Module, batches: Iterable[Any], *, mode: str = "smoothquant", alpha: float = 0.5
) -> List[FoldedGroup]:
    """Folds per-channel scales between every affine norm and the linears reading its output, in
    place; the fp model computes the same function (up to rounding). Returns what was folded."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    names = {module: name for name, module in model.named_modules()}
    producers: Dict[int, nn.Module] = {}
    keep_alive: List[torch.Tensor] = []
    consumers: Dict[nn.Module, List[nn.Module]] = {}
    act_max: Dict[nn.Module, torch.Tensor] = {}
    act_min: Dict[nn.Module, torch.Tensor] = {}

    def on_norm(module, inputs, output):
        producers[id(output)] = module
        keep_alive.append(output)

    def on_linear(module, inputs):
        norm = producers.get(id(inputs[0]))
        if norm is None:
            return
        if module not in consumers.setdefault(norm, []):
            consumers[norm].append(module)
        rows = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        act_max[norm] = torch.maximum(act_max.get(norm, rows.max(0).values), rows.max(0).values)
        act_min[norm] = torch.minimum(act_min.get(norm, rows.min(0).values), rows.min(0).values)

    batches = materialize(batches)
    was_training = model.training
    model.eval()
    try:
        return _fold(model, batches, mode, alpha, names, on_norm, on_linear, producers, keep_alive, consumers,
                     act_max, act_min)
    finally:
        model.train(was_training)


def _fold(model, batches, mode, alpha, names, on_norm, on_linear, producers, keep_alive, consumers, act_max, act_min):
    handles = [m.register_forward_hook(on_norm) for m in model.modules() if is_norm(m)]
    handles += [m.register_forward_pre_hook(on_linear) for m in model.modules() if is_linear(m)]
    try:
        for batch in batches:
            run_model(model, batch)
            producers.clear()
            keep_alive.clear()
    finally:
        for handle in handles:
            handle.remove()
    reference = model_output(run_model(model, batches[0])).float()
    folded = []
    for norm, linears in consumers.items():
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            continue
        if mode == "smoothquant":
            activation = torch.maximum(act_max[norm].abs(), act_min[norm].abs()).clamp_min(1e-5)
            weights = torch.stack([_weight_columns(m).abs().amax(dim=0).float() for m in linears]).amax(dim=0)
            scale = activation.pow(alpha) / weights.clamp_min(1e-5).pow(1 - alpha)
        else:
            spread = (act_max[norm] - act_min[norm]).clamp_min(1e-5)
            scale = spread / spread.mean()
        scale = scale.clamp_min(1e-5)
        tensors = [norm.weight] + [t for t in (getattr(norm, "bias", None),) if isinstance(t, torch.Tensor)]
        tensors += [linear.weight for linear in linears]
        saved = [t.detach().clone() for t in tensors]
        for tensor in tensors[: len(tensors) - len(linears)]:
            tensor.div_(scale.to(tensor.dtype))
        for linear in linears:
            _weight_columns(linear).mul_(scale.to(linear.weight.dtype))
        changed = model_output(run_model(model, batches[0])).float() - reference
        if float(changed.abs().max()) > EQUIVALENCE_TOLERANCE * float(reference.abs().max()):
            for tensor, original in zip(tensors, saved):
                tensor.copy_(original)
            continue
        folded.append(FoldedGroup(names[norm], [names[m] for m in linears], float(scale.max()), float(scale.min())))
    return folded
