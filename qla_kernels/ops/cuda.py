"""Binds the `qla_kernels._C` CUDA kernels as custom ops.

`_C` takes raw device pointers and the current stream; this module checks the tensors it hands
over (device, dtype, contiguity) and allocates the outputs, so `_C` never sees a torch object.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .device import cuda_extension, sm_count
from .dispatch import register, register_backend
from .operands import FusedLinearOperands

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/quantize_per_token.h


def _extension():
    module, missing = cuda_extension()
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
    """The CUDA kernel covers dynamic symmetric quantization without norm or down-projection, on
    GPUs `_C` was built for."""
    return (x.device.type == "cuda" and static_scale is None and zero_point is None
            and norm_kind == "none" and down_proj is None and _built_for(_index(x.device)))


# The W4A16 decode kernel (csrc/w4a16_decode.cu): its limits and the split-K plan.
DECODE_MAX_ROWS = 16
_DECODE_CHUNK_K = 128  # K per 16-byte weight load of one lane
_DECODE_BLOCK_N = 64  # output columns per thread block
_DECODE_MAX_STAGED_VALUES = 16384  # csrc/w4a16_decode.h kDecodeMaxStagedValues
# Blocks per SM the split plan aims for: decode is bandwidth-bound, and a few resident blocks of
# 4 warps, each with one chunk of loads ahead, keep enough bytes in flight to cover DRAM latency.
_DECODE_BLOCKS_PER_SM = 4


def decode_split_plan(rows: int, out_features: int, in_features: int, sm_count: int) -> Tuple[int, int]:
    """(splits, chunks_per_split) for the decode kernel: K's 128-wide chunks are cut into `splits`
    non-empty ranges so that about `_DECODE_BLOCKS_PER_SM` blocks run per SM, each range short
    enough for its activation slice to fit the shared-memory budget."""
    chunks = in_features // _DECODE_CHUNK_K
    staged_rows = 8 if rows <= 8 else 16
    max_chunks_per_split = _DECODE_MAX_STAGED_VALUES // (staged_rows * _DECODE_CHUNK_K)
    column_blocks = -(-out_features // _DECODE_BLOCK_N)
    wanted_splits = max(1, -(-_DECODE_BLOCKS_PER_SM * sm_count // column_blocks))
    chunks_per_split = min(max(1, -(-chunks // wanted_splits)), max_chunks_per_split)
    return -(-chunks // chunks_per_split), chunks_per_split


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def runs_on(capability: Tuple[int, int], cubins: str, ptx: str) -> bool:
    """Whether code built as `cubins` ("sm_80,sm_89,sm_90a") plus `ptx` ("compute_90" or "") runs on
    a GPU of `capability`: a cubin sm_XY runs on X.Z for Z >= Y, an arch-specific one (sm_90a)
    only on X.Y itself, and PTX compute_XY is compiled by the driver for any capability >= X.Y."""
    for arch in filter(None, (a.strip() for a in cubins.split(","))):
        specific = arch.endswith("a")
        major, minor = divmod(int(arch[len("sm_"):].rstrip("a")), 10)
        if capability == (major, minor) or (not specific and capability[0] == major and capability[1] >= minor):
            return True
    if ptx:
        return capability >= divmod(int(ptx[len("compute_"):]), 10)
    return False


@functools.lru_cache(maxsize=None)
def _built_for(device_index: int) -> bool:
    """`_C` has code for this GPU (its kernels need sm_80's bf16 mma.sync; the build says which)."""
    module = _extension()
    return runs_on(torch.cuda.get_device_capability(device_index), module.CUDA_ARCHS,
                   getattr(module, "CUDA_PTX", ""))


def supports_fused_linear(operands: FusedLinearOperands) -> bool:
    """The decode kernel covers W4A16 with M <= 16 and K a multiple of 128, fp16/bf16 operands in
    the activation dtype, and bias / low-rank / residual epilogues (a gated activation runs its
    gate and up halves as one GEMM, the activation after it); everything else goes to Triton."""
    a = operands.a
    same_dtype = all(t is None or t.dtype == a.dtype
                     for t in (operands.lowrank_t, operands.lowrank_u, operands.bias, operands.residual))
    activation_ok = ((operands.activation == "none" or operands.activation in reference.GATED_ACTIVATIONS)
                     and not operands.residual_before_activation)
    return (a.device.type == "cuda" and _built_for(_index(a.device)) and operands.weight_format == "uint4_asym_groups"
            and a.dtype in (torch.float16, torch.bfloat16) and 1 <= a.shape[0] <= DECODE_MAX_ROWS
            and a.shape[1] % _DECODE_CHUNK_K == 0 and operands.group_size % 32 == 0 and same_dtype
            and operands.out_dtype == a.dtype and operands.a_zero_point is None and operands.fullrank_x is None
            and activation_ok and not operands.requant_bits and operands.gather_rows is None
            and operands.scatter_rows is None)


def fused_linear(operands: FusedLinearOperands) -> Tuple[Tensor, Tensor]:
    """ops.fused_linear on the decode kernel (the call `supports_fused_linear` accepted)."""
    gated = operands.activation in reference.GATED_ACTIVATIONS
    y = torch.ops.qla.w4a16_decode_cuda(operands.a, operands.weight, operands.weight_scale, operands.weight_zero,
                                        operands.group_size, operands.lowrank_t, operands.lowrank_u, operands.bias,
                                        None if gated else operands.residual, gated)
    if gated:  # the reference's order: act(gate)·up and the residual in fp32, then one rounding
        y = reference.apply_activation(y, operands.activation)
        y = (y if operands.residual is None else y + operands.residual.float()).to(operands.out_dtype)
    return y, y.new_empty((0,), dtype=torch.float32)


def _aligned(tensor: Tensor) -> Tensor:
    """The kernel reads 16-byte vectors; a view starting mid-vector is copied to fresh storage."""
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def _pointer(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


@torch.library.custom_op("qla::w4a16_decode_cuda", mutates_args=())
def w4a16_decode(a: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero: Tensor, group_size: int,
                 lowrank_t: Optional[Tensor], lowrank_u: Optional[Tensor], bias: Optional[Tensor],
                 residual: Optional[Tensor], out_fp32: bool = False) -> Tensor:
    """The W4A16 fused linear for M <= 16 on the CUDA decode kernel, output in a's dtype (fp32 with
    `out_fp32`: a gated activation follows in fp32, as in the reference). Operands are those of
    ops.fused_linear, already validated there (see supports_fused_linear)."""
    rows, in_features = a.shape
    out_features = weight.shape[0]
    a, weight = _aligned(a), _aligned(weight)
    out = a.new_empty((rows, out_features), dtype=torch.float32 if out_fp32 else a.dtype)
    splits, chunks_per_split = decode_split_plan(rows, out_features, in_features, sm_count(a.device))
    workspace = (a.new_empty((splits, rows, out_features), dtype=torch.float32) if splits > 1 else None)
    rank = 0 if lowrank_t is None else lowrank_t.shape[1]
    if rank == 0:
        lowrank_t = lowrank_u = None
    with torch.cuda.device(a.device):
        _extension().w4a16_decode(
            a.data_ptr(), _DTYPE_CODES[a.dtype], weight.data_ptr(), weight_scale.data_ptr(), weight_zero.data_ptr(),
            _pointer(lowrank_t), _pointer(lowrank_u), _pointer(bias), _pointer(residual), out.data_ptr(),
            _pointer(workspace), rows, out_features, in_features, group_size, rank, splits, chunks_per_split,
            out_fp32, torch.cuda.current_stream(a.device).cuda_stream,
        )
    return out


@w4a16_decode.register_fake
def _(a, weight, weight_scale, weight_zero, group_size, lowrank_t, lowrank_u, bias, residual, out_fp32=False):
    return a.new_empty((a.shape[0], weight.shape[0]), dtype=torch.float32 if out_fp32 else a.dtype)


def _status() -> Optional[str]:
    missing = cuda_extension()[1]
    if missing is None and not torch.cuda.is_available():
        return "qla_kernels._C is built, but torch sees no CUDA device"
    return missing


def _quantize_activation(x, bits, *_) -> Tuple[Tensor, Tensor, Tensor]:
    q, scale = torch.ops.qla.quantize_per_token_cuda(x, bits)
    return q, scale, x.new_empty((x.shape[0], 0))


register_backend("cuda", _status)
register("quantize_activation", "cuda", _quantize_activation,
         lambda x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
         down_from_input=False, rotate=False:
         not rotate and supports_quantize_activation(x, static_scale, zero_point, norm_kind, down_proj))
register("fused_linear", "cuda", fused_linear, supports_fused_linear)
