"""The MLP alone (fc1 → activation → fc2), for blocks no block template fits: its input is
quantized once, fc1's epilogue applies the activation and re-quantizes per token for fc2, and
fc2 adds its bias and lowered corrections (QwT, LoRA prepared by the norm hook) in its epilogue,
so the hidden activations never exist in floating point. The block around it runs as it is."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .chain import FusedModule, common_reasons, mlp, quantize_input, unexpected_arguments
from .templates import MLPTemplate


class FusedMLP(FusedModule):
    """Mixin placed before an MLP module's own class by `fuse_mlp`; see the module docstring."""

    _qla_template: MLPTemplate

    def why_not_fused(self, h: torch.Tensor, args: tuple, kwargs: dict) -> str:
        if h.dim() < 2:
            return f"the input is {tuple(h.shape)}; the fused MLP takes [..., width]"
        # e.g. a residual passed in (Bloom): not the MLP the chain fuses
        return common_reasons(self, h) or unexpected_arguments(args, kwargs)

    def chain_plans(self, dtype: Optional[torch.dtype], check: bool) -> Dict[str, object]:
        t = self._qla_template
        return {name: self.get_submodule(name).build_plan(None, dtype, check) for name in (t.fc1, t.fc2)}

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        why = self.why_not_fused(h, args, kwargs)
        if why:
            return self.own_forward(why, h, *args, **kwargs)
        t = self._qla_template
        plans = self.plans(h.dtype)
        fc1, fc2 = plans[t.fc1], plans[t.fc2]
        rows = h.reshape(-1, h.shape[-1]).contiguous()
        q, scale, zero, _ = quantize_input(rows, fc1)
        lowrank_t, fullrank_x = self.get_submodule(t.fc2).correction_inputs(rows, fc2)
        out = mlp(q, scale, zero, fc1, fc2, t.activation, None, h.dtype, lowrank_t, fullrank_x)
        return out.reshape(*h.shape[:-1], out.shape[-1])
