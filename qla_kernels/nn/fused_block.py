"""Fused transformer blocks: a quantized block's forward as a chain of pre-kernels and fused GEMMs
(DESIGN.md "Block templates"), with no dequantize → requantize round trips.

Pre-norm template, attention with one packed qkv projection (timm ViT / DeiT):

    pre1 : x → norm1 → int8 (per token, or the qkv layer's static scale) + T_qwt   quantize_activation
    qkv  : GEMM + bias → [B, N, 3, H, d]                                       fused_linear
    core : q_norm / k_norm → scaled_dot_product_attention (activation dtype) → attention norm
    aq   : attention output → int8                                              quantize_activation
    proj : GEMM + bias + [T_dw]·U_dwᵀ + residual x                 → x1         fused_linear
    pre2 : x1 → norm2 → int8 + T_lora                                           quantize_activation
    fc1  : GEMM + bias + GELU → re-quantized int8 per token for fc2             fused_linear
    fc2  : GEMM + bias + [T_lora | T_qwt]·[U_lora | U_qwt]ᵀ + residual x1 → output   fused_linear

With a `WindowLayout` (Swin) the same chain runs on a [B, H, W, C] feature map: the qkv GEMM
gathers spatial rows into (shifted, padded) window order, the attention core adds the relative-
position bias and shift mask, and proj's epilogue scatters rows back to spatial order, where the
residual and the adapter's T are read. The post-norm (BERT / RoBERTa) chain and the one around
the model's own attention module (decoders: GPT-2 / LLaMA; encoders with separate q/k/v: HF ViT,
CLIP) are described on their classes; `FusedMLP` fuses only the MLP of a block no template fits.

Fusion is a change of the block's class, not of its module tree: `fuse_block` swaps the class for
a subclass whose forward runs the chain on the block's own QuantLinears and norms, so every name,
the state dict, checkpoints and hooks on the block stay as they were. The block falls back to its
original forward (which runs the same QuantLinears one by one) whenever the chain would not be
the same computation: under the `simulate` backend (calibration and training need the
differentiable module tree), in training mode, with arguments the chain does not take, or when a
module the chain bypasses carries hooks (QLA adapters not yet lowered, observers).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import (
    fused_linear,
    gemm_zero_point,
    normalize_activation,
    normalize_quantize_activation,
    quantize_activation,
)
from ..ops.triton import supports_quantize_activation
from ..ops.dispatch import resolve_backend
from ..ops.row_maps import RowMap
from ..ops.reference import GATED_ACTIVATIONS, apply_activation
from . import forward_context
from .adapters import LOWERED_ADAPTER_HOOKS, DWSepAdapter, LoRAAdapter, attention_adapter_down_path
from .module_kinds import norm_arguments, read_norm
from .quant_linear import QuantLinear, output_scaled

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


def _quantize_input(x: torch.Tensor, layer: QuantLinear, norm: Optional[nn.Module] = None,
                    down_proj: Optional[torch.Tensor] = None, down_from_input: bool = False):
    """(codes, scales, zero point for the GEMM, T) of x for `layer`, with `norm` applied first and
    T = norm(x)·down_proj (x·down_proj with `down_from_input`) from the same read (no columns
    without `down_proj`)."""
    bits = layer.config.act_bits
    q, scale, t = quantize_activation(x, bits, static_scale=layer.input_scale, zero_point=layer.input_zero_point,
                                      down_proj=down_proj, down_from_input=down_from_input and down_proj is not None,
                                      **({} if norm is None else norm_arguments(norm)))
    return q, scale, gemm_zero_point(layer.input_zero_point, bits), t


def _mlp(a: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor], fc1: Tuple,
         fc2: QuantLinear, activation: str, residual: Optional[torch.Tensor], fc2_segments: dict,
         dtype: Optional[torch.dtype] = None, fc2_layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fc1 = (QuantizedWeight, bias) + activation on its input (int8 codes, or activations for
    W4A16), then fc2 + bias + low-rank segments (+ residual), in `dtype` (the residual's by
    default), fc2's output scaled by `fc2_layer_scale` before the residual. With dynamic scales
    for fc2, fc1's epilogue re-quantizes per token: no fp round trip."""
    dtype = dtype or residual.dtype
    weight, bias = fc1
    if fc2.config.act_bits is None:  # W4A16: fc2 reads fc1's output as it is
        hidden = fused_linear(a, scale, weight, a_zero_point=zero, bias=bias, activation=activation, out_dtype=dtype)
        hidden_q, hidden_scale, hidden_zero = hidden, None, None
    elif fc2.input_scale is None:
        hidden_q, hidden_scale = fused_linear(a, scale, weight, a_zero_point=zero, bias=bias, activation=activation,
                                              out_dtype=dtype, requant_bits=fc2.config.act_bits)
        hidden_zero = None
    else:
        hidden = fused_linear(a, scale, weight, a_zero_point=zero, bias=bias, activation=activation, out_dtype=dtype)
        hidden_q, hidden_scale, hidden_zero, _ = _quantize_input(hidden, fc2)
    weight, bias, fc2_segments = output_scaled(fc2.quantized_weight(), fc2.bias, fc2_segments, fc2_layer_scale)
    return fused_linear(hidden_q, hidden_scale, weight, a_zero_point=hidden_zero, bias=bias, residual=residual,
                        out_dtype=dtype, **fc2_segments)


def _layer_scale(block: nn.Module, name: str) -> Optional[torch.Tensor]:
    """γ of the LayerScale module `name` (its one parameter), or None without one."""
    return next(block.get_submodule(name).parameters()) if name else None


def _weight_and_bias(layer: QuantLinear) -> Tuple:
    return layer.quantized_weight(), layer.bias


def _adapter_up(layer: QuantLinear) -> Optional[torch.Tensor]:
    adapter = getattr(layer, "lowered_adapter", None)
    return None if adapter is None else adapter.up


def hooked_modules(block: nn.Module, names: Tuple[str, ...]) -> List[str]:
    """The modules among those the chain skips (each named one and its parents inside the block)
    that have hooks, other than lowered adapters' (the chain computes their T itself)."""
    hooked = []
    for name in sorted({prefix for name in names for prefix in _prefixes(name)}):
        module = block.get_submodule(name)
        if module._forward_pre_hooks or any(h not in LOWERED_ADAPTER_HOOKS for h in module._forward_hooks.values()):
            hooked.append(name)
    return hooked


def _hooks_allow_bypass(block: nn.Module, names: Tuple[str, ...]) -> bool:
    return not hooked_modules(block, names)


def _prefixes(name: str) -> Tuple[str, ...]:
    parts = name.split(".")
    return tuple(".".join(parts[:i]) for i in range(1, len(parts) + 1))


class _FusedModule(nn.Module):
    """Base of the mixins `fuse_block` puts in front of a block's class. The fused class is made
    per (block class, mixin) at run time (`_fused_class`), so pickling names the two classes it is
    made of instead of itself: `torch.save(model)` and `copy.deepcopy` rebuild it."""

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        return (_new_fused_module, (cls.__bases__[1], cls.__bases__[0]), *reduced[2:])


def _new_fused_module(block_class: type, mixin: type) -> nn.Module:
    return object.__new__(_fused_class(block_class, mixin))


class FusedPackedQKVBlock(_FusedModule):
    """Mixin placed before a block's own class by `fuse_block`; see the module docstring."""

    _qla_template: PackedQKVTemplate

    _qla_window_grid: Optional[Tuple[int, int]] = None

    def _fused_chain_applies(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        if self.training or args or any(v is not None and v is not False for v in kwargs.values()):
            return False
        grid = self._qla_window_grid  # windowed blocks: only the grid their window order was read for
        if x.dim() != (3 if grid is None else 4) or (grid is not None and tuple(x.shape[1:3]) != grid):
            return False
        if resolve_backend(x.device) == "simulate":
            return False
        return _hooks_allow_bypass(self, self._qla_template.bypassed())

    def _batch_window_rows(self, batch: int) -> RowMap:
        """The row of the flattened [batch, height, width] input each attention row reads and
        writes (−1: padding), from one image's window order (checked at fusion)."""
        per_image = self._qla_window_grid[0] * self._qla_window_grid[1]
        return RowMap(self._qla_window_rows, per_image).batched(batch)

    def _window_attention_mask(self, attention: nn.Module, windows: int, heads: int,
                               dtype: torch.dtype) -> Optional[torch.Tensor]:
        """[windows, heads, tokens, tokens]: the attention module's relative-position bias plus the
        shifted-window mask, as the windowed attention adds them to the scores."""
        bias = attention._get_rel_pos_bias() if hasattr(attention, "_get_rel_pos_bias") else None
        mask = self._qla_window_mask
        if mask is not None:
            per_image, tokens = mask.shape[0], mask.shape[1]
            mask = mask.view(1, per_image, 1, tokens, tokens).expand(windows // per_image, -1, heads, -1, -1)
            mask = mask.reshape(windows, heads, tokens, tokens)
            bias = mask if bias is None else bias + mask
        return None if bias is None else bias.to(dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self._fused_chain_applies(x, args, kwargs):
            return super().forward(x, *args, **kwargs)
        t = self._qla_template
        part = self.get_submodule
        qkv, proj, fc1, fc2 = part(t.qkv), part(t.proj), part(t.fc1), part(t.fc2)
        attention = part(t.attention)
        width = x.shape[-1]
        rows = x.reshape(-1, width).contiguous()
        # Windowed attention: the qkv GEMM gathers rows into window order, proj scatters them back.
        window_rows = self._batch_window_rows(x.shape[0]) if self._qla_window_grid is not None else None

        norm1 = part(t.norm1)
        qwt = getattr(fc2, "lowered_qwt", None)  # QwT's T = x·V_r from pre1's read of x (ranks the pre-kernel takes)
        qwt_down = qwt.down.to(x.dtype) if qwt is not None and qwt.down is not None else None
        if qwt_down is not None and not supports_quantize_activation(qwt_down):
            qwt_down = None
        adapter = getattr(proj, "lowered_adapter", None) is not None  # QLA's DW-separable branch reads norm1(x)
        if adapter:
            normed, q, scale, zero, qwt_t = _normalize_and_quantize(rows, norm1, qkv, qwt_down, down_from_input=True)
        else:
            q, scale, zero, qwt_t = _quantize_input(rows, qkv, norm1, qwt_down, down_from_input=True)
        packed = fused_linear(q, scale, qkv.quantized_weight(), a_zero_point=zero, bias=qkv.bias, out_dtype=x.dtype,
                              gather_rows=window_rows)
        heads, head_dim = attention_heads(attention, qkv.out_features // 3)
        if window_rows is None:
            sequences, tokens, mask = x.shape[0], x.shape[1], None
        else:
            tokens = self._qla_window_tokens
            sequences = packed.shape[0] // tokens
            mask = self._window_attention_mask(attention, sequences, heads, x.dtype)
        query, key, value = packed.reshape(sequences, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        query = getattr(attention, "q_norm", nn.Identity())(query)
        key = getattr(attention, "k_norm", nn.Identity())(key)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        context = context.transpose(1, 2).reshape(sequences * tokens, heads * head_dim)
        context = getattr(attention, "norm", nn.Identity())(context).contiguous()

        adapter_t = None  # in spatial order: proj's epilogue reads T by destination row
        if adapter:
            adapter_t = self.qla_attention.down_path(normed.reshape(x.shape))[0].reshape(rows.shape[0], -1)
        q, scale, zero, _ = _quantize_input(context, proj)
        weight, bias, segments = output_scaled(proj.quantized_weight(), proj.bias,
                                                proj.lowered_segments(x.dtype, adapter_t, _adapter_up(proj)),
                                                _layer_scale(self, t.attention_scale))
        x1 = fused_linear(q, scale, weight, a_zero_point=zero, bias=bias, residual=rows, out_dtype=x.dtype,
                          scatter_rows=window_rows, out_rows=rows.shape[0], **segments)

        lora = getattr(fc2, "lowered_adapter", None) is not None  # QLA's LoRA: T from the norm2 pre-kernel
        down = self.qla_ffn.down.weight.t().to(x.dtype).contiguous() if lora else None
        q, scale, zero, lora_t = _quantize_input(x1, fc1, part(t.norm2), down)
        segments = fc2.lowered_segments(x.dtype, lora_t if lora else None, _adapter_up(fc2),
                                        qwt_t if qwt_down is not None else None)
        out = _mlp(q, scale, zero, _weight_and_bias(fc1), fc2, t.activation, x1, segments,
                   fc2_layer_scale=_layer_scale(self, t.mlp_scale))
        return out.reshape(x.shape)


class _PackedGroups(_FusedModule):
    """Fused blocks whose template runs groups of layers as one GEMM (`template.packed_groups()`:
    BERT's or LLaMA's q/k/v, SwiGLU's gate and up). Each group's quantized weights (and biases)
    are concatenated along the output features and each layer's tensors made views into them, so
    a packed GEMM costs no memory and in-place updates of a layer (load_state_dict) reach it.
    Module moves and casts (`_apply`) pack again.

    A group packs because its layers quantize their input alike when it is fused. Should that
    change later (static scales calibrated or loaded after `fuse_blocks`), the chain would apply
    the first layer's quantization to all: the block then runs its own forward and warns once
    until `fuse_blocks` is called again."""

    def _pack(self) -> None:
        self._qla_packed = {names: _pack_layers([self.get_submodule(name) for name in names])
                            for names in self._qla_template.packed_groups()}
        self._qla_packed_quantization = self._input_quantization()

    def _input_quantization(self) -> tuple:
        """Which tensors (and their in-place versions) quantize the packed layers' input."""
        return tuple((id(tensor), tensor._version) if tensor is not None else None
                     for names in self._qla_template.packed_groups() for name in names
                     for tensor in (self.get_submodule(name).input_scale, self.get_submodule(name).input_zero_point))

    def _packing_is_current(self) -> bool:
        if torch.compiler.is_compiling():
            return True
        state = self._input_quantization()
        if state == self._qla_packed_quantization:
            return True
        groups = [[self.get_submodule(name) for name in names] for names in self._qla_template.packed_groups()]
        if all(same_input_quantization(group[0], other) for group in groups for other in group[1:]):
            self._qla_packed_quantization = state  # rewritten (a state-dict load) but still alike
            return True
        if not getattr(self, "_qla_warned_stale", False):
            self._qla_warned_stale = True
            warnings.warn(f"{type(self).__name__}: the input quantization of its packed layers changed after "
                          "fuse_blocks; it runs module by module until fuse_blocks is called again", stacklevel=3)
        return False

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pack()
        return self


class FusedPostNormBlock(_PackedGroups):
    """Mixin placed before a post-norm block's own class by `fuse_block`:

    pre1 : x → int8 (one pre-kernel when query/key/value quantize alike)     quantize_activation
    q/k/v: three GEMMs + bias                                                fused_linear
    core : scaled_dot_product_attention with the block's attention mask
    proj : GEMM + bias + [T_dw]·U_dwᵀ + residual x               → s1        fused_linear
    norm1: s1 → x1 (the MLP's residual) and int8 x1 (+ T_lora = x1·A)        normalize_quantize_activation
    fc1  : GEMM + bias + GELU → re-quantized                                 fused_linear
    fc2  : GEMM + bias + [T_lora | T_qwt]·[U_lora | U_qwt]ᵀ + residual x1 → s2   fused_linear
    norm2: s2 → block output                                                 normalize_activation

    QLA's DW-separable adapter reads the block input x (a 1-D conv over tokens, padding masked): its
    block pre-hook computes T_dw, as QwT's hands over x for T_qwt = x·V_r (fitted on the pre-LN sum).

    The block's return structure (a tensor, or a 1-tuple in older transformers) is recorded at
    fusion. Any argument besides the hidden states and the attention mask (a KV cache, encoder
    states, head masks, attention outputs requested) runs the block's own forward."""

    _qla_template: PostNormTemplate
    _qla_returns_tuple: bool = False

    @staticmethod
    def _attention_mask(args: tuple, kwargs: dict):
        """(whether the call is only hidden states + mask, the mask)."""
        kwargs = dict(kwargs)
        mask = kwargs.pop("attention_mask", None)
        if args:
            mask, args = (args[0] if mask is None else mask), args[1:]
        plain = all(a is None or a is False for a in args) and all(v is None or v is False for v in kwargs.values())
        usable = mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4)
        return plain and usable, mask

    def _fused_chain_applies(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        if self.training or x.dim() != 3 or resolve_backend(x.device) == "simulate":
            return False
        return (self._attention_mask(args, kwargs)[0] and _hooks_allow_bypass(self, self._qla_template.bypassed())
                and self._packing_is_current())

    def forward(self, x: torch.Tensor, *args, **kwargs):
        plain, mask = self._attention_mask(args, kwargs)
        if not (plain and self._fused_chain_applies(x, (), {})):
            return super().forward(x, *args, **kwargs)
        t = self._qla_template
        part = self.get_submodule
        batch, tokens, width = x.shape
        rows = x.reshape(batch * tokens, width).contiguous()
        attention = part(t.attention)
        layers = [part(name) for name in (t.query, t.key, t.value)]
        heads, head_dim = attention_heads(attention, layers[0].out_features)
        if t.packed_qkv:
            q, scale, zero, _ = _quantize_input(rows, layers[0])
            weight, bias = self._qla_packed[t.packed_groups()[0]]
            packed = fused_linear(q, scale, weight, a_zero_point=zero, bias=bias, out_dtype=x.dtype)
            outputs = packed.split([layer.out_features for layer in layers], dim=1)
        else:
            outputs = []
            for layer in layers:
                q, scale, zero, _ = _quantize_input(rows, layer)
                outputs.append(fused_linear(q, scale, layer.quantized_weight(), a_zero_point=zero, bias=layer.bias,
                                            out_dtype=x.dtype))
        projected = [out.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for out in outputs]
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(x.dtype)
        context = F.scaled_dot_product_attention(*projected, attn_mask=mask, scale=getattr(attention, "scaling", None))
        context = context.transpose(1, 2).reshape(batch * tokens, heads * head_dim).contiguous()
        proj = part(t.proj)
        q, scale, zero, _ = _quantize_input(context, proj)
        # A lowered DW-separable adapter reads the block input x: its block pre-hook has prepared T.
        s1 = fused_linear(q, scale, proj.quantized_weight(), a_zero_point=zero, bias=proj.bias, residual=rows,
                          out_dtype=x.dtype, **proj.lowered_segments(x.dtype))
        fc1, fc2 = part(t.fc1), part(t.fc2)
        lora = getattr(fc2, "lowered_adapter", None) is not None  # QLA's LoRA on x1: T from the same pre-kernel
        down = self.qla_ffn.down.weight.t().to(x.dtype).contiguous() if lora else None
        x1, q, scale, zero, lora_t = _normalize_and_quantize(s1, part(t.norm1), fc1, down)
        segments = fc2.lowered_segments(x.dtype, lora_t if lora else None, _adapter_up(fc2))
        out, _ = _normalize(_mlp(q, scale, zero, _weight_and_bias(fc1), fc2, t.activation, x1, segments),
                            part(t.norm2))
        out = out.reshape(batch, tokens, width)
        return (out,) if self._qla_returns_tuple else out


def _normalize_and_quantize(rows: torch.Tensor, norm: nn.Module, layer: QuantLinear,
                            down_proj: Optional[torch.Tensor] = None, down_from_input: bool = False) -> Tuple:
    """(norm(rows) in rows.dtype, codes, scales, zero point for the GEMM, T = norm(rows)·down_proj,
    or rows·down_proj with `down_from_input`) for `layer` from one pre-kernel read of rows."""
    bits = layer.config.act_bits
    normed, q, scale, t = normalize_quantize_activation(
        rows, bits, static_scale=layer.input_scale, zero_point=layer.input_zero_point, down_proj=down_proj,
        down_from_input=down_from_input and down_proj is not None, **norm_arguments(norm))
    return normed, q, scale, gemm_zero_point(layer.input_zero_point, bits), t


def _normalize(rows: torch.Tensor, norm: nn.Module,
               down_proj: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(norm(rows) in rows.dtype, T = norm(rows)·down_proj) from one pre-kernel read of rows."""
    return normalize_activation(rows, down_proj=down_proj, **norm_arguments(norm))


class FusedModelAttentionBlock(_PackedGroups):
    """Mixin placed before a block's own class by `fuse_block` (ModelAttentionTemplate: decoders,
    and encoders with separate q/k/v). The attention module runs as the model's (its QuantLinears
    one by one; the arguments the block received are passed on by
    name, so the KV cache, rotary embeddings and masks are the model's); around it:

    pre1 : x → norm1 → activation dtype (+ the DW adapter's T)               normalize_activation
    qkv  : separate q/k/v: one packed GEMM, each layer's slice handed over   quantize_activation, fused_linear
    attn : the model's attention module; its output projection's epilogue adds the residual x → x1
    pre2 : x1 → norm2 → int8 (W8A8 / W4A8 / W4A4) or activation dtype (W4A16), + T_lora = norm2(x1)·A
    mlp  : fc1 + bias + GELU (re-quantized) | packed gate/up → silu(gate)·up (re-quantized)
    fc2  : GEMM + bias + [T_lora | T_qwt]·[U_lora | U_qwt]ᵀ + residual x1          → block output

    Cross-attention (encoder states) and returned attention weights run the block's own forward."""

    _qla_template: ModelAttentionTemplate

    def _named_arguments(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[dict]:
        """The call's arguments besides the hidden states, by name, as the block's own forward
        would see them (None when they do not bind)."""
        signature = self._qla_forward_signature
        try:
            bound = signature.bind(self, x, *args, **kwargs)
        except TypeError:
            return None
        names = list(signature.parameters)
        named = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name in names[:2]:
                continue
            if kind == inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind != inspect.Parameter.VAR_POSITIONAL:
                named[name] = value
            elif value:
                return None
        return named

    def _chain_arguments(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[dict]:
        """The arguments to pass the attention module when the chain applies to this call, else None."""
        if self.training or x.dim() != 3 or resolve_backend(x.device) == "simulate":
            return None
        named = self._named_arguments(x, args, kwargs)
        if named is None or any(named.get(name) is not None for name in ("encoder_hidden_states",
                                                                          "encoder_attention_mask")):
            return None
        if named.get("output_attentions") or not _hooks_allow_bypass(self, self._qla_template.bypassed()):
            return None
        return named if self._packing_is_current() else None

    def _fused_chain_applies(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        return self._chain_arguments(x, args, kwargs) is not None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        named = self._chain_arguments(x, args, kwargs)
        if named is None:
            return super().forward(x, *args, **kwargs)
        t = self._qla_template
        part = self.get_submodule
        batch, tokens, width = x.shape
        rows = x.reshape(batch * tokens, width).contiguous()
        packed = t.packed_attention_inputs
        first = part(packed[0]) if packed else None
        if first is not None and first.config.act_bits is not None:  # the packed q/k/v codes from the same read
            normed_rows, *codes, _ = _normalize_and_quantize(rows, part(t.norm1), first)
        else:
            normed_rows, codes = _normalize(rows, part(t.norm1))[0], (None, None, None)
        normed = normed_rows.reshape(batch, tokens, width)
        proj = part(t.attention_output)
        forward_context.enter()  # the hand-offs to the layers the model's attention code calls
        try:
            if getattr(proj, "lowered_adapter", None) is not None:  # what the norm1 hook would have prepared
                proj.lowered_adapter.prepare(attention_adapter_down_path(self, normed))
            if packed:
                self._hand_over_attention_inputs(normed_rows, *codes)
            # The residual x joins proj's epilogue (after its LayerScale): the attention returns x1.
            proj.add_to_next_output(rows, _layer_scale(self, t.attention_scale))
            attention = part(t.attention)(normed, **named)
        finally:  # what a layer did not take must not reach a later call
            untaken = [name for name in (*t.packed_attention_inputs, t.attention_output)
                       if part(name).drop_untaken_hand_offs()]
            forward_context.leave()
        if untaken:
            raise RuntimeError(f"{t.attention!r} did not call {untaken} on its input")
        x1 = (attention if isinstance(attention, torch.Tensor) else attention[0]).reshape(batch * tokens, width)
        x1 = x1.contiguous()

        inputs, fc2 = [part(name) for name in t.mlp_inputs], part(t.mlp_output)
        lora = getattr(fc2, "lowered_adapter", None) is not None  # QLA's LoRA: T from the norm2 pre-kernel
        down = self.qla_ffn.down.weight.t().to(x.dtype).contiguous() if lora else None
        norm2 = part(t.norm2)
        if inputs[0].config.act_bits is None:  # W4A16: the GEMMs read the normalized activations
            normed2, lora_t = _normalize(x1, norm2, down)
            operands = [(normed2, None, None)] * len(inputs)
        else:
            q, scale, zero, lora_t = _quantize_input(x1, inputs[0], norm2, down)
            operands = [(q, scale, zero)] + [_quantize_input(x1, layer, norm2)[:3] for layer in inputs[1:]]
        segments = fc2.lowered_segments(x.dtype, lora_t if lora else None, _adapter_up(fc2))
        mlp_scale = _layer_scale(self, t.mlp_scale)
        if len(inputs) == 1 or t.packed_mlp_inputs:
            fc1 = _weight_and_bias(inputs[0]) if len(inputs) == 1 else self._qla_packed[t.mlp_inputs]
            out = _mlp(*operands[0], fc1, fc2, t.activation, x1, segments, fc2_layer_scale=mlp_scale)
        else:  # gate and up quantized or stored differently: two GEMMs
            gate, up = [fused_linear(a, scale, layer.quantized_weight(), a_zero_point=zero, bias=layer.bias,
                                     out_dtype=x.dtype) for (a, scale, zero), layer in zip(operands, inputs)]
            hidden = apply_activation(torch.cat([gate, up], dim=1), t.activation)
            weight, bias, segments = output_scaled(fc2.quantized_weight(), fc2.bias, segments, mlp_scale)
            if fc2.config.act_bits is None:
                out = fused_linear(hidden, None, weight, bias=bias, residual=x1, out_dtype=x.dtype, **segments)
            else:
                q, scale, zero, _ = _quantize_input(hidden, fc2)
                out = fused_linear(q, scale, weight, a_zero_point=zero, bias=bias, residual=x1, out_dtype=x.dtype,
                                   **segments)
        return out.reshape(batch, tokens, width)

    def _hand_over_attention_inputs(self, normed_rows: torch.Tensor, q: Optional[torch.Tensor],
                                    scale: Optional[torch.Tensor], zero: Optional[torch.Tensor]) -> None:
        """One GEMM for the packed attention input projections, on their codes (q, scale, zero
        point) or, for W4A16 (q None), on the normalized rows; each layer returns its column slice
        when the attention module calls it."""
        names = self._qla_template.packed_attention_inputs
        layers = [self.get_submodule(name) for name in names]
        weight, bias = self._qla_packed[names]
        if q is None:
            packed = fused_linear(normed_rows, None, weight, bias=bias, out_dtype=normed_rows.dtype)
        else:
            packed = fused_linear(q, scale, weight, a_zero_point=zero, bias=bias, out_dtype=normed_rows.dtype)
        for layer, output in zip(layers, packed.split([layer.out_features for layer in layers], dim=1)):
            layer.hand_over(output)


def _pack_layers(layers: list) -> Tuple:
    """(QuantizedWeight, bias) of `layers` concatenated along the output features; each layer's
    weight tensors and bias become views into them."""
    weights = [layer.quantized_weight() for layer in layers]

    def joined(field: str) -> Optional[torch.Tensor]:
        parts = [getattr(w, field) for w in weights]
        return None if parts[0] is None else torch.cat(parts)

    packed = dataclasses.replace(weights[0], data=joined("data"), scale=joined("scale"),
                                 group_scale=joined("group_scale"), zero=joined("zero"), colsum=joined("colsum"))
    bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)
        for buffer, field in _QUANTIZED_WEIGHT_BUFFERS:
            if layer._buffers.get(buffer) is not None:
                layer._buffers[buffer] = getattr(packed, field)[rows]
        if bias is not None:
            layer.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return packed, bias


# QuantLinear buffer → QuantizedWeight field, for the tensors a packed projection concatenates.
_QUANTIZED_WEIGHT_BUFFERS = (("weight", "data"), ("weight_scale", "scale"), ("weight_group_scale", "group_scale"),
                             ("weight_zero", "zero"), ("weight_colsum", "colsum"))


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


class FusedMLP(_FusedModule):
    """Mixin placed before an MLP module's own class by `fuse_mlp`: its input is quantized once,
    fc1's epilogue applies the activation and re-quantizes per token for fc2, and fc2 adds its
    bias and lowered corrections (QwT, LoRA prepared by the norm hook) in its epilogue, so the
    hidden activations never exist in floating point. The block around it runs as it is."""

    _qla_template: MLPTemplate

    def _fused_chain_applies(self, h: torch.Tensor) -> bool:
        if self.training or h.dim() < 2 or resolve_backend(h.device) == "simulate":
            return False
        return _hooks_allow_bypass(self, self._qla_template.bypassed())

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self._fused_chain_applies(h):  # e.g. a residual passed in: not the chain's MLP
            return super().forward(h, *args, **kwargs)
        t = self._qla_template
        fc1, fc2 = self.get_submodule(t.fc1), self.get_submodule(t.fc2)
        rows = h.reshape(-1, h.shape[-1]).contiguous()
        q, scale, zero, _ = _quantize_input(rows, fc1)
        out = _mlp(q, scale, zero, _weight_and_bias(fc1), fc2, t.activation, None, fc2.lowered_segments(h.dtype),
                   h.dtype)
        return out.reshape(*h.shape[:-1], out.shape[-1])


def fuse_mlp(mlp: nn.Module, template: MLPTemplate) -> nn.Module:
    """Makes the MLP module run fc1 → activation → fc2 fused (in place; returns it). ValueError when
    its linears are not activation-quantized QuantLinears or fc1 carries a lowered correction."""
    if isinstance(mlp, FusedMLP):
        raise ValueError(f"{type(mlp).__name__} is already fused")
    if template.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {template.activation!r}")
    for name in template.linears():
        layer = mlp.get_submodule(name)
        if not isinstance(layer, QuantLinear) or layer.config.act_bits is None:
            raise ValueError(f"{name!r} must be a QuantLinear with activation quantization, got {layer!r}")
    fc1 = mlp.get_submodule(template.fc1)
    if getattr(fc1, "lowered_qwt", None) is not None or getattr(fc1, "lowered_adapter", None) is not None:
        raise ValueError(f"{template.fc1!r} carries a lowered correction; only fc2 may")
    return _swap_class(mlp, template)


_FUSED_MIXINS = {PackedQKVTemplate: FusedPackedQKVBlock, PostNormTemplate: FusedPostNormBlock,
                 ModelAttentionTemplate: FusedModelAttentionBlock, MLPTemplate: FusedMLP}
FUSED_BLOCK_TYPES = (FusedPackedQKVBlock, FusedPostNormBlock, FusedModelAttentionBlock)
FUSED_MODULE_TYPES = FUSED_BLOCK_TYPES + (FusedMLP,)  # every mixin fuse_block / fuse_mlp puts in front


def original_class(module: nn.Module) -> type:
    """The class a fused block (or fused MLP) had before `fuse_block` put its mixin in front of it
    (the fused class's second base; its MRO also holds the mixin's own bases); a module that is
    not fused keeps its class."""
    cls = type(module)
    return cls.__bases__[1] if issubclass(cls, FUSED_MODULE_TYPES) else cls


@functools.lru_cache(maxsize=None)
def _fused_class(block_class: type, mixin: type) -> type:
    # The original forward's signature, read once (decoder blocks bind their call arguments to it).
    attributes = {"__module__": __name__, "_qla_forward_signature": inspect.signature(block_class.forward)}
    return type(f"Fused{block_class.__name__}", (mixin, block_class), attributes)


def fuse_block(block: nn.Module, template, windows: Optional[WindowLayout] = None) -> nn.Module:
    """Makes `block` run the fused chain of `template` (a PackedQKVTemplate, PostNormTemplate or
    ModelAttentionTemplate; in place; returns it); `windows` for a packed-qkv block with windowed
    attention (Swin). Raises ValueError naming what does not fit: every linear must be an
    activation-quantized QuantLinear (decoders also take W4A16), the norms must compute what the
    pre-kernels do (`read_norm`), the attention module must expose its head count, only the last
    linear may carry a lowered QwT, lowered adapters need the block's own adapters, and packed
    groups must quantize their input alike."""
    if isinstance(block, FUSED_BLOCK_TYPES):
        raise ValueError(f"{type(block).__name__} is already fused")
    if windows is not None:
        if not isinstance(template, PackedQKVTemplate):
            raise ValueError(f"windowed attention needs a PackedQKVTemplate, got {type(template).__name__}")
        windows.check()
    if template.activation not in ACTIVATIONS and not isinstance(template, ModelAttentionTemplate):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {template.activation!r}")
    post_norm, decoder = isinstance(template, PostNormTemplate), isinstance(template, ModelAttentionTemplate)
    for name in (template.norm1, template.norm2):
        read_norm(block.get_submodule(name))
    proj, fc2 = ((template.attention_output, template.mlp_output) if decoder else (template.proj, template.fc2))
    for name in template.linears() + ((template.attention_output,) if decoder else ()):
        layer = block.get_submodule(name)
        if not isinstance(layer, QuantLinear) or (layer.config.act_bits is None and not decoder):
            raise ValueError(f"{name!r} must be a QuantLinear with activation quantization, got {layer!r}")
        if name != fc2 and getattr(layer, "lowered_qwt", None) is not None:
            raise ValueError(f"{name!r} carries a lowered QwT compensation; only the block's last linear may")
        if name not in (proj, fc2) and getattr(layer, "lowered_adapter", None) is not None:
            raise ValueError(f"{name!r} carries a lowered adapter; the chain runs them on proj and fc2 only")
    if getattr(block.get_submodule(proj), "lowered_adapter", None) is not None and not isinstance(
            getattr(block, "qla_attention", None), DWSepAdapter):
        raise ValueError(f"{proj!r} carries a lowered adapter but the block has no qla_attention adapter")
    if getattr(block.get_submodule(fc2), "lowered_adapter", None) is not None and not isinstance(
            getattr(block, "qla_ffn", None), LoRAAdapter):
        raise ValueError(f"{fc2!r} carries a lowered adapter but the block has no qla_ffn adapter")
    if decoder:
        gated = template.activation in GATED_ACTIVATIONS
        if template.activation not in ACTIVATIONS + GATED_ACTIVATIONS or (len(template.mlp_inputs) == 2 and not gated):
            raise ValueError(f"activation {template.activation!r} does not fit MLP inputs {template.mlp_inputs}")
        check_packable([block.get_submodule(name) for name in template.packed_attention_inputs])
        if template.packed_mlp_inputs:
            if len(template.mlp_inputs) != 2:
                raise ValueError("only a gated MLP's gate and up run as one packed GEMM")
            check_packable([block.get_submodule(name) for name in template.mlp_inputs])
        _swap_class(block, template)
        block._pack()
        return block
    attention = block.get_submodule(template.attention)
    query = block.get_submodule(template.query if post_norm else template.qkv)
    heads, head_dim = attention_heads(attention, query.out_features // (1 if post_norm else 3))
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ValueError(f"{template.attention!r} ({type(attention).__name__}) has no int head count / head size")
    if post_norm and template.packed_qkv:
        check_packable([block.get_submodule(name) for name in template.packed_groups()[0]])
    projections = (template.query, template.key, template.value) if post_norm else (template.qkv,)
    width = heads * head_dim * (1 if post_norm else 3)
    for name in projections:
        if block.get_submodule(name).out_features != width:
            raise ValueError(f"{name!r} does not produce {'' if post_norm else 'packed q, k, v for '}{heads} heads "
                             f"of {head_dim}")
    _swap_class(block, template)
    if post_norm:
        block._pack()
    if windows is not None:
        device = block.get_submodule(template.qkv).weight_scale.device
        block._qla_window_grid, block._qla_window_tokens = tuple(windows.grid), windows.window_tokens
        window_map = RowMap.build(windows.rows, windows.grid[0] * windows.grid[1])
        block.register_buffer("_qla_window_rows", window_map.indices.to(device), persistent=False)
        block.register_buffer("_qla_window_mask", None if windows.mask is None else windows.mask.to(device),
                              persistent=False)
    return block


def check_packable(layers: list) -> None:
    """ValueError unless `layers` can run as one GEMM on one input quantization: QuantLinears of one
    config and width, quantizing their input alike, all with or all without bias, none carrying
    a lowered correction."""
    if not layers:
        return
    first = layers[0]
    for layer in layers:
        if not isinstance(layer, QuantLinear) or layer.config != first.config or layer.in_features != first.in_features:
            raise ValueError("packed projections must be QuantLinears of one config and input width")
        if (layer.bias is None) != (first.bias is None):
            raise ValueError("packed projections must all have a bias or none")
        if getattr(layer, "lowered_qwt", None) is not None or getattr(layer, "lowered_adapter", None) is not None:
            raise ValueError("packed projections cannot carry lowered corrections")
        if not same_input_quantization(first, layer):
            raise ValueError("packed projections must quantize their input alike")


def same_input_quantization(first: nn.Module, second: nn.Module) -> bool:
    """Two QuantLinears reading the same tensor quantize it identically (dynamic, or equal static
    scale and zero point at equal bits): then one pre-kernel serves both."""
    if getattr(first, "config", None) is None or getattr(second, "config", None) is None:
        return False
    if first.config.act_bits != second.config.act_bits:
        return False
    pairs = ((first.input_scale, second.input_scale), (first.input_zero_point, second.input_zero_point))
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)


def _swap_class(block: nn.Module, template) -> nn.Module:
    block.__class__ = _fused_class(type(block), _FUSED_MIXINS[type(template)])
    block._qla_template = template
    return block


def unfuse_block(block: nn.Module) -> nn.Module:
    """Restores the block's (or fused MLP's) original class (in place; returns it)."""
    if not isinstance(block, FUSED_MODULE_TYPES):
        raise ValueError(f"{type(block).__name__} is not a fused block")
    block.__class__ = original_class(block)
    del block._qla_template
    for name in ("_qla_returns_tuple", "_qla_window_grid", "_qla_window_tokens", "_qla_packed",
                 "_qla_packed_quantization", "_qla_warned_stale"):
        block.__dict__.pop(name, None)
    for name in ("_qla_window_rows", "_qla_window_mask"):
        block._buffers.pop(name, None)
    return block
