"""Fused residual blocks: a block's shortcut add (and the activation after it) in the epilogue of
the convolution that ends the block, found by the block's traced graph, not by its class.

`fuse_residual_convs(model, example)` traces (torch.fx) each module that holds quantized
convolutions, deepest first, with QuantConv2d and the TreatedBy wrappers of already-folded
BatchNorms (models/conv_epilogues.py) as leaves. Where the graph adds a convolution's output
(through those pass-through wrappers and nn.Identity only, nothing else reading it) to another tensor, the add
(and an activation module or function that is the add's only reader: ReLU, ReLU6, SiLU, GELU)
becomes one call of that convolution with the shortcut as its epilogue's residual:
`act(conv(x) + shortcut)` for torchvision, timm and Hugging Face ResNet basic and bottleneck
blocks (with their downsample branches), `conv(x) + shortcut` for MobileNetV2's inverted
residuals. A block's QwT compensation (group-wise 1×1 of the block input, added to the block
output) joins that convolution's epilogue as its full-rank segment (after the activation). The
module is replaced by the rewritten graph and checked on the input `example` gives it; a block
that does not trace or whose output changes keeps its own forward (reported).
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.compensation import ConvQwTCompensation, detach
from ..nn.conv_adapters import detach_conv_adapter
from ..nn.quant_conv import QuantConv2d, TreatedBy
from .batches import run_model
from .conv_epilogues import module_activation

BLOCK_TOLERANCE = 1e-4  # relative L2 on the block output: epilogue rounding passes, a misplaced add does not
_ADDS = {operator.add, operator.iadd, torch.add}
_FUNCTIONAL_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", F.gelu: "gelu"}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (QuantConv2d, TreatedBy)) or super().is_leaf_module(module, qualified_name)


def _node_activation(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    if node.op == "call_module":
        return module_activation(modules[node.target])
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS and len(node.args) == 1:
        return _FUNCTIONAL_ACTIVATIONS[node.target]
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu"
    return None


def _conv_behind(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Tuple[fx.Node, list]]:
    """The QuantConv2d call whose output reaches `node` through pass-through modules only (each
    with one reader: nn.Identity, or a TreatedBy wrapper that this convolution folded into its
    epilogue), and those modules' nodes."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_module":
        module = modules[node.target]
        if len(node.users) != 1:
            return None
        if isinstance(module, QuantConv2d):
            folded = all(modules[n.target] in module.treated_by for n in chain
                         if isinstance(modules[n.target], TreatedBy))
            return (node, chain) if folded else None
        if not isinstance(module, (nn.Identity, TreatedBy)):
            return None
        chain.append(node)
        node = node.args[0]
    return None


def _rewrite(graph: fx.Graph, modules: Dict[str, nn.Module]) -> list:
    """Rewrites every fusable add in `graph`; returns the (convolution, activation) pairs fused."""
    fused = []
    for add in list(graph.nodes):
        is_add = ((add.op == "call_function" and add.target in _ADDS)
                  or (add.op == "call_method" and add.target in ("add", "add_")))
        if not is_add or len(add.args) != 2 or add.kwargs or not all(isinstance(a, fx.Node) for a in add.args):
            continue
        for index in (0, 1):
            found = _conv_behind(add.args[index], modules)
            if found is None:
                continue
            conv_node, chain = found
            conv = modules[conv_node.target]
            if conv.activation_after_residual != "none" or len(conv_node.args) != 1 or conv_node.kwargs:
                continue
            shortcut = add.args[1 - index]
            end, activation = add, "none"
            users = list(add.users)
            if conv.fused_activation == "none" and len(users) == 1 and _node_activation(users[0], modules):
                end, activation = users[0], _node_activation(users[0], modules)
            with graph.inserting_before(end):
                call = graph.call_module(conv_node.target, conv_node.args, {"residual": shortcut})
            end.replace_all_uses_with(call)
            for node in ([end, add] if end is not add else [add]) + chain + [conv_node]:  # readers first
                graph.erase_node(node)
            fused.append((conv, activation, call))
            break
    return fused


def dense_compensation(compensation: ConvQwTCompensation) -> torch.Tensor:
    """QwT's group-wise 1×1 weight [O, C_in / g] as the dense block-diagonal [O, C_in] the
    full-rank segment multiplies (g times the group-wise products: the cost reported)."""
    weight, groups = compensation.weight.detach().float(), compensation.groups
    out_step, in_step = weight.shape[0] // groups, weight.shape[1]
    dense = weight.new_zeros((weight.shape[0], in_step * groups))
    for g in range(groups):
        dense[g * out_step:(g + 1) * out_step, g * in_step:(g + 1) * in_step] = weight[g * out_step:(g + 1) * out_step]
    return dense


def _lower_corrections(graph: fx.Graph, module: nn.Module, fused: list) -> Optional[str]:
    """Runs the corrections beside the block (`module.qwt`, a group-wise compensation of the
    block output; `module.qla_conv`, QLA's adapter) in the epilogue of the fused convolution that
    produces the block output: QwT in its full-rank segment (X_c = the block input at its stride,
    W_c dense), the adapter in its low-rank one (T from the block input, U = gate·up). Returns
    why they cannot (then the block must keep its own forward and hooks), or None."""
    compensation = getattr(module, "qwt", None)
    adapter = module.qla_conv if getattr(module, "_qla_conv_handle", None) is not None else None
    if compensation is None and adapter is None:
        return None
    if compensation is not None and not isinstance(compensation, ConvQwTCompensation):
        return f"its QwT compensation is a {type(compensation).__name__}, not a convolutional one"
    output = next(node for node in graph.nodes if node.op == "output")
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    produced = {id(call): (conv, activation) for conv, activation, call in fused}
    result = output.args[0]
    if not isinstance(result, fx.Node) or id(result) not in produced or not placeholders:
        return "its output is not a fused convolution's: its corrections stay hooks"
    conv, activation = produced[id(result)]
    if conv.fused_activation != "none" and activation == "none":
        return "its last convolution's activation precedes the shortcut add: its corrections stay hooks"
    result.kwargs = {**result.kwargs, "block_input": placeholders[0]}
    if compensation is not None:
        conv.lowered_qwt = (dense_compensation(compensation), compensation.bias.detach().float(), compensation.stride)
    if adapter is not None:
        conv.lowered_adapter = adapter
    return None


def fuse_residual_convs(model: nn.Module, example: Any) -> Dict[str, str]:
    """Fuses every residual block of `model` it finds (see the module docstring) in place.
    Returns {block name: "fused: <convolution> + <activation>" or why not}."""
    candidates = [(name, module) for name, module in model.named_modules()
                  if name and not isinstance(module, (QuantConv2d, TreatedBy))
                  and any(isinstance(m, QuantConv2d) for m in module.modules())]
    inputs: Dict[str, tuple] = {}
    handles = [module.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: inputs.setdefault(name, (args, kwargs)), with_kwargs=True)
        for name, module in candidates]
    try:
        with torch.no_grad():
            run_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    report: Dict[str, str] = {}
    done: list = []
    for name, module in sorted(candidates, key=lambda item: -item[0].count(".")):
        if any(other.startswith(name + ".") for other in done) or name not in inputs:
            continue
        try:
            graph = _Tracer().trace(module)
        except Exception as error:  # noqa: BLE001  (any untraceable forward keeps its own)
            report[name] = f"not traceable ({type(error).__name__})"
            continue
        args, kwargs = inputs[name]
        with torch.no_grad():
            expected = module(*args, **kwargs)  # before any layer of it changes
        modules = dict(module.named_modules())
        names_before = {id(m): n for n, m in modules.items()}
        fused = _rewrite(graph, modules)
        if not fused:
            continue
        unlowered = _lower_corrections(graph, module, fused)
        if unlowered:
            for conv, _, _ in fused:
                _drop_lowered(conv)
            report[name] = f"kept unfused: {unlowered}"
            continue
        graph.lint()
        rewritten = fx.GraphModule(module, graph, class_name=f"Fused{type(module).__name__}")
        with torch.no_grad():
            for conv, activation, _ in fused:
                conv.activation_after_residual = activation if conv.fused_activation == "none" else "none"
            actual = rewritten(*args, **kwargs)
        error = _relative_l2(expected, actual)
        if error is None or error > BLOCK_TOLERANCE:
            for conv, _, _ in fused:
                conv.__dict__.pop("activation_after_residual", None)
                _drop_lowered(conv)
            report[name] = f"the fused block's output differs ({error}); kept unfused"
            continue
        lowered = [kind for kind, present in (("QwT compensation", getattr(module, "qwt", None) is not None),
                                              ("QLA adapter", getattr(module, "_qla_conv_handle", None) is not None))
                   if present]
        detach(module)  # its corrections run in the rewritten block's last convolution now
        detach_conv_adapter(module)
        model.set_submodule(name, rewritten)
        done.append(name)
        report[name] = "fused: " + ", ".join(f"{names_before[id(conv)]} + {activation}" for conv, activation, _ in fused)
        if lowered:
            report[name] += f" (with its {' and '.join(lowered)})"
    return report


def _drop_lowered(conv: QuantConv2d) -> None:
    conv.__dict__.pop("lowered_qwt", None)
    conv._modules.pop("lowered_adapter", None)


def _relative_l2(expected, actual) -> Optional[float]:
    if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)) or expected.shape != actual.shape:
        return None
    expected, actual = expected.double(), actual.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
