"""The quantized attention core (AQ-DETR's fully quantized attention, DESIGN.md "Numerics"):

    q_c = clamp(rint(q / s_q) + z_q) − z_q            (and k_c, v_c alike; per-tensor steps)
    S   = (q_c · k_cᵀ) · (s_q·s_k·scaling) [+ mask]      integer dot, one fp32 rescale
    A   = softmax(S) in fp32
    a_c = clamp(rint(A / s_A) + z_A) − z_A
    F   = (a_c · v_c) · (s_A·s_v)                        integer dot, one fp32 rescale

At bits ≤ 7 every q − z fits int8, so both products run exactly on int8 units with int32
accumulation; at 8 bits the quantizers must be symmetric (no zero points). `mask` is additive
(float: 0 keeps, −inf or a large negative value drops) or boolean (True keeps), broadcast to
[B, H, Sq, Sk]. A NaN quantizes to the zero point (the value 0), so a query row whose every key is masked
(softmax NaN) gives a zero output row instead of NaN.

The `paper` preset's core (`TokenwiseLog2Quantization`, RepQ-ViT's setting) quantizes q, k and v
per token at run time and A on a log2 grid (quant/log2.py):

    q_c = clamp(rint(q / s_q)), s_q = max(absmax_d q, eps) / qmax   per token (and k_c, v_c alike)
    S   = ((q_c · k_cᵀ) · (s_q·scaling)) · s_kᵀ [+ mask]             integer dot, fp32 rescales
    Â   = 2^−e, e = clamp(rint(−log2 softmax(S)), 0, 2^b − 1)        exact, from the bits of A
    F   = Â · v̂,  v̂ = tf32(v_c · s_v)                                 fp32 products, fp32 sums

A per-key step of v lies along A·V's reduction, so it cannot leave that dot as a per-tensor
step does: v̂ is v dequantized and rounded to tf32 (11 significant bits, fp32's range), and Â,
a power of two, is exact in tf32, so every product Â·v̂ is exact in fp32 and only the order of
the sum differs between backends (tf32 tensor cores on a GPU; the reference sums in fp64).

`reference_attention` is the spec (integer products computed exactly in fp64 on any device);
`simulated_attention` is its differentiable twin (straight-through rounding, LSQ gradients for the
steps and zero points when they require grad), equal to it bit for bit on CPU: the integer
products of codes are exact in fp32 below 2²⁴ (in fp64 where they could reach it), and every
other operation is the same. Calls whose products could overflow int32 are refused.

`attention_rows` is the floating-point self-attention of the fused chains, on q/k/v as the qkv
GEMM wrote them: [sequences · tokens, heads · head_dim] rows (slices of one packed output keep
its row stride), the context returned in the same row layout for the output projection, so no
head permutation is copied. Its reference is torch's scaled_dot_product_attention on views.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..quant.log2 import log2_quantize
from ..quant.lsq import lsq_codes
from ..quant.primitives import SCALE_EPS, absmax_scale, qrange, round_ste, straight_through

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class AttentionQuantization:
    """The quantizers of one attention core: `bits`, `scales` fp32 [4] (the steps of q, k, v and A,
    in that order) and `zeros` [4] (their zero points, rounded to integers where used: LSQ+ trains
    them as floats; None: symmetric)."""

    bits: int
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None

    def step(self, index: int) -> torch.Tensor:
        return self.scales[index].float().clamp_min(SCALE_EPS)

    def zero(self, index: int) -> Optional[torch.Tensor]:
        return None if self.zeros is None else self.zeros[index].float()

    def kernel_operands(self):
        """(steps fp32 [4] as used, ≥ eps; zero points rounded to integers, fp32 [4] or None): what
        every backend's integer path reads, so none of them rounds or clamps on its own."""
        steps = self.scales.float().clamp_min(SCALE_EPS)
        return steps, None if self.zeros is None else self.zeros.detach().float().round()

    def largest_product_sum(self, head_dim: int, keys: int) -> int:
        """A bound on |q_c·k_c| and |a_c·v_c|: codes q − z lie within 2^(b−1) of 0 when symmetric
        and 2^b − 1 with a zero point, summed over head_dim or the keys."""
        largest = (1 << (self.bits - 1)) if self.zeros is None else (1 << self.bits) - 1
        return max(head_dim, keys) * largest * largest

    def check(self, device: torch.device) -> None:
        lo, hi = qrange(self.bits)
        if not isinstance(self.scales, torch.Tensor) or self.scales.shape != (4,) or self.scales.dtype != torch.float32:
            found = f"{getattr(self.scales, 'dtype', type(self.scales))} {tuple(getattr(self.scales, 'shape', ()))}"
            raise ValueError(f"scales must be an fp32 tensor of shape (4,) (query, key, value, probs), got {found}")
        if self.scales.device != device:
            raise ValueError(f"scales are on {self.scales.device}, expected {device} (the query's device)")
        if self.zeros is None:
            return
        if not isinstance(self.zeros, torch.Tensor) or self.zeros.shape != (4,) or self.zeros.device != device:
            raise ValueError(f"zeros must be a tensor of shape (4,) on {device}, got "
                             f"{tuple(getattr(self.zeros, 'shape', ()))} on {getattr(self.zeros, 'device', None)}")
        if self.zeros.is_meta:  # planned launches (shapes only)
            return
        values = self.zeros.detach().float().round()
        outside = ~values.isfinite() | (values < lo) | (values > hi)
        if self.bits == 8:
            outside |= values != 0
        if bool(outside.any()):  # the one host read of a valid call; which check failed is sorted out below
            if self.bits == 8:
                raise ValueError("8-bit attention must be symmetric: q − z would not fit int8")
            raise ValueError(f"zeros must round to integers in [{lo}, {hi}], got {self.zeros.tolist()}")


@dataclasses.dataclass(frozen=True)
class TokenwiseLog2Quantization:
    """The `paper` preset's quantizers (module docstring): q, k and v per token to `bits`
    (symmetric; each token's step from its absmax at run time), A on the log2 grid 2^−e,
    e ∈ [0, 2^bits − 1]. Nothing is calibrated."""

    bits: int

    def largest_product_sum(self, head_dim: int, keys: int) -> int:
        """A bound on |q_c·k_c| (codes within 2^(b−1) of 0); A·V is a float product."""
        return head_dim * (1 << (2 * self.bits - 2))

    def check(self, device: torch.device) -> None:
        qrange(self.bits)


QUANTIZATIONS = (AttentionQuantization, TokenwiseLog2Quantization)


def check_mask(mask: Optional[torch.Tensor], device: torch.device, full: tuple, axes: str) -> None:
    """A bool or float mask on `device` that broadcasts to the scores' shape `full` (named `axes`)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, *FLOAT_DTYPES):
        raise ValueError(f"mask must be a bool or float tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, the query on {device}")
    if mask.dim() > len(full) or any(size not in (1, wanted) for size, wanted in zip(reversed(mask.shape),
                                                                                    reversed(full))):
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to {axes} = {full}")


def check_attention(query, key, value, quantization: AttentionQuantization, scaling: float, mask) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in FLOAT_DTYPES or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-D [batch, heads, tokens, head_dim] float16/bfloat16/float32 "
                             f"tensor, got {getattr(tensor, 'dtype', type(tensor))} "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, the query on {query.device}")
    batch, heads, _, head_dim = query.shape
    if key.shape[:2] != (batch, heads) or key.shape[3] != head_dim:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} in batch, heads, head_dim")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value {tuple(value.shape)} must have the key's batch, heads and tokens "
                         f"{tuple(key.shape[:3])}")
    if not isinstance(quantization, QUANTIZATIONS):
        raise ValueError("quantization must be an AttentionQuantization or a TokenwiseLog2Quantization, got "
                         f"{type(quantization).__name__}")
    quantization.check(query.device)
    if quantization.largest_product_sum(head_dim, key.shape[2]) >= 1 << 31:
        raise ValueError(f"head_dim {head_dim} / {key.shape[2]} keys at {quantization.bits} bits: the integer "
                         "products could overflow the int32 accumulators")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"scaling must be a positive finite number, got {scaling!r}")
    check_mask(mask, query.device, (batch, heads, query.shape[2], key.shape[2]),
               "[batch, heads, query tokens, key tokens]")


def product_dtype(quantization, head_dim: int, keys: int) -> torch.dtype:
    """fp32 where every integer product is exact in it (below 2^24), else fp64."""
    return torch.float32 if quantization.largest_product_sum(head_dim, keys) < 1 << 24 else torch.float64


def _codes(x: torch.Tensor, quantization: AttentionQuantization, index: int) -> torch.Tensor:
    """q − z as fp32 integers (no gradient); a NaN gives 0."""
    lo, hi = qrange(quantization.bits)
    zero = quantization.zero(index)
    shift = 0.0 if zero is None else torch.round(zero)
    return torch.nan_to_num((torch.round(x.float() / quantization.step(index)) + shift).clamp(lo, hi) - shift, nan=0.0)


def masked_scores(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """scores with `mask` applied: True keeps (False → −inf), or added when float."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()


def _integer_attention(query, key, value, quantization: AttentionQuantization, scaling: float,
                       mask: Optional[torch.Tensor], product_dtype: torch.dtype) -> torch.Tensor:
    q, k, v = (_codes(t, quantization, i) for i, t in enumerate((query, key, value)))
    # integer products, exact in fp64 always and in fp32 below 2^24 (product_dtype)
    products = (q.to(product_dtype) @ k.to(product_dtype).transpose(-2, -1)).float()
    score_scale = quantization.step(0) * quantization.step(1) * scaling
    probs = torch.softmax(masked_scores(products * score_scale, mask), dim=-1)
    a = _codes(probs, quantization, 3)
    out = (a.to(product_dtype) @ v.to(product_dtype)).float()
    return (out * (quantization.step(3) * quantization.step(2))).to(query.dtype)


@torch.no_grad()
def reference_attention(query, key, value, quantization: AttentionQuantization, scaling: float,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The spec: [B, H, Sq, D] in the query's dtype; the integer products in fp64 on any device."""
    return _integer_attention(query, key, value, quantization, scaling, mask, torch.float64)


@torch.no_grad()
def cpu_attention(query, key, value, quantization: AttentionQuantization, scaling: float,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference with its integer products as fp32 GEMMs where they are exact in fp32
    (`product_dtype`; the CPU's fastest exact path for them), equal to it bit for bit."""
    dtype = product_dtype(quantization, query.shape[-1], key.shape[-2])
    return _integer_attention(query, key, value, quantization, scaling, mask, dtype)


def _lsq_codes(x: torch.Tensor, quantization: AttentionQuantization, index: int):
    zero = None if quantization.zeros is None else quantization.zeros[index]
    return lsq_codes(x, quantization.scales[index], zero, quantization.bits)


def simulated_attention(query, key, value, quantization: AttentionQuantization, scaling: float,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The differentiable twin of `reference_attention` (module docstring)."""
    (q, q_step), (k, k_step), (v, v_step) = (_lsq_codes(t, quantization, i) for i, t in enumerate((query, key, value)))
    dtype = product_dtype(quantization, query.shape[-1], key.shape[-2])
    products = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)).float()
    probs = torch.softmax(masked_scores(products * (q_step * k_step * scaling), mask), dim=-1)
    a, a_step = _lsq_codes(probs, quantization, 3)
    return ((a.to(dtype) @ v.to(dtype)).float() * (a_step * v_step)).to(query.dtype)


def tokenwise_codes(x: torch.Tensor, bits: int):
    """(codes, steps [..., 1]) of x quantized per token (its last dimension), symmetric, step
    max(absmax, eps) / qmax: the codes fp32 integers with a straight-through gradient, NaN → 0."""
    lo, hi = qrange(bits)
    x = x.float()
    steps = absmax_scale(x.detach().abs().amax(dim=-1, keepdim=True), bits)
    return torch.nan_to_num(round_ste(x / steps).clamp(lo, hi), nan=0.0), steps


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to the nearest tf32 value (10 fraction bits, ties to even), as fp32, with a
    straight-through gradient: adding 0xFFF plus the kept lowest bit carries exactly when the
    dropped 13 bits are past half, or at half with the kept bit odd."""
    def rounded(x):
        raw = x.contiguous().view(torch.int32)
        return ((raw + (0xFFF + ((raw >> 13) & 1))) & ~0x1FFF).view(torch.float32)

    return straight_through(x.float(), rounded)


def _log2_attention(query, key, value, bits: int, scaling: float, mask: Optional[torch.Tensor],
                    product_dtype: torch.dtype, sum_dtype: torch.dtype) -> torch.Tensor:
    (q, q_steps), (k, k_steps), (v, v_steps) = (tokenwise_codes(t, bits) for t in (query, key, value))
    products = (q.to(product_dtype) @ k.to(product_dtype).transpose(-2, -1)).float()
    scores = products * (q_steps * scaling) * k_steps.transpose(-2, -1)
    levels = log2_quantize(torch.softmax(masked_scores(scores, mask), dim=-1), bits)
    values = round_to_tf32(v * v_steps)
    return (levels.to(sum_dtype) @ values.to(sum_dtype)).float().to(query.dtype)


@torch.no_grad()
def reference_log2_attention(query, key, value, bits: int, scaling: float,
                             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The spec of the `paper` preset's core: [B, H, Sq, D] in the query's dtype; q_c·k_c and Â·v̂
    in fp64 (both exact products; Â·v̂ summed in fp64) on any device."""
    return _log2_attention(query, key, value, bits, scaling, mask, torch.float64, torch.float64)


def simulated_log2_attention(query, key, value, bits: int, scaling: float,
                             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference with fp32 GEMMs (q_c·k_c exact in fp32 below 2^24, else fp64; Â·v̂ summed in
    fp32, as the kernels sum it) and straight-through gradients: the cpu backend's path too."""
    dtype = product_dtype(TokenwiseLog2Quantization(bits), query.shape[-1], key.shape[-2])
    return _log2_attention(query, key, value, bits, scaling, mask, dtype, torch.float32)


def check_attention_rows(query, key, value, tokens: int, heads: int, scale: Optional[float],
                         mask: Optional[torch.Tensor]) -> None:
    """ValueError for what `attention_rows` cannot take (module docstring)."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in FLOAT_DTYPES or tensor.dim() != 2:
            raise ValueError(f"{name} must be a 2-D [sequences * tokens, heads * head_dim] float16/bfloat16/float32 "
                             f"tensor, got {getattr(tensor, 'dtype', type(tensor))} "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
        if tensor.device != query.device or tensor.dtype != query.dtype or tensor.shape != query.shape:
            raise ValueError(f"{name} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}; the query is "
                             f"{query.dtype} {tuple(query.shape)} on {query.device}")
    for name, count in (("tokens", tokens), ("heads", heads)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be a positive int, got {count!r}")
    rows, width = query.shape
    if rows % tokens or width % heads:
        raise ValueError(f"rows {tuple(query.shape)} do not split into sequences of {tokens} tokens and {heads} heads")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    check_mask(mask, query.device, (rows // tokens, heads, tokens, tokens), "[sequences, heads, tokens, tokens]")


def head_views(rows: torch.Tensor, tokens: int, heads: int) -> torch.Tensor:
    """[sequences, heads, tokens, head_dim] views of [sequences · tokens, heads · head_dim] rows."""
    return rows.unflatten(0, (-1, tokens)).unflatten(2, (heads, -1)).transpose(1, 2)


def reference_attention_rows(query, key, value, tokens: int, heads: int, scale: Optional[float] = None,
                             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The spec of `attention_rows`: scaled_dot_product_attention on head views of the rows (True
    in a bool mask keeps; a float mask adds), the context as rows [sequences · tokens, heads · head_dim]."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    context = F.scaled_dot_product_attention(*(head_views(t, tokens, heads) for t in (query, key, value)),
                                             attn_mask=mask, scale=scale)
    return context.transpose(1, 2).reshape(query.shape)
