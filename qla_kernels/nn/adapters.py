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

from .. import ops
from . import forward_context
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
                 causal: bool = False, spatial: bool = False):
        super().__init__()
        if causal and (grid is not None or spatial):
            raise ValueError("a causal depthwise conv is 1-D: grid must be None")
        self.grid, self.prefix_tokens, self.causal, self.spatial = grid, prefix_tokens, causal, spatial
        conv = nn.Conv2d if grid is not None or spatial else nn.Conv1d
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
        ([batch, dim, 2], causal only, else None) continues the sequence in the next call.
        Spatial adapters (Swin) read h as [batch, height, width, dim] and keep that layout."""
        if self.spatial:
            if h.dim() != 4:
                raise ValueError(f"a spatial DWSepAdapter expects [batch, height, width, dim] input, got {tuple(h.shape)}")
            mixed = self.depthwise(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.down(F.gelu(mixed)), None
        batch, tokens, dim = h.shape
        prefix, body = h[:, : self.prefix_tokens], h[:, self.prefix_tokens:]
        next_state = None
        if self.grid is not None:
            height, width = self.grid
            if body.shape[1] != height * width:
                raise ValueError(f"DWSepAdapter expects {height}x{width} patch tokens after {self.prefix_tokens} "
                                 f"prefix tokens, got {body.shape[1]}")
            if self._inference(h):
                return self._down_kernel(h, height, width), None
            spatial = body.transpose(1, 2).reshape(batch, dim, height, width)
            body = self.depthwise(spatial).reshape(batch, dim, tokens - self.prefix_tokens).transpose(1, 2)
        else:
            if token_mask is not None:  # the mask covers the cached tokens too: its last columns are these
                token_mask = token_mask[:, token_mask.shape[1] - body.shape[1]:]
            if not self.causal and body.shape[1] and self._inference(h):
                # A sequence is a 1 × L grid, its 3 taps the middle row of 3 × 3.
                return self._down_kernel(h, 1, body.shape[1], token_mask), None
            if token_mask is not None:
                body = body * token_mask[:, :, None].to(body.dtype)
            channels = body.transpose(1, 2)
            if self.causal:
                if conv_state is None:
                    conv_state = channels.new_zeros(batch, dim, self.CONV_STATE)
                channels = torch.cat([conv_state.to(channels.dtype), channels], dim=2)
                next_state = channels[:, :, -self.CONV_STATE:]
            body = self.depthwise(channels).transpose(1, 2)
        mixed = torch.cat([prefix, body], dim=1)
        return self.down(F.gelu(mixed)), next_state

    def _inference(self, h: torch.Tensor) -> bool:
        return not (torch.is_grad_enabled() and (h.requires_grad or self.down.weight.requires_grad))

    def _down_kernel(self, h: torch.Tensor, height: int, width: int,
                     token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole down path as one op (ops.dwsep_down has no autograd formula: inference only)."""
        t = ops.dwsep_down(h, height, width, self.prefix_tokens, self.depthwise.weight, self.depthwise.bias,
                           self.down.weight, self.down.bias, token_mask)
        return t.reshape(h.shape[0], h.shape[1], -1)


class LoweredAdapter(nn.Module):
    """An adapter's up-projection U [out_features, rank] running in a QuantLinear's low-rank segment.

    The adapter's down path runs where its input is (a hook on the norm the adapter reads, or the
    fused block's chain) and hands T [tokens, rank] over for this call with `prepare` (through the
    forward scope, nn/forward_context.py); the QuantLinear's GEMM then adds T·Uᵀ. Gates and up
    biases are folded at lowering (methods.qla.fuse)."""

    def __init__(self, up: torch.Tensor):
        super().__init__()
        self.register_buffer("up", up.detach().float().contiguous(), persistent=False)

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def prepare(self, t: torch.Tensor) -> None:
        forward_context.put(self, "t", t.reshape(-1, self.rank))

    def take_t(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """T [rows, rank] in `dtype` handed over for this call (zeros while the block is probed, so
        the GEMM adds nothing)."""
        if forward_context.peek(self, "suspended"):
            return torch.zeros((rows, self.rank), dtype=dtype, device=self.up.device)
        t = forward_context.take(self, "t")
        if t is None:
            raise RuntimeError("the lowered adapter got no input: was the linear called outside its block?")
        return t.to(dtype).contiguous()


# Hooks of lowered adapters (methods.qla.fuse), module-level so that a fused block can recognise
# them: its chain computes the same T itself and passes it to the GEMMs directly.

def prepare_attention_adapter(norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on the attention's norm: T_dw = down(GELU(DW(norm1(x)))) for the output projection."""
    block = norm._qla_block
    if not _probing(block):
        block._qla_attention_linear.lowered_adapter.prepare(attention_adapter_down_path(block, output))


def prepare_attention_adapter_from_input(block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Block pre-hook for post-norm blocks, whose attention adapter reads the block input x."""
    block._qla_attention_linear.lowered_adapter.prepare(attention_adapter_down_path(block, block_input(args, kwargs)))


def prepare_ffn_adapter(norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on the MLP's norm: T_lora = norm2(x1)·A for the MLP output linear."""
    block = norm._qla_block
    if not _probing(block):
        block._qla_ffn_linear.lowered_adapter.prepare(block.qla_ffn.down(output))


LOWERED_ADAPTER_HOOKS = (prepare_attention_adapter, prepare_ffn_adapter)


@dataclasses.dataclass(frozen=True)
class AdapterPlacement:
    """Where a block's adapters read and write (names relative to the block) and their shape; the
    same for every block of a model. Stored in checkpoints, so loading needs no example input."""

    norm_position: str  # "pre" | "post"
    attention_norm: str  # "" for post-norm blocks (the attention adapter reads the block input)
    mlp_norm: str
    attention_input: str  # the (first) linear reading the attention input: window order is read off it
    attention_output: str
    mlp_output: str
    rank: int
    grid: Optional[Tuple[int, int]]  # patch grid for vision tokens, None for 1-D sequences
    prefix_tokens: int
    causal: bool = False  # decoders: causal conv with a conv state beside the KV cache
    spatial: bool = False  # block input [batch, height, width, dim] with windowed attention (Swin)

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
    """Model pre-hook: hands each block the padding mask and the conv states of causal adapters
    for this call. Conv states continue a sequence like its KV cache, so they ride on the cache
    object (`_qla_conv_states`, per block name): a call that extends a cached sequence reads and
    updates them, any other call starts fresh states that `attach_conv_states` puts on the cache
    the call returns."""
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    cache = kwargs.get("past_key_values")
    states = getattr(cache, "_qla_conv_states", None) if _continues_cached_sequence(kwargs) else None
    if states is None:
        states = {}
    forward_context.put(model, "conv_states", states)
    for name, block in zip(model._qla_block_names, model._qla_blocks):
        forward_context.put(block, "mask", mask)
        forward_context.put(block, "conv_state", (states, name))


def attach_conv_states(model, args, kwargs, output):
    """Model forward hook: the conv states of this call go with the KV cache it returns."""
    states = forward_context.take(model, "conv_states")
    cache = getattr(output, "past_key_values", None)
    if states and cache is not None:
        try:
            cache._qla_conv_states = states
        except AttributeError:  # a legacy tuple cache has no room for them
            raise ValueError("causal QLA adapters keep their conv state on the KV cache: use a transformers "
                             "Cache object (DynamicCache), not a tuple of tensors") from None


def attention_adapter_down_path(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """T of the block's attention adapter on h, carrying a causal adapter's conv state along, and in
    the attention's row order (Swin: spatial rows gathered into shifted-window order)."""
    states, name = forward_context.peek(block, "conv_state", (None, None))
    t, state = block.qla_attention.down_path(h, forward_context.peek(block, "mask"),
                                             None if states is None else states.get(name))
    if state is not None and states is not None:
        states[name] = state
    return _to_window_order(block, t) if block.qla_attention.spatial else t


def adapter_hooks(model: nn.Module) -> list:
    """The model-level hooks of attached adapters: its forward scope, the mask and conv states
    handed to every block, and the conv states put on the returned cache."""
    return [model.register_forward_pre_hook(store_adapter_mask, with_kwargs=True),
            model.register_forward_hook(attach_conv_states, with_kwargs=True),
            *forward_context.scope_hooks(model)]


def window_rows(block: nn.Module, norm_name: str, linear_name: str, height: int, width: int,
                dim: int) -> torch.Tensor:
    """For one image of height × width: the spatial row each row of the attention input comes from
    (−1: window padding), as int64 on the CPU. Read off the block by running it once on a probe
    whose rows are all different and matching the rows the attention input linear `linear_name`
    reads to the rows the norm `norm_name` wrote, so no window partition code is copied. Cached
    per (height, width); checked batch-major on 2 images. ValueError when the attention input is
    no such permutation."""
    maps = block.__dict__.setdefault("_qla_window_maps", {})
    if (height, width) in maps:
        return maps[height, width]
    captured = {}
    norm = block.get_submodule(norm_name)
    linear = block.get_submodule(linear_name)
    handles = [norm.register_forward_hook(lambda m, a, out: captured.setdefault("spatial", out.detach())),
               linear.register_forward_pre_hook(lambda m, a: captured.setdefault("windows", a[0].detach()))]
    reference = getattr(norm, "weight", None)
    reference = reference if isinstance(reference, torch.Tensor) else next(block.parameters())
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, height, width, dim, generator=generator).to(reference.device, reference.dtype)
    lowered = [linear.lowered_adapter for linear in (getattr(block, "_qla_attention_linear", None),
                                                     getattr(block, "_qla_ffn_linear", None))
               if getattr(linear, "lowered_adapter", None) is not None]
    outer_scope = forward_context.isolate()  # the probe's hand-offs must not meet a call in progress
    forward_context.enter()
    forward_context.put(block, "probing", True)
    for adapter in lowered:
        forward_context.put(adapter, "suspended", True)
    try:
        with torch.no_grad():
            block(probe)
    finally:
        forward_context.leave()
        forward_context.restore(outer_scope)
        for handle in handles:
            handle.remove()
    spatial = captured["spatial"].reshape(-1, dim).float().cpu()
    windows = captured["windows"].reshape(-1, dim).float().cpu()
    # Exact keys: an integer hash of each row's bits (a float dot product may round differently
    # for the same row at another position of the matrix).
    multipliers = torch.randint(1, 2**31, (dim,), generator=generator, dtype=torch.int64)
    spatial_keys, order = torch.sort((spatial.view(torch.int32).long() * multipliers).sum(dim=1))
    window_keys = (windows.view(torch.int32).long() * multipliers).sum(dim=1)
    position = torch.searchsorted(spatial_keys, window_keys).clamp(max=len(order) - 1)
    index = order[position]
    found = (spatial[index] == windows).all(dim=1)
    index = torch.where(found, index, torch.full_like(index, -1))
    per_image = height * width
    first, second = index.chunk(2)
    if (index[found].sort().values != torch.arange(2 * per_image)).any() or not torch.equal(
            torch.where(first >= 0, first + per_image, first), second):
        raise ValueError(f"{type(block).__name__}: the attention input is not a batch-major permutation of the "
                         "norm output (with padding rows); its window order cannot be read off")
    maps[height, width] = first
    return first


def _to_window_order(block: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """[batch, height, width, k] spatial values → [batch · window rows, k] in the attention's row order."""
    batch, height, width, k = values.shape
    placement = block._qla_placement
    rows = window_rows(block, placement.attention_norm, placement.attention_input, height, width,
                       block.qla_attention.depthwise.in_channels).to(values.device)
    offsets = torch.arange(batch, device=values.device)[:, None] * (height * width)
    index = torch.where(rows >= 0, rows[None] + offsets, -1).reshape(-1)
    flat = values.reshape(-1, k)
    return torch.where((index >= 0)[:, None], flat[index.clamp(min=0)], torch.zeros((), dtype=values.dtype,
                                                                                    device=values.device))


def _probing(block: nn.Module) -> bool:
    return forward_context.peek(block, "probing", False)


def _store_block_input(block, args, kwargs):
    forward_context.put(block, "attention", block_input(args, kwargs))


def _store_attention_input(norm, args, output):
    if not _probing(norm._qla_block):
        forward_context.put(norm._qla_block, "attention", output)


def _store_ffn_input(norm, args, output):
    if not _probing(norm._qla_block):
        forward_context.put(norm._qla_block, "ffn", output)


def _add_attention(linear, args, output):
    block = linear._qla_block
    if _probing(block):
        return None
    out = primary_output(output)
    adapter = block.qla_attention.gate * block.qla_attention.up(attention_adapter_down_path(
        block, forward_context.take(block, "attention")))
    return with_primary_output(output, out + adapter.reshape(out.shape).to(out.dtype))


def _add_ffn(linear, args, output):
    block = linear._qla_block
    if _probing(block):
        return None
    out = primary_output(output)
    return with_primary_output(output, out + block.qla_ffn(forward_context.take(block, "ffn")).to(out.dtype))


def attach_adapters(model: nn.Module, block_names: List[str], placement: AdapterPlacement) -> None:
    """Gives each named block fresh adapters (`qla_attention`, `qla_ffn`, exact no-ops) and hooks
    them in as `placement` says. Hooks keep their state on modules (compensation.link), so deep
    copies of the model stay independent."""
    blocks = [model.get_submodule(name) for name in block_names]
    link(model, "_qla_blocks", blocks)
    model._qla_block_names, model._qla_placement = list(block_names), placement
    handles = model._qla_handles = adapter_hooks(model)
    for block in blocks:
        device = next(itertools.chain(block.buffers(), block.parameters())).device
        dim = adapter_width(block.get_submodule(placement.mlp_norm))
        block.qla_attention = DWSepAdapter(dim, placement.rank, placement.grid, placement.prefix_tokens,
                                           placement.causal, placement.spatial).to(device)
        block.qla_ffn = LoRAAdapter(dim, placement.rank).to(device)
        link(block, "_qla_placement", placement)
        handles += forward_context.scope_hooks(block)
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
