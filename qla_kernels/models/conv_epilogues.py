"""Folding what follows a quantized convolution into its epilogue, found by data flow.

`fold_conv_epilogues(model, example)` runs `example` once with hooks on every leaf module and
records which module call consumes which tensor. A QuantConv2d whose output is consumed by one
module call that is a per-channel affine map (every BatchNorm kind: nn.BatchNorm2d, Hugging Face
DETR's DetrFrozenBatchNorm2d, timm's frozen norms and its BatchNormAct2d with the activation
inside, found by what the module computes, not by its class) gets that map folded into its
weight scales and bias; an activation module consuming the result (ReLU, ReLU6, SiLU, GELU)
joins the epilogue too. The model's own forward still calls
those modules: each is wrapped so that, for a tensor its convolution already treated, it returns
the tensor as it is (the tensor carries the mark, not the module: concurrent calls stay correct),
and runs as before on any other input (a ReLU that a torchvision block also applies after its
residual add). A module call links to a tensor only when nothing else reads that tensor's
values: the reads of the code between modules (`out += identity`, torch.cat) are counted with a
TorchFunctionMode while `example` runs, and an in-place change links nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from ..nn.quant_conv import QuantConv2d, TreatedBy
from ..ops import reference
from .batches import run_model

AFFINE_TOLERANCE = 1e-4  # relative: a per-channel affine map reproduces the module's output to fp32 rounding
def module_activation(module: nn.Module) -> Optional[str]:
    """The epilogue activation an activation module computes (None for any other module)."""
    if isinstance(module, TreatedBy):
        module = module.module
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return None


@dataclasses.dataclass
class _Call:
    module: nn.Module
    name: str
    input: Optional[torch.Tensor]
    output: Any
    input_version: int = -1  # the tensors' in-place versions when the call saw them: a tensor modified
    output_version: int = -1  # in place in between (torchvision's `out += identity`) links no calls


# Tensor functions that read only metadata, not values: code between modules may call them freely.
_METADATA_READS = {"size", "dim", "shape", "dtype", "device", "ndim", "numel", "is_contiguous", "stride",
                   "requires_grad", "is_floating_point", "layout", "data_ptr", "__get__", "element_size"}


class _ValueReads(TorchFunctionMode):
    """Counts, per tensor, the torch functions that read its values outside every leaf module's
    own call (the code between modules: `out += identity`, torch.cat, F.relu). Every tensor
    counted is kept alive while the mode is: a temporary freed between modules would leave its id
    to a later module output, whose count would then be the temporary's (the fold of that
    convolution skipped, depending on where CPython reallocates)."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a leaf module runs
        self.reads: Dict[int, int] = {}
        self.read_tensors: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.depth == 0 and name not in _METADATA_READS:
            for value in pytree.tree_leaves((args, kwargs)):
                if isinstance(value, torch.Tensor):
                    if id(value) not in self.reads:
                        self.read_tensors.append(value)
                    self.reads[id(value)] = self.reads.get(id(value), 0) + 1
        return func(*args, **kwargs)


def _leaf_like(module: nn.Module) -> bool:
    """A module whose call is one step of the data flow: no children, a QuantConv2d, or only
    elementwise children (timm's BatchNormAct2d: its norm, then its own activation and dropout)."""
    children = list(module.children())
    return isinstance(module, QuantConv2d) or all(
        module_activation(c) or isinstance(c, (nn.Identity, nn.Dropout)) for c in children)


def _record_calls(model: nn.Module, example: Any) -> Tuple[List[_Call], Dict[int, int]]:
    """Every leaf module call on `example`, in order, and the value reads between modules."""
    names = {id(m): name for name, m in model.named_modules()}
    calls: List[_Call] = []
    versions: List[int] = []  # the input's version before each running call (in-place modules bump it)
    mode = _ValueReads()

    def before(module, args):
        mode.depth += 1
        versions.append(args[0]._version if args and isinstance(args[0], torch.Tensor) else -1)

    def after(module, args, output):
        mode.depth -= 1
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        calls.append(_Call(module, names.get(id(module), "?"), first, output, versions.pop(),
                           output._version if isinstance(output, torch.Tensor) else -1))

    leaves = [m for m in model.modules() if _leaf_like(m)]
    handles = [m.register_forward_pre_hook(before) for m in leaves] + [m.register_forward_hook(after) for m in leaves]
    try:
        with torch.no_grad(), mode:
            run_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return calls, mode.reads


def per_channel_affine(module: nn.Module, x: torch.Tensor
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[str]]]:
    """(a, b, activation) with module(v) = act(a·v + b) per channel for NCHW v, a and b [C], when
    the module computes that, else None. The map is probed on zeros and ones with the module's
    activation children (timm's BatchNormAct2d holds one) set aside, and confirmed on x, the
    input it was called with; `activation` is theirs (None without)."""
    if x.dim() != 4 or module.training:
        return None
    channels = x.shape[1]
    activations = [(name, child) for name, child in module.named_children() if module_activation(child)]
    if len(activations) > 1:
        return None
    try:
        with torch.no_grad():
            y = module(x.clone())  # a copy: an in-place module must not change the recorded input
            for name, _ in activations:
                setattr(module, name, nn.Identity())
            try:
                probe = torch.stack([torch.zeros(channels), torch.ones(channels)]).to(x)[:, :, None, None]
                out = module(probe)
            finally:
                for name, child in activations:
                    setattr(module, name, child)
    except Exception:  # noqa: BLE001  (a module that does not take such a probe is not an affine map)
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    activation = module_activation(activations[0][1]) if activations else None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    shift, scale = out[0, :, 0, 0].float(), (out[1, :, 0, 0] - out[0, :, 0, 0]).float()
    predicted = x.float() * scale[None, :, None, None] + shift[None, :, None, None]
    if activation is not None:
        predicted = reference.apply_activation(predicted, activation)
    if float((predicted - y.float()).abs().max()) > AFFINE_TOLERANCE * max(float(y.abs().max()), 1e-30):
        return None
    return scale, shift, activation


@torch.no_grad()
def fold_conv_epilogues(model: nn.Module, example: Any) -> Dict[str, List[str]]:
    """Folds each QuantConv2d's following per-channel affine map and activation into its
    epilogue (see the module docstring). Returns {convolution: [the modules folded into it]}."""
    was_training = model.training
    model.eval()
    try:
        calls, value_reads = _record_calls(model, example)
        consumers: Dict[Tuple[int, int], List[_Call]] = {}  # (tensor, version) → the calls reading it
        for call in calls:
            if call.input is not None:
                consumers.setdefault((id(call.input), call.input_version), []).append(call)
        plans = []  # (conv, affine module name, (a, b), activation module name, activation)
        seen = set()
        for call in calls:
            conv = call.module
            if not isinstance(conv, QuantConv2d) or id(conv) in seen or conv.folded_affine is not None:
                continue
            seen.add(id(conv))
            after = consumers.get((id(call.output), call.output_version), [])
            # one reader, a module; a shared convolution keeps its own epilogue
            if len(after) != 1 or value_reads.get(id(call.output)) or sum(1 for c in calls if c.module is conv) != 1:
                continue
            if call.output._version != call.output_version:  # changed in place after its consumer read it
                continue
            found = per_channel_affine(after[0].module, call.output)
            if found is None:
                continue
            scale, shift, inner_activation = found
            activation_name, activation = None, inner_activation or "none"
            following = consumers.get((id(after[0].output), after[0].output_version), [])
            if (inner_activation is None and len(following) == 1 and not value_reads.get(id(after[0].output))
                    and module_activation(following[0].module) is not None):
                activation_name, activation = following[0].name, module_activation(following[0].module)
            plans.append((conv, call.name, after[0].name, (scale, shift), activation_name, activation))
        _apply(model, plans)
    finally:
        model.train(was_training)
    report: Dict[str, List[str]] = {}
    for conv, conv_name, affine_name, _, activation_name, _ in plans:
        report[conv_name] = [affine_name] + ([activation_name] if activation_name else [])
    return report


def _wrapped(model: nn.Module, name: str) -> TreatedBy:
    module = model.get_submodule(name)
    if isinstance(module, TreatedBy):
        return module
    wrapper = TreatedBy(module)
    model.set_submodule(name, wrapper)
    return wrapper


def _apply(model: nn.Module, plans) -> list:
    done = []
    for conv, _, affine_name, affine, activation_name, activation in plans:
        wrappers = [_wrapped(model, affine_name)]
        if activation_name is not None:
            wrappers.append(_wrapped(model, activation_name))
        conv.folded_affine = affine
        conv.fused_activation = activation
        conv.treated_by = tuple(wrappers)
        done.append(conv)
    return done
