"""QLA for CNNs: a depthwise-separable compensation beside each residual block.

    block(x) + gate ⊙ up(GELU(down(DW_k×k(x) at the block's stride)))

the QLA paper's "PTQ + Depthwise-Separable Compensation" for ResNets: depthwise k×k on the block
input at the block's stride, pointwise down to rank r, GELU, pointwise up to the block's output
channels, and a zero-initialised per-channel gate, so the block's output is unchanged until the
adapter is trained (methods.qla.train, under `simulate`). At conversion the fused block's last
convolution adds it in its low-rank segment (models/conv_blocks.py): T = GELU(down(DW(x))) per
output pixel from the block input, U = gate·up.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .compensation import block_input, primary_output, with_primary_output


class ConvAdapter(nn.Module):
    """The adapter of one block: `in_channels` → `out_channels` at `stride`, rank `rank`,
    depthwise `kernel`×`kernel` (zero padding kernel // 2). fp32 parameters."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: int, kernel: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("rank", rank),
                            ("stride", stride), ("kernel", kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (symmetric padding), got {kernel}")
        self.stride, self.kernel = stride, kernel
        self.dw = nn.Conv2d(in_channels, in_channels, kernel, stride, kernel // 2, groups=in_channels)
        self.down = nn.Conv2d(in_channels, rank, 1)
        self.up = nn.Conv2d(rank, out_channels, 1, bias=False)
        self.gate = nn.Parameter(torch.zeros(out_channels))

    @property
    def rank(self) -> int:
        return self.down.out_channels

    def down_path(self, x: torch.Tensor) -> torch.Tensor:
        """T = GELU(down(DW(x))) [N, r, Ho, Wo] in the adapter's dtype (fp32 unless cast)."""
        return F.gelu(self.down(self.dw(x.to(self.dw.weight.dtype))))

    def up_matrix(self) -> torch.Tensor:
        """U = gate·up as [out_channels, r] in the adapter's dtype: the low-rank segment's right operand."""
        return (self.gate.detach().float()[:, None] * self.up.weight.detach().float()[:, :, 0, 0]).to(self.gate.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.up(self.down_path(x)) * self.gate[None, :, None, None]).to(x.dtype)

    def to_dict(self) -> dict:
        return {"in_channels": self.dw.in_channels, "out_channels": self.up.out_channels, "rank": self.rank,
                "stride": self.stride, "kernel": self.kernel}


def _add_adapter(block, args, kwargs, output):
    return with_primary_output(output, primary_output(output) + block.qla_conv(block_input(args, kwargs)))


def attach_conv_adapter(block: nn.Module, adapter: ConvAdapter) -> None:
    """Registers `adapter` as `block.qla_conv` and adds it to the block's output (a hook)."""
    detach_conv_adapter(block)
    block.qla_conv = adapter
    block._qla_conv_handle = block.register_forward_hook(_add_adapter, with_kwargs=True)


def detach_conv_adapter(block: nn.Module) -> None:
    handle = getattr(block, "_qla_conv_handle", None)
    if handle is not None:
        handle.remove()
        block._qla_conv_handle = None


def conv_adapters(model: nn.Module) -> Dict[str, ConvAdapter]:
    """Block name → its attached (hooked) conv adapter."""
    return {name: module.qla_conv for name, module in model.named_modules()
            if isinstance(getattr(module, "qla_conv", None), ConvAdapter)
            and getattr(module, "_qla_conv_handle", None) is not None}


def rebuild_conv_adapters(model: nn.Module, entries: Dict[str, dict]) -> List[str]:
    """Attaches empty adapters as a layout (`ConvAdapter.to_dict` per block) describes them."""
    for name, entry in entries.items():
        block = model.get_submodule(name)
        device = next(iter(block.buffers()), torch.empty(0)).device
        attach_conv_adapter(block, ConvAdapter(**entry).to(device))
    return list(entries)
