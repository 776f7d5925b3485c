"""`quantize_(model, config, filter_fn)`: swap linears for QuantLinear in place (torchao's convention).

Each config type has a registered handler that converts one module; adding a scheme is one config
and one handler.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Type

from torch import nn

from ..quant.config import W4A4, W4A8, W4A16, W8A8, QuantConfig
from .module_kinds import is_linear
from .quant_linear import QuantLinear, linear_weight
from .weight_reads import kept_floating, route_weight_reads

_HANDLERS: Dict[Type[QuantConfig], Callable[[nn.Module, QuantConfig], nn.Module]] = {}
_LISTENERS: List[Callable[[nn.Module], None]] = []


def on_quantized(listener: Callable[[nn.Module], None]) -> None:
    """Calls `listener(model)` whenever a model has been quantized here (`quantize_`,
    `load_quantized`, the methods that quantize): how a library integration (Hugging Face's
    save_pretrained, integrations/transformers.py) learns of a model without nn/ importing it."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def announce_quantized(model: nn.Module) -> None:
    for listener in _LISTENERS:
        listener(model)


def register_quantize_handler(config_type: Type[QuantConfig]):
    """Decorator: `handler(module, config) -> replacement module` for one config type."""

    def register(handler):
        _HANDLERS[config_type] = handler
        return handler

    return register


def _quant_linear_handler(module: nn.Module, config: QuantConfig) -> nn.Module:
    return QuantLinear.from_float(module, config)


for _config_type in (W8A8, W4A8, W4A16, W4A4):
    register_quantize_handler(_config_type)(_quant_linear_handler)


def select_linears(
    model: nn.Module, config: QuantConfig, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
) -> Dict[str, nn.Module]:
    """The linears (by qualified name) that `filter_fn` selects (default: all), each checked to be
    usable by `config`: a ValueError names the first that is not, or says that none was selected.
    Linears whose parent uses their weight other than through F.linear stay out, with a warning
    (nn/weight_reads.py)."""
    targets = {name: m for name, m in model.named_modules() if is_linear(m) and (filter_fn is None or filter_fn(m, name))}
    for name in _warn_kept_floating(model, list(targets)):
        del targets[name]
    if not targets:
        raise ValueError("no linear layer selected for quantization")
    for name, module in targets.items():
        try:
            config.check_in_features(linear_weight(module).shape[1])
        except ValueError as error:
            raise ValueError(f"cannot quantize {name!r}: {error}") from error
    return targets


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> nn.Module:
    """Replaces, in place, every linear (nn.Linear, HF Conv1D) for which `filter_fn(module, fqn)` is
    true (default: all) by its quantized counterpart for `config`. Returns `model`.

    Atomic: every selected linear is converted first and swapped only when all conversions
    succeeded, so a ValueError leaves the model as it was. A linear whose in_features the config
    cannot use (K not a multiple of group_size, odd K for int4) raises ValueError naming the
    module: exclude it with filter_fn. A linear registered under several names (tied or shared
    modules) becomes one QuantLinear under all of them. Selecting nothing is a ValueError, also
    for a model already quantized (quantize its floating-point original instead). A linear whose
    parent passes its `.weight` to F.linear itself (timm BEiT / EVA / Swin V2 attention:
    `F.linear(x, self.qkv.weight, qkv_bias)`) is quantized and those calls are routed to it; one
    whose parent reads its weight otherwise (ConViT: `self.qk.weight.dtype`) stays in floating
    point, with a warning naming it (nn/weight_reads.py).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise ValueError(f"config must be one of {[c.__name__ for c in _HANDLERS]}, got {config!r}")
    if is_linear(model):
        raise ValueError("model is itself a linear layer: use QuantLinear.from_float(model, config)")
    names_of: Dict[int, List[str]] = {}  # every name of each selected linear (shared modules have several)
    modules: Dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_linear(module) and (filter_fn is None or filter_fn(module, name)):
            names_of.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    kept = set(_warn_kept_floating(model, [names[0] for names in names_of.values()]))
    selected = [(names, modules[key]) for key, names in names_of.items() if names[0] not in kept]
    if not selected:
        already = sum(isinstance(module, QuantLinear) for module in model.modules())
        raise ValueError("no linear layer selected for quantization" + (
            f": the model is already quantized ({already} QuantLinear layers); quantize its floating-point "
            "original with the config you want" if already else ""))
    replacements = []
    for names, module in selected:
        try:
            replacements.append((names, handler(module, config)))
        except ValueError as error:
            raise ValueError(f"cannot quantize {names[0]!r}: {error}") from error
    for names, replacement in replacements:
        for name in names:
            model.set_submodule(name, replacement)
    route_weight_reads(model, (QuantLinear,))
    announce_quantized(model)
    return model


def _warn_kept_floating(model: nn.Module, names: List[str]) -> List[str]:
    kept = kept_floating(model, names)
    if kept:
        warnings.warn(f"left in floating point (their parents read .weight directly): {kept}", stacklevel=3)
    return kept
