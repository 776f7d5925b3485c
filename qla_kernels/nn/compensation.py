"""QwT compensation modules: c(x) = x·Wᵀ + b attached to a block without replacing it.

The compensation is registered as the block's submodule `qwt` (so it is in the state dict and
moves with `.to()`), and forward hooks add it to the block output, or for post-norm blocks to
the input of the block's output norm. Hooks instead of a wrapper keep every module path and
attribute the host library reads (HF decoders look up per-layer attributes) unchanged.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from . import forward_context


class QwTCompensation(nn.Module):
    """c(x) = x·Wᵀ + b, or its rank-r form (x·V)·Uᵀ + b when built by `truncated`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, down: Optional[torch.Tensor] = None,
                 output_norm: str = ""):
        super().__init__()
        self.output_norm = output_norm  # name in the block of the norm it feeds ("" : added after the block)
        self.register_buffer("weight", weight)  # [d_out, d_in], or U [d_out, r] with `down`
        self.register_buffer("bias", bias)
        self.register_buffer("down", down)  # V [d_in, r]

    @property
    def rank(self) -> Optional[int]:
        return None if self.down is None else self.down.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()  # in fp32 whatever the model was cast to (.half(), from_pretrained(dtype=...))
        if self.down is not None:
            y = y @ self.down.float()
        return torch.nn.functional.linear(y, self.weight.float(), self.bias.float()).to(x.dtype)

    def truncated(self, energy: float) -> Tuple["QwTCompensation", float]:
        """Rank-r version keeping `energy` of the squared singular values; returns it and the
        fraction actually kept."""
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if self.down is not None:
            raise ValueError("this compensation is already low-rank")
        u, s, vh = torch.linalg.svd(self.weight.double(), full_matrices=False)
        cumulative = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-300)
        rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64)).item()) + 1
        rank = min(rank, s.numel())
        kept = float(cumulative[rank - 1])
        low_rank = QwTCompensation((u[:, :rank] * s[:rank]).float().contiguous(), self.bias.clone(),
                                   vh[:rank].t().float().contiguous(),
                                   self.output_norm)
        return low_rank, kept

    def extra_repr(self) -> str:
        shape = f"d_in={self.weight.shape[1] if self.down is None else self.down.shape[0]}, d_out={self.weight.shape[0]}"
        where = f", before={self.output_norm}" if self.output_norm else ""
        return shape + ("" if self.down is None else f", rank={self.rank}") + where


class ConvQwTCompensation(QwTCompensation):
    """QwT for CNN blocks (the paper's ResNet form): c(x) = group-wise 1×1 conv of the block input
    with the block's stride, `groups` groups of input channels (64 channels each where the widths
    allow), so each output channel regresses on its group of input channels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, groups: int, stride: int):
        super().__init__(weight, bias)
        self.groups, self.stride = groups, stride  # weight [d_out, d_in / groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight[:, :, None, None].to(x.dtype)
        return torch.nn.functional.conv2d(x, weight, self.bias.to(x.dtype), self.stride, groups=self.groups)

    def truncated(self, energy: float):
        raise ValueError("a group-wise convolutional compensation has no low-rank form")

    def extra_repr(self) -> str:
        return (f"d_in={self.weight.shape[1] * self.groups}, d_out={self.weight.shape[0]}, groups={self.groups}, "
                f"stride={self.stride}")


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise ValueError("cannot find the block's input tensor (first positional argument or hidden_states=)")


def primary_output(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def with_primary_output(output, value):
    if isinstance(output, torch.Tensor):
        return value
    return type(output)((value, *output[1:])) if isinstance(output, tuple) else [value, *output[1:]]


def link(module: nn.Module, name: str, target) -> None:
    """A plain reference from `module` to another module (not registered as a child). Hooks find
    their state through such links and module attributes, never through closures, so
    `copy.deepcopy` of a model gives hooks that act on the copy."""
    object.__setattr__(module, name, target)


def _add_after(block, args, kwargs, output):
    return with_primary_output(output, primary_output(output) + block.qwt(block_input(args, kwargs)))


def _remember_input(block, args, kwargs):
    forward_context.put(block, "qwt_input", block_input(args, kwargs))


def _add_before_norm(norm, args):
    block = norm._qwt_block
    x = forward_context.take(block, "qwt_input")
    if x is None:
        raise RuntimeError(f"the norm {block.qwt.output_norm!r} ran outside its block's call: QwT has no block input")
    return (args[0] + block.qwt(x), *args[1:])


def _prepare_lowered(block, args, kwargs):
    block._qwt_lowered.prepare(block_input(args, kwargs))


def attach(block: nn.Module, compensation: QwTCompensation) -> None:
    """Registers `compensation` as `block.qwt` and hooks it in: added to the block output, or to
    the input of the block's norm named `compensation.output_norm` (post-norm blocks)."""
    detach(block)
    block.qwt = compensation
    if not compensation.output_norm:
        block._qwt_handles = [block.register_forward_hook(_add_after, with_kwargs=True)]
        return
    output_norm = block.get_submodule(compensation.output_norm)
    link(output_norm, "_qwt_block", block)
    block._qwt_handles = [block.register_forward_pre_hook(_remember_input, with_kwargs=True),
                          output_norm.register_forward_pre_hook(_add_before_norm),
                          *forward_context.scope_hooks(block)]


def detach(block: nn.Module) -> None:
    for handle in getattr(block, "_qwt_handles", []):
        handle.remove()
    block._qwt_handles = []
    if hasattr(block, "qwt"):
        del block.qwt


def compensated_blocks(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, block) of every block carrying a QwT compensation."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "qwt", None), QwTCompensation):
            yield name, module


class LoweredCompensation(nn.Module):
    """A block's QwT compensation running inside the fused GEMM of the block's last linear.

    The block's pre-hook hands over the block input x for this call (nn/forward_context.py); the
    linear's GEMM then adds (x·V)·Uᵀ in its
    low-rank segment (a truncated compensation) or x·Wᵀ in its fp16 full-rank segment (full
    rank), and b is folded into the linear's bias. x itself is never quantized: its outlier
    channels would flatten every other channel (DESIGN.md).
    """

    def __init__(self, compensation: QwTCompensation):
        super().__init__()
        self.register_buffer("up", compensation.weight.detach().clone(), persistent=False)
        self.register_buffer("down", None if compensation.down is None else compensation.down.detach().clone(),
                             persistent=False)

    def prepare(self, x: torch.Tensor) -> None:
        forward_context.put(self, "x", x.reshape(-1, x.shape[-1]))

    def take_input(self) -> torch.Tensor:
        """The block input [rows, d_in] handed over for this call."""
        rows = forward_context.take(self, "x")
        if rows is None:
            raise RuntimeError("the lowered QwT compensation got no block input: was the linear called outside its block?")
        return rows


def lower_into_linear(block: nn.Module, linear: nn.Module) -> None:
    """Moves `block.qwt` into `linear` (a QuantLinear whose output reaches the block output, or its
    output norm's input, by plain addition): bias folded, segments added by the GEMM."""
    compensation = block.qwt
    lowered = LoweredCompensation(compensation)
    bias = compensation.bias.detach()
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.clone().to(linear.weight_scale.device), requires_grad=False)
    else:
        linear.bias.data.add_(bias.to(linear.bias.dtype))
    detach(block)
    linear.lowered_qwt = lowered
    link(block, "_qwt_lowered", lowered)
    block._qwt_handles = [block.register_forward_pre_hook(_prepare_lowered, with_kwargs=True),
                          *forward_context.scope_hooks(block)]
