"""What kind of module a module is, found by type wherever a model defines it: linears (torch's and
transformers' Conv1D, quantized or not) and norms (LayerNorm / RMSNorm, torch's or a library's),
and the norm's parameters as the pre-kernels take them. The one home of these predicates."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import reference
from .quant_linear import QuantLinear, conv1d_class


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (found by type, whatever its attribute name)."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_any_linear(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, QuantLinear)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, torch's or a library's own class (HF LlamaRMSNorm, T5LayerNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def norm_kind_of(norm: nn.Module) -> str:
    """"rmsnorm" for torch's RMSNorm and library RMS norms (HF LlamaRMSNorm, ...), else "layernorm"."""
    return "rmsnorm" if isinstance(norm, nn.RMSNorm) or "RMS" in type(norm).__name__ else "layernorm"


def norm_eps(norm: nn.Module) -> float:
    """The norm's epsilon under the names torch, timm and Hugging Face use (`eps`,
    `variance_epsilon`); torch.nn.RMSNorm's eps=None means the dtype's machine epsilon."""
    for name in ("eps", "variance_epsilon", "epsilon"):
        eps = getattr(norm, name, None)
        if eps is not None:
            return float(eps)
    if isinstance(norm, nn.RMSNorm):
        return float(torch.finfo(torch.float32).eps)
    raise ValueError(f"{type(norm).__name__} has no eps / variance_epsilon attribute")


def norm_arguments(norm: nn.Module) -> dict:
    """The norm as the pre-kernel ops take it (norm_kind, norm_weight, norm_bias, norm_eps)."""
    return dict(norm_kind=norm_kind_of(norm), norm_weight=norm_weight(norm), norm_bias=getattr(norm, "bias", None),
                norm_eps=norm_eps(norm))


def norm_weight(norm: nn.Module) -> Optional[torch.Tensor]:
    """The scale the norm multiplies by: its weight, plus 1 for norms that store the offset from 1
    (Gemma's RMSNorm computes x̂·(1 + w)); `read_norm` found out which at fusion."""
    offset = norm.__dict__.get("_qla_weight_offset", 0.0)
    return norm.weight + offset if offset else norm.weight


@torch.no_grad()
def read_norm(norm: nn.Module) -> None:
    """Checks on a probe that the norm is a LayerNorm / RMSNorm the pre-kernels compute (epsilon,
    weight, bias), with its weight used as x̂·w or as x̂·(1 + w); records which. ValueError when it
    is neither, or has no readable epsilon."""
    eps, weight = norm_eps(norm), getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"{type(norm).__name__} has no 1-D weight")
    probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    expected = norm.forward(probe).float()  # not norm(probe): hooks (QLA's) must not see the probe
    for offset in (0.0, 1.0):
        ours = reference.normalize(probe, norm_kind_of(norm), weight.float() + offset,
                                   getattr(norm, "bias", None), eps)
        if torch.allclose(ours, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max())):
            norm._qla_weight_offset = offset
            return
    raise ValueError(f"{type(norm).__name__} computes neither x̂·w nor x̂·(1 + w) of a {norm_kind_of(norm)}")
