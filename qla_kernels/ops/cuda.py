"""Binds the `qla_kernels._C` CUDA kernels as custom ops.

`_C` takes raw device pointers and the current stream; this module checks the tensors it hands
over (device, dtype, contiguity) and allocates the outputs, so `_C` never sees a torch object.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .dispatch import _cuda_extension_status

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/quantize_per_token.h


def _extension():
    module, missing = _cuda_extension_status()
    if module is None:
        raise RuntimeError(missing)
    return module


@torch.library.custom_op("qla::quantize_per_token_cuda", mutates_args=())
def quantize_per_token(x: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization on the GPU: x [M, K] → (int8 [M, K], fp32 [M])."""
    if x.device.type != "cuda" or x.dtype not in _DTYPE_CODES or x.dim() != 2 or not x.is_contiguous():
        raise ValueError("x must be a contiguous 2-D fp32/fp16/bf16 CUDA tensor")
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if x.numel():
        with torch.cuda.device(x.device):
            _extension().quantize_per_token(
                x.data_ptr(), _DTYPE_CODES[x.dtype], q.data_ptr(), scale.data_ptr(), rows, cols, bits,
                torch.cuda.current_stream(x.device).cuda_stream,
            )
    return q, scale


@quantize_per_token.register_fake
def _(x, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def supports_quantize_activation(x: Tensor, static_scale, zero_point, norm_kind: str, down_proj) -> bool:
    """The CUDA kernel covers dynamic symmetric quantization without norm or down-projection."""
    return (x.device.type == "cuda" and static_scale is None and zero_point is None
            and norm_kind == "none" and down_proj is None)
