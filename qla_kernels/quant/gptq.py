"""GPTQ (Frantar et al., 2023) for the W4A16 format: columns are quantized one at a time and each
one's rounding error is spread over the not-yet-quantized columns through the inverse Hessian
H = 2·XᵀX/n of the layer's calibration inputs, which lowers the layer *output* error ‖XWᵀ − XŴᵀ‖
that round-to-nearest ignores.

Group scales and zeros are fixed up front from the original weights in natural column order
(AutoGPTQ's "static groups"), so act-order (processing columns by decreasing Hessian diagonal)
still produces the contiguous per-group layout the kernels read.
"""

from __future__ import annotations

import torch

from ..formats.int4 import pack_int4
from ..formats.weights import QuantizedWeight
from .config import W4A16
from .primitives import quantize_asymmetric


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """2·XᵀX/n in fp64 for inputs [..., K] (add several with `+` and divide by the batch count)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2 * x.t() @ x / max(x.shape[0], 1)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    config: W4A16,
    *,
    act_order: bool = False,
    damping: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ-quantizes `weight` [N, K] into the W4A16 format given the input Hessian `h` [K, K]."""
    if not isinstance(config, W4A16):
        raise ValueError(f"GPTQ here targets W4A16, got {config!r}")
    n, k = weight.shape
    config.check_in_features(k)
    if h.shape != (k, k):
        raise ValueError(f"h must have shape ({k}, {k}), got {tuple(h.shape)}")
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    group = config.group_size or k
    w = weight.detach().double().clone()
    _, scale, zero = quantize_asymmetric(w, 4, "group", group, signed=False)
    column_scale = scale.double().repeat_interleave(group, dim=1)
    column_zero = zero.double().repeat_interleave(group, dim=1)

    h = h.double().clone()
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
            q = torch.clamp(torch.round(block[:, i] / s) + z, 0, 15)
            codes[:, start + i] = q
            error = (block[:, i] - (q - z) * s) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    codes = codes[:, torch.argsort(order)].to(torch.uint8)
    return QuantizedWeight(pack_int4(codes, signed=False), "uint4_asym_groups", scale, zero=zero,
                           group_size=config.group_size)


def layer_output_error(weight: torch.Tensor, quantized: QuantizedWeight, inputs: torch.Tensor) -> float:
    """‖X·Wᵀ − X·Ŵᵀ‖² / ‖X·Wᵀ‖² on `inputs` [.., K] (what GPTQ minimizes, relative)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    reference = x @ weight.double().t()
    return float((x @ quantized.dequantize().double().t() - reference).square().sum() / reference.square().sum())
