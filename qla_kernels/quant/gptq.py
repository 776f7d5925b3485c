"""GPTQ (Frantar et al., 2023) for every weight format: columns are quantized one at a time and
each one's rounding error is spread over the not-yet-quantized columns through the inverse
Hessian H = 2·XᵀX/n of the layer's calibration inputs, which lowers the layer *output* error
‖XWᵀ − XŴᵀ‖ that round-to-nearest ignores.

The format's scales (and zeros) are fixed up front from the original weights as round-to-nearest
sets them (AutoGPTQ's "static groups"): per channel for W8A8 / W4A4 / W4A8, per channel and
integer group scale for W4A8 with groups (each code's step is g·s), scale and zero per group for
W4A16. GPTQ then only chooses the codes, within the range the format stores, so act-order
(processing columns by decreasing Hessian diagonal) still gives the layout the kernels read.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Tuple

import torch

from ..formats.int4 import pack_int4
from ..formats.weights import QuantizedWeight
from .config import QuantConfig
from .primitives import qrange
from .weight import quantize_weight


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """2·XᵀX/n in fp64 for inputs [..., K] (add several with `+` and divide by the batch count)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2 * x.t() @ x / max(x.shape[0], 1)


def _fixed_grid(weight: torch.Tensor, config: QuantConfig
                ) -> Tuple[torch.Tensor, torch.Tensor, int, int, Callable[[torch.Tensor], QuantizedWeight]]:
    """(step [N, K], zero [N, K] in fp64, lowest code, highest code, codes → QuantizedWeight) of
    `config`'s format with the scales round-to-nearest gives `weight`: value = (code − zero)·step."""
    rtn = quantize_weight(weight, config)
    n, k = weight.shape
    zero = torch.zeros(n, k, dtype=torch.float64)
    if rtn.format in ("int8", "int4"):  # W8A8 / W4A4 (4-bit values in int8), W4A8 per channel
        lo, hi = qrange(config.weight_bits)
        step = rtn.scale.double()[:, None].expand(n, k)
        if rtn.format == "int8":
            return step, zero, lo, hi, lambda codes: dataclasses.replace(rtn, data=codes.to(torch.int8))
        return step, zero, lo, hi, lambda codes: dataclasses.replace(rtn, data=pack_int4(codes.to(torch.int8), signed=True))
    group = rtn.group_size or k
    if rtn.format == "int4_int8_groups":  # code · g · s with the integer group scale g: codes in [-7, 7]
        step = rtn.group_scale.double().repeat_interleave(group, dim=1) * rtn.scale.double()[:, None]
        return step, zero, -7, 7, lambda codes: dataclasses.replace(rtn, data=pack_int4(codes.to(torch.int8), signed=True))
    step = rtn.scale.double().repeat_interleave(group, dim=1)  # W4A16: (code − z)·s per group, codes in [0, 15]
    zero = rtn.zero.double().repeat_interleave(group, dim=1)
    return step, zero, 0, 15, lambda codes: dataclasses.replace(rtn, data=pack_int4(codes.to(torch.uint8), signed=False))


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    config: QuantConfig,
    *,
    act_order: bool = False,
    damping: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ-quantizes `weight` [N, K] into `config`'s weight format given the input Hessian `h`
    [K, K]; the scales are round-to-nearest's (module doc), the codes GPTQ's."""
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig (W8A8, W4A8, W4A16, W4A4), got {config!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor, got {getattr(weight, 'shape', type(weight))}")
    n, k = weight.shape
    config.check_in_features(k)
    if not isinstance(h, torch.Tensor) or h.shape != (k, k):
        raise ValueError(f"h must have shape ({k}, {k}), got {tuple(getattr(h, 'shape', ()))}")
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    column_scale, column_zero, lo, hi, pack = _fixed_grid(weight.detach().float().cpu(), config)
    w = weight.detach().double().cpu().clone()

    h = h.double().cpu().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    column_scale, column_zero = column_scale[:, order], column_zero[:, order]
    h += damping * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros_like(w)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block, errors = w[:, start:end].clone(), torch.zeros(n, end - start, dtype=torch.float64)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            s, z = column_scale[:, start + i], column_zero[:, start + i]
            q = torch.clamp(torch.round(block[:, i] / s) + z, lo, hi)
            codes[:, start + i] = q
            error = (block[:, i] - (q - z) * s) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return pack(codes[:, torch.argsort(order)])


def layer_output_error(weight: torch.Tensor, quantized: QuantizedWeight, inputs: torch.Tensor) -> float:
    """‖X·Wᵀ − X·Ŵᵀ‖² / ‖X·Wᵀ‖² on `inputs` [.., K] (what GPTQ minimizes, relative)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    reference = x @ weight.double().t()
    return float((x @ quantized.dequantize().double().t() - reference).square().sum() / reference.square().sum())
