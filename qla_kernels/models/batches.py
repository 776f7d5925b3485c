"""Calibration / training batches: a tensor (the model's input), a dict of tensors (keyword inputs,
HF style) or an (input, label) tuple."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, List, Optional

import torch
from torch import nn


def materialize(batches: Iterable) -> List[Any]:
    """A list, so that recipes can pass over the batches several times (one pass per block)."""
    items = list(batches)
    if not items:
        raise ValueError("batches is empty: calibration needs at least one batch")
    return items


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def run_model(model: nn.Module, batch: Any, device: Optional[torch.device] = None):
    """Calls `model` on one batch (without a KV cache: calibration must not grow one)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        inputs = {k: v.to(device) if device is not None and isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if _accepts(model, "use_cache") and "use_cache" not in inputs:
            inputs["use_cache"] = False
        return model(**inputs)
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device) if device is not None else batch)
    raise ValueError(f"a batch must be a tensor, a dict of tensors or an (input, label) tuple, got {type(batch).__name__}")


def token_mask(batch: Any) -> Optional[torch.Tensor]:
    """[batch, seq] bool of real tokens when the batch carries an attention_mask, else None."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def model_output(output) -> torch.Tensor:
    """The main tensor of a model's output: logits, else last_hidden_state, else the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot find the output tensor in a {type(output).__name__}")
