"""QLA adapters: a LoRA on the FFN branch and a depthwise-separable adapter on the attention branch.

Both start as exact no-ops (their last projection is zero) and are attached to a block by hooks
(`methods.qla.add_adapters`), so the host model's modules and attributes stay as they are:

- FFN branch: LoRA(h) = up(down(h)) on the MLP's normalized input h, added to the MLP output
  linear's output (in parallel with the MLP).
- Attention branch: gate · up(down(GELU(DW3×3(h)))) on the attention's input h (norm1(x); the
  block input x in post-norm blocks), added to the attention output projection's output. Patch
  tokens are laid out on their grid for the depthwise conv; class / distillation / register
  tokens bypass the conv. 1-D sequences use a depthwise conv along the tokens with padding
  tokens zeroed.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .compensation import block_input, link, primary_output, with_primary_output


class LoRAAdapter(nn.Module):
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class DWSepAdapter(nn.Module):
    """`grid` (H, W) with `prefix_tokens` leading tokens for vision tokens, or None for 1-D sequences.

    `causal` (decoders): the 1-D conv sees the current and the two previous tokens only. Decoding
    with a KV cache feeds one token at a time, so the two previous (masked) inputs are carried
    between calls as a conv state: cached generation equals uncached generation."""

    CONV_STATE = 2  # kernel 3: the two previous tokens

    def __init__(self, dim: int, rank: int, grid: Optional[Tuple[int, int]], prefix_tokens: int = 0,
                 causal: bool = False):
        super().__init__()
        if causal and grid is not None:
            raise ValueError("a causal depthwise conv is 1-D: grid must be None")
        self.grid, self.prefix_tokens, self.causal = grid, prefix_tokens, causal
        conv = nn.Conv2d if grid is not None else nn.Conv1d
        self.depthwise = conv(dim, dim, 3, padding=0 if causal else 1, groups=dim)
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.gate = nn.Parameter(torch.ones(()))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                conv_state: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.gate * self.up(self.down_path(h, token_mask, conv_state)[0])

    def down_path(self, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                  conv_state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(T, next conv state): T = down(GELU(DW(h))) [batch, tokens, rank] is what the fused form
        hands to the GEMM whose low-rank segment holds gate·up (`methods.qla.fuse`); the state
        ([batch, dim, 2], causal only, else None) continues the sequence in the next call."""
        batch, tokens, dim = h.shape
        prefix, body = h[:, : self.prefix_tokens], h[:, self.prefix_tokens:]
        next_state = None
        if self.grid is not None:
            height, width = self.grid
            if body.shape[1] != height * width:
                raise ValueError(f"DWSepAdapter expects {height}x{width} patch tokens after {self.prefix_tokens} "
                                 f"prefix tokens, got {body.shape[1]}")
            spatial = body.transpose(1, 2).reshape(batch, dim, height, width)
            body = self.depthwise(spatial).reshape(batch, dim, tokens - self.prefix_tokens).transpose(1, 2)
        else:
            if token_mask is not None:  # the mask covers the cached tokens too: its last columns are these
                body = body * token_mask[:, token_mask.shape[1] - body.shape[1]:, None].to(body.dtype)
            channels = body.transpose(1, 2)
            if self.causal:
                if conv_state is None:
                    conv_state = channels.new_zeros(batch, dim, self.CONV_STATE)
                channels = torch.cat([conv_state.to(channels.dtype), channels], dim=2)
                next_state = channels[:, :, -self.CONV_STATE:]
            body = self.depthwise(channels).transpose(1, 2)
        mixed = torch.cat([prefix, body], dim=1)
        return self.down(F.gelu(mixed)), next_state


class LoweredAdapter(nn.Module):
    """An adapter's up-projection U [out_features, rank] running in a QuantLinear's low-rank segment.

    The adapter's down path runs where its input is (a hook on the norm the adapter reads, or the
    fused block's chain) and hands T [tokens, rank] over with `prepare`; the QuantLinear's GEMM then
    adds T·Uᵀ. Gates and up biases are folded at lowering (methods.qla.fuse)."""

    def __init__(self, up: torch.Tensor):
        super().__init__()
        self.register_buffer("up", up.detach().float().contiguous(), persistent=False)
        self._pending: list = []

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def prepare(self, t: torch.Tensor) -> None:
        self._pending.append(t.reshape(-1, self.rank))

    def segments(self, dtype: torch.dtype) -> dict:
        """The low-rank segment for this call's GEMM (consumes what `prepare` stored)."""
        if not self._pending:
            raise RuntimeError("the lowered adapter got no input: was the linear called outside its block?")
        return dict(lowrank_t=self._pending.pop(0).to(dtype).contiguous(), lowrank_u=self.up.to(dtype))


# Hooks of lowered adapters (methods.qla.fuse), module-level so that a fused block can recognise
# them: its chain computes the same T itself and passes it to the GEMMs directly.

def prepare_attention_adapter(norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on the attention's norm: T_dw = down(GELU(DW(norm1(x)))) for the output projection."""
    block = norm._qla_block
    block._qla_attention_linear.lowered_adapter.prepare(attention_adapter_down_path(block, output))


def prepare_attention_adapter_from_input(block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Block pre-hook for post-norm blocks, whose attention adapter reads the block input x."""
    block._qla_attention_linear.lowered_adapter.prepare(attention_adapter_down_path(block, block_input(args, kwargs)))


def prepare_ffn_adapter(norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on the MLP's norm: T_lora = norm2(x1)·A for the MLP output linear."""
    block = norm._qla_block
    block._qla_ffn_linear.lowered_adapter.prepare(block.qla_ffn.down(output))


LOWERED_ADAPTER_HOOKS = (prepare_attention_adapter, prepare_ffn_adapter)


@dataclasses.dataclass(frozen=True)
class AdapterPlacement:
    """Where a block's adapters read and write (names relative to the block) and their shape; the
    same for every block of a model. Stored in checkpoints, so loading needs no example input."""

    norm_position: str  # "pre" | "post"
    attention_norm: str  # "" for post-norm blocks (the attention adapter reads the block input)
    mlp_norm: str
    attention_output: str
    mlp_output: str
    rank: int
    dim: int
    grid: Optional[Tuple[int, int]]  # patch grid for vision tokens, None for 1-D sequences
    prefix_tokens: int
    causal: bool = False  # decoders: causal conv with a conv state beside the KV cache

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterPlacement":
        grid = values.get("grid")
        return cls(**{**values, "grid": None if grid is None else tuple(grid)})


def adapter_width(norm: nn.Module) -> int:
    """The feature width a norm normalizes (LayerNorm, RMSNorm and library variants)."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    return norm.normalized_shape[-1]


def _continues_cached_sequence(kwargs: dict) -> bool:
    """Whether this call extends a sequence held in a non-empty KV cache (HF Cache or legacy tuple)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return False
    if hasattr(cache, "get_seq_length"):
        return cache.get_seq_length() > 0
    return len(cache) > 0


def store_adapter_mask(model, args, kwargs):
    """Model pre-hook: the padding mask, and whether causal adapters continue their conv state."""
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    continuing = _continues_cached_sequence(kwargs)
    for block in model._qla_blocks:
        block._qla_inputs["mask"] = mask
        if not continuing:
            block._qla_inputs.pop("conv_state", None)


def attention_adapter_down_path(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """T of the block's attention adapter on h, carrying a causal adapter's conv state along."""
    inputs = block._qla_inputs
    t, state = block.qla_attention.down_path(h, inputs.get("mask"), inputs.get("conv_state"))
    if state is not None:
        inputs["conv_state"] = state
    return t


def _store_block_input(block, args, kwargs):
    block._qla_inputs["attention"] = block_input(args, kwargs)


def _store_attention_input(norm, args, output):
    norm._qla_block._qla_inputs["attention"] = output


def _store_ffn_input(norm, args, output):
    norm._qla_block._qla_inputs["ffn"] = output


def _add_attention(linear, args, output):
    block = linear._qla_block
    out = primary_output(output)
    adapter = block.qla_attention.gate * block.qla_attention.up(attention_adapter_down_path(
        block, block._qla_inputs.pop("attention")))
    return with_primary_output(output, out + adapter.to(out.dtype))


def _add_ffn(linear, args, output):
    block = linear._qla_block
    out = primary_output(output)
    return with_primary_output(output, out + block.qla_ffn(block._qla_inputs.pop("ffn")).to(out.dtype))


def attach_adapters(model: nn.Module, block_names: List[str], placement: AdapterPlacement) -> None:
    """Gives each named block fresh adapters (`qla_attention`, `qla_ffn`, exact no-ops) and hooks
    them in as `placement` says. Hooks keep their state on modules (compensation.link), so deep
    copies of the model stay independent."""
    blocks = [model.get_submodule(name) for name in block_names]
    link(model, "_qla_blocks", blocks)
    model._qla_block_names, model._qla_placement = list(block_names), placement
    handles = model._qla_handles = [model.register_forward_pre_hook(store_adapter_mask, with_kwargs=True)]
    for block in blocks:
        device = next(itertools.chain(block.buffers(), block.parameters())).device
        block.qla_attention = DWSepAdapter(placement.dim, placement.rank, placement.grid, placement.prefix_tokens,
                                           placement.causal).to(device)
        block.qla_ffn = LoRAAdapter(placement.dim, placement.rank).to(device)
        block._qla_inputs = {}
        if placement.norm_position == "post":
            handles.append(block.register_forward_pre_hook(_store_block_input, with_kwargs=True))
        else:
            norm = block.get_submodule(placement.attention_norm)
            link(norm, "_qla_block", block)
            handles.append(norm.register_forward_hook(_store_attention_input))
        mlp_norm = block.get_submodule(placement.mlp_norm)
        link(mlp_norm, "_qla_block", block)
        handles.append(mlp_norm.register_forward_hook(_store_ffn_input))
        for name, hook in ((placement.attention_output, _add_attention), (placement.mlp_output, _add_ffn)):
            linear = block.get_submodule(name)
            link(linear, "_qla_block", block)
            handles.append(linear.register_forward_hook(hook))
