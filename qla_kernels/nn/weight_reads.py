"""Linears whose parent module reads their `.weight` instead of calling them.

timm's BEiT, EVA and Swin V2 attention run `F.linear(x, weight=self.qkv.weight, bias=qkv_bias)`
with a bias they assemble per call; a quantized layer stores integer codes in `.weight`, so that
call would fail (or, for a QAT layer, skip its input quantizer). Such a read is found in the parent
class's source (its syntax tree, outside initialisation methods) and the linear is then *routed*:
while the parent runs, a TorchFunctionMode turns `F.linear(x, layer.weight, bias)` into
`layer(x, bias_override=bias)`, so the layer's kernels, hooks and calibration see the call as any
other. Passes that observe an fp model's linears through hooks (GPTQ, GPLQ) route its nn.Linears
the same way while they observe (`weight_reads_routed`). A parent that uses the weight in any
other way (ConViT reads `self.qk.weight.dtype`; T5 casts to `wo.weight.dtype`) keeps that linear
in floating point (`kept_floating`).

In eager mode the mode costs a Python dispatch per torch call inside the routed parents (their
attention forward); under torch.compile it is traced away.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import textwrap
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_ROUTED = "_qla_routed_linears"


@functools.lru_cache(maxsize=None)
def weight_reads(parent_class: type, child: str) -> Optional[str]:
    """How `parent_class`'s methods (other than init/reset ones) use `self.<child>.weight`: None
    (never), "linear" (only as the weight of an F.linear call) or "other"."""
    found = None
    for method_name, method in inspect.getmembers(parent_class, inspect.isfunction):
        if "init" in method_name or "reset" in method_name or method.__module__.startswith("torch."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        except (OSError, TypeError, SyntaxError):  # no Python source
            continue
        as_linear_weight = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node.func) == "linear":
                weight = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "weight"), None)
                if weight is not None and _is_child_weight(weight, child):
                    as_linear_weight.add(id(weight))
        for node in ast.walk(tree):
            if _is_child_weight(node, child):
                if id(node) not in as_linear_weight:
                    return "other"
                found = "linear"
    return found


def _called_name(func: ast.expr) -> Optional[str]:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _is_child_weight(node: ast.AST, child: str) -> bool:
    """`self.<child>.weight`"""
    return (isinstance(node, ast.Attribute) and node.attr == "weight" and isinstance(node.value, ast.Attribute)
            and node.value.attr == child and isinstance(node.value.value, ast.Name) and node.value.value.id == "self")


def _read(model: nn.Module, name: str) -> Optional[str]:
    parent_name, _, child = name.rpartition(".")
    return weight_reads(type(model.get_submodule(parent_name)), child)


def kept_floating(model: nn.Module, names: List[str]) -> List[str]:
    """The linears among `names` (qualified) that must stay in floating point: their parent uses
    their weight other than as an F.linear weight."""
    return [name for name in names if _read(model, name) == "other"]


def route_weight_reads(model: nn.Module, layer_types: tuple) -> List[str]:
    """Installs the routing, for good, on the parent of every module of `layer_types` in `model`
    whose weight the parent passes to F.linear itself (idempotent). Returns the routed layers' names."""
    routed, _ = _install(model, layer_types)
    return routed


@contextlib.contextmanager
def weight_reads_routed(model: nn.Module):
    """Routes `model`'s fp nn.Linears whose parent passes their weight to F.linear, while the
    context is open, so that hooks on those linears see their inputs."""
    _, installed = _install(model, (nn.Linear,))
    try:
        yield
    finally:
        for parent, handles in installed:
            for handle in handles:
                handle.remove()
            del parent.__dict__[_ROUTED]


def _install(model: nn.Module, layer_types: tuple):
    routed, installed = [], []
    for name, module in model.named_modules():
        if not isinstance(module, layer_types) or "." not in name or _read(model, name) != "linear":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if _ROUTED not in parent.__dict__:
            parent.__dict__[_ROUTED] = []
            installed.append((parent, [parent.register_forward_pre_hook(_enter_routing),
                                       parent.register_forward_hook(_leave_routing, always_call=True)]))
        if child not in parent.__dict__[_ROUTED]:
            parent.__dict__[_ROUTED].append(child)
        routed.append(name)
    return routed, installed


class _LinearToLayer(TorchFunctionMode):
    def __init__(self, layers: Dict[int, nn.Module]):
        super().__init__()
        self.layers = layers  # by id of the layer's current weight tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.layers.get(id(weight))
            if layer is not None and layer.weight is weight:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if getattr(layer, "takes_bias_override", False):
                    if bias is None and layer.bias is not None:
                        bias = torch.zeros_like(layer.bias)
                    return layer(x, bias_override=bias)
                y = layer(x)  # an fp nn.Linear, called for the hooks observing it
                if layer.bias is not None:
                    y = y - layer.bias
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def _enter_routing(parent: nn.Module, args) -> None:
    # The weights are looked up per call: packing (models/fusion.py) and .to() replace the tensors.
    layers = {id(layer.weight): layer for layer in (getattr(parent, child) for child in parent.__dict__[_ROUTED])}
    mode = _LinearToLayer(layers)
    mode.__enter__()
    parent.__dict__.setdefault("_qla_routing_modes", []).append(mode)


def _leave_routing(parent: nn.Module, args, output) -> None:
    parent.__dict__["_qla_routing_modes"].pop().__exit__(None, None, None)
