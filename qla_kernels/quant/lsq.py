"""LSQ+ activation quantization: a learnable per-tensor step size and zero point, trained with
straight-through rounding gradients (LSQ, Esser et al. 2020; LSQ+, Bhalgat et al. 2020).

The forward is exactly the kernels' static activation quantizer (DESIGN.md "Numerics"):
`q = clamp(rint(x / s) + z, lo, hi)`, `x̂ = s · (q − z)`, with the zero point rounded to an
integer on the fly. LSQ+'s offset β is this `−s·z` kept on the integer grid, so the learned
(s, z) export to the fused kernels unchanged: codes during training equal the codes the
kernel computes (tested). Gradients (STE through rint; "inside" is LSQ's lo < x/s + z < hi on the
value before rounding):

    ∂x̂/∂x = 1 inside the range, 0 where clamped
    ∂x̂/∂s = (q − z) − x/s inside, (q − z) where clamped      (LSQ)
    ∂x̂/∂z = 0 inside, −s where clamped                       (LSQ+ offset, in code units)

each step-size/zero gradient multiplied by LSQ's g = 1 / sqrt(numel · qmax).

`lsq_linear` fuses the quantizer with the linear that consumes it and saves only the layer input
for backward (codes and x̂ are recomputed), so activation-only QAT keeps what fp32 training of the
same layer keeps: the one input tensor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .primitives import SCALE_EPS, dequantize, qrange, quantize_with_scale, round_ste


def _step(scale: torch.Tensor) -> torch.Tensor:
    """The step size in use: a step trained to ≤ 0 acts as the smallest scale, never a NaN."""
    return scale.detach().float().clamp_min(SCALE_EPS)


def _integer_zero(zero: Optional[torch.Tensor], bits: int) -> Optional[torch.Tensor]:
    if zero is None:
        return None
    lo, hi = qrange(bits)
    return torch.round(zero.detach().float()).clamp(lo, hi)


class _LSQLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, zero, bits):
        zero_int = _integer_zero(zero, bits)
        step = _step(scale)
        x_hat = dequantize(quantize_with_scale(x, step, bits, zero_int), step, zero_int).to(x.dtype)
        ctx.save_for_backward(x, weight, scale, zero)
        ctx.bits, ctx.has_bias = bits, bias is not None
        return F.linear(x_hat, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, scale, zero = ctx.saved_tensors
        bits = ctx.bits
        lo, hi = qrange(bits)
        zero_int = _integer_zero(zero, bits)
        step = _step(scale)
        scaled = x.float() / step
        shift = 0.0 if zero_int is None else zero_int
        inside = (scaled + shift > lo) & (scaled + shift < hi)  # LSQ's mask: on x/s before rounding
        codes = (torch.round(scaled) + shift).clamp(lo, hi) - shift
        grad_x = grad_w = grad_b = grad_scale = grad_zero = None
        grad_x_hat = grad_y @ weight.to(grad_y.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_x_hat * inside).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x_hat = (codes * step).to(x.dtype)
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x_hat.reshape(-1, x_hat.shape[-1])
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(dim=0)
        g = 1.0 / math.sqrt(x.numel() * hi)
        if ctx.needs_input_grad[3]:
            grad_scale = ((grad_x_hat.float() * (codes - scaled * inside)).sum() * g).reshape(scale.shape)
        if zero is not None and ctx.needs_input_grad[4]:
            grad_zero = ((grad_x_hat.float() * (~inside)).sum() * (-step * g)).reshape(zero.shape)
        return grad_x, grad_w, grad_b, grad_scale, grad_zero, None


def lsq_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bits: int,
) -> torch.Tensor:
    """F.linear(LSQ+ fake-quantized x, weight, bias); differentiable in x, weight, bias, scale and zero."""
    qrange(bits)
    return _LSQLinear.apply(x, weight, bias, scale, zero, bits)


class LSQPlusQuantizer(nn.Module):
    """The learnable (step size, zero point) of one activation tensor at `bits` bits.

    `zero` is None when symmetric. Initialise from calibration statistics with `initialize`
    (e.g. the scale and zero point of quant/observers.static_scale)."""

    def __init__(self, bits: int, symmetric: bool = False):
        super().__init__()
        qrange(bits)
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(()))
        self.zero = None if symmetric else nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def initialize(self, scale: float, zero: int = 0) -> None:
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        lo, hi = qrange(self.bits)
        if self.zero is None and zero != 0:
            raise ValueError("a symmetric quantizer has no zero point")
        if not lo <= zero <= hi:
            raise ValueError(f"zero must be in [{lo}, {hi}], got {zero}")
        self.scale.fill_(scale)
        if self.zero is not None:
            self.zero.fill_(zero)

    def step_size(self) -> torch.Tensor:
        """The step size the forward uses (and the kernels receive), fp32."""
        return _step(self.scale)

    def integer_zero(self) -> Optional[torch.Tensor]:
        """The zero point the forward uses (and the kernels receive), as int8; None when symmetric."""
        zero = _integer_zero(self.zero, self.bits)
        return None if zero is None else zero.to(torch.int8)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes q of x (int8), as the kernels' quantize_activation computes them."""
        return quantize_with_scale(x, self.step_size(), self.bits, _integer_zero(self.zero, self.bits))

    def extra_repr(self) -> str:
        kind = "symmetric" if self.zero is None else "asymmetric"
        return f"bits={self.bits}, {kind}"


class _LSQFakeQuantize(torch.autograd.Function):
    """x̂ = s·(clamp(rint(x/s) + z) − z) with LSQ / LSQ+ gradients (module docstring), the step
    size per tensor or per leading-dimension channel (`scale` of shape [] or [C], x [C, ...])."""

    @staticmethod
    def forward(ctx, x, scale, zero, bits):
        lo, hi = qrange(bits)
        step = _step(scale)
        step_x = step.reshape(-1, *([1] * (x.dim() - 1))) if step.dim() else step
        zero_int = _integer_zero(zero, bits)
        shift = 0.0 if zero_int is None else zero_int
        scaled = x.float() / step_x
        codes = (torch.round(scaled) + shift).clamp(lo, hi) - shift
        ctx.save_for_backward(x, scale, zero)
        ctx.bits = bits
        return (codes * step_x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero = ctx.saved_tensors
        lo, hi = qrange(ctx.bits)
        step = _step(scale)
        step_x = step.reshape(-1, *([1] * (x.dim() - 1))) if step.dim() else step
        zero_int = _integer_zero(zero, ctx.bits)
        shift = 0.0 if zero_int is None else zero_int
        scaled = x.float() / step_x
        inside = (scaled + shift > lo) & (scaled + shift < hi)
        codes = (torch.round(scaled) + shift).clamp(lo, hi) - shift
        grad = grad.float()
        per_channel = scale.dim() > 0
        g = 1.0 / math.sqrt((x[0].numel() if per_channel else x.numel()) * hi)
        grad_x = grad_scale = grad_zero = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * inside).to(x.dtype)
        if ctx.needs_input_grad[1]:
            term = grad * (codes - scaled * inside)
            grad_scale = (term.reshape(term.shape[0], -1).sum(dim=1) if per_channel else term.sum()) * g
            grad_scale = grad_scale.reshape(scale.shape)
        if zero is not None and ctx.needs_input_grad[2]:
            grad_zero = ((grad * (~inside)).sum() * (-step * g)).reshape(zero.shape)
        return grad_x, grad_scale, grad_zero, None


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    """LSQ+ fake quantization of x with a learnable step `scale` ([] per tensor, or [C] per
    channel of x's first dimension: weights) and zero point (per tensor, or None: symmetric);
    differentiable in x, scale and zero. The codes are those of `quantize_with_scale`."""
    qrange(bits)
    if scale.dim() > 1 or (scale.dim() == 1 and (x.dim() == 0 or scale.shape[0] != x.shape[0])):
        raise ValueError(f"scale must be a scalar or have one step per channel of x's first dimension "
                         f"({x.shape[0] if x.dim() else 0}), got shape {tuple(scale.shape)}")
    if zero is not None and zero.numel() != 1:
        raise ValueError(f"zero must be a per-tensor scalar, got shape {tuple(zero.shape)}")
    return _LSQFakeQuantize.apply(x, scale, zero, bits)


class LSQWeightQuantizer(nn.Module):
    """Symmetric LSQ of a weight tensor with a learnable step per output channel (its first
    dimension), initialised to the absmax step of each channel: the per-channel scales the
    kernels' weights carry."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        qrange(bits)
        self.bits = bits
        absmax = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(dim=1)
        self.scale = nn.Parameter((absmax.clamp_min(SCALE_EPS) / qrange(bits)[1]).to(weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return lsq_fake_quantize(weight, self.scale, None, self.bits)

    def step_size(self) -> torch.Tensor:
        """The per-channel step the forward uses (and the exported weight carries), fp32 [C]."""
        return _step(self.scale)

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes (int8) of `weight` at the learned steps."""
        step = self.step_size().reshape(-1, *([1] * (weight.dim() - 1)))
        lo, hi = qrange(self.bits)
        return torch.round(weight.float() / step).clamp(lo, hi).to(torch.int8)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}"


class _LSQCodes(torch.autograd.Function):
    """q − z = clamp(rint(x/s) + z) − z with the gradients that make s·(q − z) LSQ+'s x̂ when the
    caller multiplies by s itself (the step's own share of ∂x̂/∂s comes through that product):
    ∂/∂x = inside/s, ∂/∂s = −(x/s²)·inside, ∂/∂z = −1 where clamped. `step` and `zero` are
    per-tensor fp32 scalars (the zero already an integer, or None)."""

    @staticmethod
    def forward(ctx, x, step, zero, bits):
        lo, hi = qrange(bits)
        scaled = x.float() / step
        shift = 0.0 if zero is None else zero
        codes = (torch.round(scaled) + shift).clamp(lo, hi) - shift
        ctx.save_for_backward(scaled, step, zero)
        ctx.bits = bits
        return torch.nan_to_num(codes, nan=0.0)

    @staticmethod
    def backward(ctx, grad):
        scaled, step, zero = ctx.saved_tensors
        lo, hi = qrange(ctx.bits)
        shifted = scaled if zero is None else scaled + zero
        inside = (shifted > lo) & (shifted < hi)
        grad = grad.float()
        grad_x = grad * inside / step if ctx.needs_input_grad[0] else None
        grad_step = (-(grad * scaled * inside).sum() / step).reshape(step.shape) if ctx.needs_input_grad[1] else None
        grad_zero = None
        if zero is not None and ctx.needs_input_grad[2]:
            grad_zero = (-(grad * (~inside)).sum()).reshape(zero.shape)
        return grad_x, grad_step, grad_zero, None


class _ScaledGradient(torch.autograd.Function):
    """Identity in value (bit for bit), the gradient multiplied by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def lsq_codes(x: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int):
    """(q − z in fp32, the step in use) for a per-tensor LSQ+ quantizer, such that step·(q − z) is
    `lsq_fake_quantize`'s x̂ in value and in every gradient (LSQ's g included). For integer
    arithmetic on the codes: products of codes stay exact, and the caller applies the steps once
    (ops/attention.py)."""
    lo, hi = qrange(bits)
    factor = 1.0 / math.sqrt(x.numel() * hi)
    step = scale.float().reshape(()).clamp_min(SCALE_EPS)
    if step.requires_grad:
        step = _ScaledGradient.apply(step, factor)
    if zero is not None:
        zero = round_ste(zero.float().reshape(()))
        if zero.requires_grad:
            zero = _ScaledGradient.apply(zero, factor)
    return _LSQCodes.apply(x, step, zero, bits), step
