"""Architecture facts, read off a model by running it once: where each block's norms, attention and
MLP linears are, the norm kind and position, the MLP kind and the token layout. Nothing is looked
up by architecture name and no model code is copied, so a new timm or HF model with the same
block structure is described too. DESIGN.md "Block templates" is what the facts feed.

The trace records, inside the first block, every norm and linear call in order and which tensor
each one read (by identity): the linears reading the first norm's output are the attention
inputs (qkv, or q/k/v), the next linear is the attention output projection, the linears reading
the second norm's output are the MLP inputs (fc1, or gate and up for SwiGLU) and the last linear
is the MLP output. A block whose output *is* a norm's output is post-norm (BERT, RoBERTa).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn.adapters import DWSepAdapter, LoRAAdapter
from ..nn.compensation import block_input
from ..nn.module_kinds import is_any_linear, is_norm, norm_kind_of
from .batches import run_model
from .blocks import find_blocks


@dataclasses.dataclass(frozen=True)
class BlockFacts:
    norm_kind: str  # "layernorm" | "rmsnorm"
    norm_position: str  # "pre" | "post"
    mlp_kind: str  # "gelu_mlp" | "swiglu"
    attention_norm: str  # names relative to the block
    attention_inputs: Tuple[str, ...]
    attention_output: str
    mlp_norm: str
    mlp_inputs: Tuple[str, ...]
    mlp_output: str
    output_norm: str = ""  # post-norm: the norm after the MLP's residual add, whose output is the block's


@dataclasses.dataclass(frozen=True)
class ArchitectureFacts:
    blocks: Tuple[str, ...]
    block: BlockFacts
    token_layout: str  # "sequence" (B, N, C) | "grid" (B, H, W, C: Swin windows)
    prefix_tokens: int  # class / distillation / register tokens before the patch grid (timm)
    grid: Optional[Tuple[int, int]]  # patch grid of the first block's input, when spatial


def example_input(model: nn.Module):
    """One small input batch for the model as it was built: images at the size its patch embedding
    was made for (timm `img_size`, HF `config.image_size`) with the channels of the
    first convolution; models without a fixed size (CNNs) at their config's `input_size` (timm
    `pretrained_cfg`), else 224; text models get token ids (HF `config.vocab_size`). A ValueError
    asks for an explicit example otherwise."""
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    size = _fixed_image_size(model)
    convolution = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    config = getattr(model, "config", None)
    if size is None and convolution is None and config is not None and hasattr(config, "vocab_size"):
        return {"input_ids": torch.ones(1, 8, dtype=torch.long, device=device)}
    if convolution is None:
        raise ValueError("cannot build an example input for this model (no patch embedding, convolution or "
                         "vocabulary found): pass example=")
    if size is None:
        timm_config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = tuple(timm_config.get("input_size", (3, 224, 224))[1:])
    return torch.randn(1, convolution.in_channels, *size, device=device)


def _fixed_image_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """(height, width) the model's patch embedding requires (the first module that records an
    `img_size`: timm's patch_embed, ResMLP's stem), or None when it takes any size."""
    size = next((value for module in model.modules()
                 if isinstance(value := getattr(module, "img_size", None), (int, tuple, list))), None)
    if size is None:
        config = getattr(model, "config", None)
        config = getattr(config, "vision_config", config)
        size = getattr(config, "image_size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return tuple(int(s) for s in size)


def run_hooked(model: nn.Module, batch: Any, handles: list) -> None:
    """One no-grad forward of `model` on `batch`, then the hook `handles` are removed."""
    try:
        with torch.no_grad():
            run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def without_kv_cache(args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """A block call's arguments with any Hugging Face KV cache replaced by None, so that running
    the block again (to check a conversion) neither reads nor extends the cache of the run that
    produced them."""
    def drop(value):
        return None if hasattr(value, "get_seq_length") else value

    return tuple(drop(a) for a in args), {key: drop(value) for key, value in kwargs.items()}


def _trace_block(model: nn.Module, block: nn.Module, batch: Any):
    """Runs the model; returns the block's (calls in order as (name, module, input, output), output)."""
    names = {module: name for name, module in block.named_modules()}
    calls: List[Tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    state: Dict[str, Any] = {}

    def record(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and "output" not in state:
            calls.append((names[module], module, inputs[0], output))

    def block_done(module, args, output):
        state.setdefault("output", output if isinstance(output, torch.Tensor) else output[0])
        state.setdefault("input", args[0] if args else None)

    adapters = [m for m in block.modules() if isinstance(m, (LoRAAdapter, DWSepAdapter))]
    inside_adapters = {sub for adapter in adapters for sub in adapter.modules()}  # corrections, not the block's own
    handles = [m.register_forward_hook(record) for m in block.modules()
               if (is_norm(m) or is_any_linear(m)) and m not in inside_adapters]
    handles.append(block.register_forward_hook(block_done))
    run_hooked(model, batch, handles)
    if "output" not in state:
        raise ValueError(f"block {type(block).__name__} was not called by the model's forward")
    return calls, state["output"], state["input"]


def describe(model: nn.Module, batch: Any) -> ArchitectureFacts:
    """Facts of `model` (its blocks as the first one is built) from one forward pass on `batch`.
    Raises ValueError naming what is missing when the model does not fit the block templates."""
    blocks = find_blocks(model)
    block_facts, first_input = describe_block(model, *blocks[0], batch)
    spatial = first_input is not None and first_input.dim() == 4
    prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)  # timm
    if spatial:
        grid = tuple(first_input.shape[1:3])
    elif grid is not None and first_input is not None and first_input.dim() == 3:
        # What the blocks see: CaiT's self-attention blocks run before its class token is added.
        seen = first_input.shape[1] - grid[0] * grid[1]
        if not 0 <= seen <= prefix_tokens:
            raise ValueError(f"the blocks see {first_input.shape[1]} tokens, not the {grid[0]}x{grid[1]} patch grid "
                             f"and up to {prefix_tokens} prefix tokens (pass an example at the model's image size)")
        prefix_tokens = seen
    elif first_input is not None and first_input.dim() == 3:
        found = _patch_grid(model, blocks, batch)
        if found is not None:
            grid, prefix_tokens = found
    return ArchitectureFacts(
        blocks=tuple(name for name, _ in blocks),
        block=block_facts,
        token_layout="grid" if spatial else "sequence",
        prefix_tokens=prefix_tokens,
        grid=tuple(grid) if grid is not None else None,
    )


# Tokens before the patch grid that a patch-embedding probe accepts (class, distillation, registers).
_MAX_PREFIX_TOKENS = 8


def _patch_grid(model: nn.Module, blocks, batch: Any) -> Optional[Tuple[Tuple[int, int], int]]:
    """(patch grid, prefix tokens) for vision models without timm's `patch_embed.grid_size` (HF
    ViT / DeiT / CLIP): the spatial size of the last 2-D convolution run before the first block,
    when every block sees that many tokens plus a few prefix tokens; None otherwise (text, or
    blocks seeing different token counts, as in PVT's stages)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:  # text models: no second forward pass
        return None
    token_counts, conv_grids, started = set(), [], []

    def on_block(module, args, kwargs):
        started.append(True)
        x = block_input(args, kwargs)
        token_counts.add(x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 3 else None)

    def on_conv(module, args, output):
        if not started and isinstance(output, torch.Tensor) and output.dim() == 4:
            conv_grids.append(tuple(output.shape[2:]))

    handles = [block.register_forward_pre_hook(on_block, with_kwargs=True) for _, block in blocks]
    handles += [conv.register_forward_hook(on_conv) for conv in convs]
    run_hooked(model, batch, handles)
    if not conv_grids or len(token_counts) != 1 or None in token_counts:
        return None
    (height, width), tokens = conv_grids[-1], token_counts.pop()
    prefix = tokens - height * width
    return ((height, width), prefix) if 0 <= prefix <= _MAX_PREFIX_TOKENS else None


def describe_block(model: nn.Module, block_name: str, block: nn.Module, batch: Any):
    """(BlockFacts of `block`, its input) from one forward pass of `model` on `batch`; ValueError
    naming what is missing when the block does not fit the block templates."""
    calls, output, block_input = _trace_block(model, block, batch)
    where = f"block {block_name!r} ({type(block).__name__})"
    linear_calls = [index for index, call in enumerate(calls) if is_any_linear(call[1])]
    norm_calls = [index for index, call in enumerate(calls) if is_norm(call[1])]
    if len(linear_calls) < 4:
        raise ValueError(f"{where}: expected attention and MLP linears (at least 4), found {len(linear_calls)}")
    output_norms = [index for index in norm_calls if calls[index][3] is output]
    post_norm = bool(output_norms)

    def readers_after(start: int, tensor: Optional[torch.Tensor]) -> List[int]:
        """Linear calls after `start` reading `tensor`; if none does (the input was reshaped on
        the way, as in Swin's window partition), those reading what the first later linear reads."""
        later = [index for index in linear_calls if index > start]
        direct = [index for index in later if calls[index][2] is tensor]
        if direct or not later:
            return direct
        return [index for index in later if calls[index][2] is calls[later[0]][2]]

    if post_norm:
        attention_norm = ""
        attention_inputs = readers_after(-1, block_input)
    else:
        if not norm_calls:
            raise ValueError(f"{where}: no LayerNorm/RMSNorm inside the block and its output is not a norm's")
        attention_norm = calls[norm_calls[0]][0]
        attention_inputs = readers_after(norm_calls[0], calls[norm_calls[0]][3])
    if not attention_inputs:
        raise ValueError(f"{where}: no linear reads the attention input")
    # The attention's own readers come first; a later reader is a parallel MLP (GPT-J).
    attention_inputs = [index for index in attention_inputs
                        if not any(other not in attention_inputs for other in linear_calls
                                   if attention_inputs[0] < other < index)]
    # The output projection is the next linear back at the block's width (not a reduced-token key/value
    # linear, as in PVT's spatial-reduction attention).
    width = output.shape[-1]
    after = [index for index in linear_calls if index > attention_inputs[-1] and calls[index][3].shape[-1] == width]
    if not after:
        raise ValueError(f"{where}: no attention output projection of width {width} after "
                         f"{calls[attention_inputs[-1]][0]!r}")
    attention_output = after[0]
    mlp_norms = [index for index in norm_calls if index > attention_output]
    if not mlp_norms:
        raise ValueError(f"{where}: no norm between the attention output {calls[attention_output][0]!r} and the MLP")
    mlp_inputs = readers_after(mlp_norms[0], calls[mlp_norms[0]][3])
    if not mlp_inputs or mlp_inputs[-1] == linear_calls[-1]:
        raise ValueError(f"{where}: no MLP input and output linears after the norm {calls[mlp_norms[0]][0]!r}")
    names = lambda indices: tuple(calls[index][0] for index in indices)  # noqa: E731
    block_facts = BlockFacts(
        norm_kind=norm_kind_of(calls[norm_calls[0]][1]),
        norm_position="post" if post_norm else "pre",
        mlp_kind="swiglu" if len(mlp_inputs) == 2 else "gelu_mlp",
        attention_norm=attention_norm,
        attention_inputs=names(attention_inputs),
        attention_output=calls[attention_output][0],
        mlp_norm=calls[mlp_norms[0]][0],
        mlp_inputs=names(mlp_inputs),
        mlp_output=calls[linear_calls[-1]][0],
        output_norm=calls[output_norms[-1]][0] if post_norm else "",
    )
    return block_facts, block_input
