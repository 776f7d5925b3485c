"""Packed groups: layers of a fused block that run as one GEMM (BERT's or LLaMA's q/k/v,
SwiGLU's gate and up), their weights concatenated without a copy of the model's memory."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ...ops.linear_plan import LinearPlan
from ..quant_linear import QuantLinear
from .chain import FusedModule


class PackedGroups(FusedModule):
    """Fused blocks whose template runs groups of layers as one GEMM (`template.packed_groups()`).
    Each group's quantized weights (and biases) are concatenated along the output features and
    each layer's tensors made views into them, so a packed GEMM costs no memory and in-place
    updates of a layer (load_state_dict) reach it. Module moves and casts pack again.

    A group packs because its layers quantize their input alike when it is fused. Should that
    change later (static scales calibrated or loaded after `fuse_blocks`), the chain would apply
    the first layer's quantization to all: the calibration form then runs its own forward and
    warns once until `fuse_blocks` is called again (a converted layer refuses new scales)."""

    def pack(self) -> None:
        self._qla_packed = {names: _pack_layers([self.get_submodule(name) for name in names])
                            for names in self._qla_template.packed_groups()}
        self._qla_packed_quantization = self._input_quantization()
        for names in self._qla_template.packed_groups():
            for name in names:
                layer = self.get_submodule(name)
                if layer.runtime_plan is not None:  # its tensors are views into the packed ones now
                    layer.freeze()

    def packed_plans(self, check: bool) -> Dict[Tuple[str, ...], LinearPlan]:
        """Per packed group, the plan of its one GEMM (its first layer's input quantization)."""
        plans = {}
        for names, (weight, bias) in self._qla_packed.items():
            first = self.get_submodule(names[0])
            plan = LinearPlan(weight, first.config.act_bits, first.input_scale, first.input_zero_point, bias,
                              rotate=bool(first.config.rotate))
            plans[names] = plan.frozen() if check else plan
        return plans

    def _input_quantization(self) -> tuple:
        """Which tensors (and their in-place versions) quantize the packed layers' input. The
        tensors themselves, compared by identity (`_same_tensors`): an id alone could come back
        for a replacement once the old tensor is freed."""
        return tuple((tensor, tensor._version) if tensor is not None else None
                     for names in self._qla_template.packed_groups() for name in names
                     for tensor in (self.get_submodule(name).input_scale, self.get_submodule(name).input_zero_point))

    def stale_packing(self) -> str:
        """Why the packed GEMMs no longer compute what the layers would ("" while they do)."""
        if self.converted or torch.compiler.is_compiling():
            return ""
        state = self._input_quantization()
        if _same_tensors(state, self._qla_packed_quantization):
            return ""
        groups = [[self.get_submodule(name) for name in names] for names in self._qla_template.packed_groups()]
        if all(same_input_quantization(group[0], other) for group in groups for other in group[1:]):
            self._qla_packed_quantization = state  # rewritten (a state-dict load) but still alike
            return ""
        if not getattr(self, "_qla_warned_stale", False):
            self._qla_warned_stale = True
            warnings.warn(f"{type(self).__name__}: the input quantization of its packed layers changed after "
                          "fuse_blocks; it runs module by module until fuse_blocks is called again", stacklevel=4)
        return "the input quantization of its packed layers changed after fuse_blocks"


def _same_tensors(state: tuple, recorded: tuple) -> bool:
    """Whether two `_input_quantization` states hold the same tensors at the same versions."""
    return len(state) == len(recorded) and all(
        (now is None and then is None) or (now is not None and then is not None and now[0] is then[0]
                                           and now[1] == then[1]) for now, then in zip(state, recorded))


def _pack_layers(layers: list) -> Tuple:
    """(QuantizedWeight, bias) of `layers` concatenated along the output features; each layer's
    weight tensors and bias become views into them."""
    weights = [layer.quantized_weight() for layer in layers]

    def joined(field: str) -> Optional[torch.Tensor]:
        parts = [getattr(w, field) for w in weights]
        return None if parts[0] is None else torch.cat(parts)

    packed = dataclasses.replace(weights[0], data=joined("data"), scale=joined("scale"),
                                 group_scale=joined("group_scale"), zero=joined("zero"), colsum=joined("colsum"))
    bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)
        for buffer, field in _QUANTIZED_WEIGHT_BUFFERS:
            if layer._buffers.get(buffer) is not None:
                layer._buffers[buffer] = getattr(packed, field)[rows]
        if bias is not None:
            layer.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return packed, bias


# QuantLinear buffer → QuantizedWeight field, for the tensors a packed projection concatenates.
_QUANTIZED_WEIGHT_BUFFERS = (("weight", "data"), ("weight_scale", "scale"), ("weight_group_scale", "group_scale"),
                             ("weight_zero", "zero"), ("weight_colsum", "colsum"))


def check_packable(layers: list) -> None:
    """ValueError unless `layers` can run as one GEMM on one input quantization: QuantLinears of one
    config and width, quantizing their input alike, all with or all without bias, none carrying
    a lowered correction."""
    if not layers:
        return
    first = layers[0]
    for layer in layers:
        if not isinstance(layer, QuantLinear) or layer.config != first.config or layer.in_features != first.in_features:
            raise ValueError("packed projections must be QuantLinears of one config and input width")
        if (layer.bias is None) != (first.bias is None):
            raise ValueError("packed projections must all have a bias or none")
        if getattr(layer, "lowered_qwt", None) is not None or getattr(layer, "lowered_adapter", None) is not None:
            raise ValueError("packed projections cannot carry lowered corrections")
        if not same_input_quantization(first, layer):
            raise ValueError("packed projections must quantize their input alike")


def same_input_quantization(first: nn.Module, second: nn.Module) -> bool:
    """Two QuantLinears reading the same tensor quantize it identically (dynamic, or equal static
    scale and zero point at equal bits, and the same rotation): then one pre-kernel serves both."""
    if getattr(first, "config", None) is None or getattr(second, "config", None) is None:
        return False
    if first.config.act_bits != second.config.act_bits or first.config.rotate != second.config.rotate:
        return False
    pairs = ((first.input_scale, second.input_scale), (first.input_zero_point, second.input_zero_point))
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)
