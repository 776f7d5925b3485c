"""The block templates: where a block keeps the parts its fused chain runs (names relative to the
block), one dataclass per chain (DESIGN.md "Block templates"), found by models/fusion.py."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class PackedQKVTemplate:
    """Where a pre-norm block with packed-qkv attention keeps its parts (names relative to the block)."""

    norm1: str
    attention: str  # the module holding num_heads, head_dim, q_norm, k_norm and (optionally) norm
    qkv: str
    proj: str
    norm2: str
    fc1: str
    fc2: str
    activation: str  # one of ACTIVATIONS, applied in fc1's epilogue
    # LayerScale modules (x·γ, DeiT-III / DINOv2) after proj and after fc2: γ scales the GEMM's
    # output channels (weight scale, bias and low-rank U), so the epilogue adds γ·y to the residual.
    attention_scale: str = ""
    mlp_scale: str = ""

    def bypassed(self) -> Tuple[str, ...]:
        """The modules the fused chain does not call (their hooks would not fire)."""
        mlp = self.fc1.rpartition(".")[0]
        scales = tuple(name for name in (self.attention_scale, self.mlp_scale) if name)
        return (self.norm1, self.attention, self.qkv, self.proj, self.norm2, mlp, self.fc1, self.fc2, *scales)

    def linears(self) -> Tuple[str, ...]:
        return (self.qkv, self.proj, self.fc1, self.fc2)


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """Windowed attention (Swin) of a packed-qkv block on a [batch, height, width, dim] input: the
    attention runs over windows of `window_tokens` rows while the residual stream stays spatial.

    `rows` (int, [window rows of one image]) is the spatial row each attention row reads (−1: a
    window padding row); attention output rows go back to the rows they came from. `mask`
    ([windows, window_tokens, window_tokens] or None) is the mask the block hands its attention
    (shifted windows); the attention module's relative-position bias is added to it."""

    grid: Tuple[int, int]
    rows: torch.Tensor
    window_tokens: int
    mask: Optional[torch.Tensor]

    def check(self) -> None:
        rows, tokens = self.rows, self.window_tokens
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.numel() % tokens:
            raise ValueError(f"window rows must be a 1-D integer tensor of whole windows of {tokens} rows")
        if self.mask is not None and tuple(self.mask.shape[1:]) != (tokens, tokens):
            raise ValueError(f"window mask must be [windows, {tokens}, {tokens}], got {tuple(self.mask.shape)}")


@dataclasses.dataclass(frozen=True)
class PostNormTemplate:
    """Where a post-norm block (BERT / RoBERTa) keeps its parts (names relative to the block)."""

    attention: str  # the module holding the head count and size (and optionally `scaling`)
    query: str
    key: str
    value: str
    proj: str
    norm1: str  # after the attention residual add; its output is x1, the MLP input and residual
    fc1: str
    fc2: str
    norm2: str  # after the MLP residual add; its output is the block's
    activation: str
    packed_qkv: bool  # query/key/value run as one GEMM from one pre-kernel (else three of each)

    def bypassed(self) -> Tuple[str, ...]:
        return (self.attention, self.query, self.key, self.value, self.proj, self.norm1, self.fc1, self.fc2,
                self.norm2)

    def linears(self) -> Tuple[str, ...]:
        return (self.query, self.key, self.value, self.proj, self.fc1, self.fc2)

    def packed_groups(self) -> Tuple[Tuple[str, ...], ...]:
        return ((self.query, self.key, self.value),) if self.packed_qkv else ()


@dataclasses.dataclass(frozen=True)
class ModelAttentionTemplate:
    """A pre-norm block whose attention module runs as the model's own: decoders (GPT-2, LLaMA) and
    encoders with separate q/k/v projections (HF ViT, CLIP). Names relative to the block."""

    norm1: str
    attention: str  # runs as the model's own module: KV cache, rotary embeddings and masks stay the model's
    attention_output: str  # inside `attention`; its epilogue adds the residual x (and a lowered DW adapter's T·U)
    norm2: str
    mlp_inputs: Tuple[str, ...]  # (fc1,), (gate, up), or (gate_up,) producing [gate | up]
    mlp_output: str
    activation: str  # one of ACTIVATIONS, or of GATED_ACTIVATIONS: act(gate(x)) * up(x)
    # SwiGLU's gate and up run as one packed GEMM with the silu(gate)·up epilogue (else two GEMMs).
    packed_mlp_inputs: bool = False
    # Separate attention input projections (LLaMA's q/k/v) run as one packed GEMM whose slices are
    # handed over to them (empty: the attention module runs its own).
    packed_attention_inputs: Tuple[str, ...] = ()
    # LayerScale modules after the attention and after the MLP (HF DINOv2), as in PackedQKVTemplate.
    attention_scale: str = ""
    mlp_scale: str = ""

    def bypassed(self) -> Tuple[str, ...]:
        mlp = self.mlp_output.rpartition(".")[0]
        scales = tuple(name for name in (self.attention_scale, self.mlp_scale) if name)
        return (self.norm1, self.norm2, *((mlp,) if mlp else ()), *self.mlp_inputs, self.mlp_output,
                self.attention_output, *self.packed_attention_inputs, *scales)

    def linears(self) -> Tuple[str, ...]:
        return (*self.mlp_inputs, self.mlp_output)

    def packed_groups(self) -> Tuple[Tuple[str, ...], ...]:
        return tuple(names for names in (self.packed_attention_inputs,
                                         self.mlp_inputs if self.packed_mlp_inputs else ()) if names)


def attention_heads(attention: nn.Module, width: int) -> Tuple[Optional[int], Optional[int]]:
    """(head count, head size) of attention over `width` features (the query projection's), from
    timm's or Hugging Face's attribute names; the size follows from the width where the module
    does not name it (timm's WindowAttention, DistilBERT)."""
    heads = next((value for name in ("num_heads", "num_attention_heads", "n_heads", "n_head")
                  if isinstance(value := getattr(attention, name, None), int)), None)
    size = getattr(attention, "head_dim", None) or getattr(attention, "attention_head_size", None)
    if size is None and heads:
        size = width // heads
    return heads, size


@dataclasses.dataclass(frozen=True)
class MLPTemplate:
    """An MLP module fc1 → activation → fc2 (names relative to the MLP), for blocks no block
    template fits: the MLP alone is fused."""

    fc1: str
    fc2: str
    activation: str  # one of ACTIVATIONS

    def bypassed(self) -> Tuple[str, ...]:
        return (self.fc1, self.fc2)

    def linears(self) -> Tuple[str, ...]:
        return (self.fc1, self.fc2)
