"""LSQ+ quantization-aware layers (the calibration form of GPLQ and AQ-DETR):

- `LSQLinear`: an fp linear whose input is LSQ+ fake-quantized, and optionally its weight too
  (symmetric LSQ, one learnable step per output channel);
- `LSQConv2d`: the same for a convolution (input per tensor, weight per output channel);
- `TokenQuantLinear`: an fp linear whose input is fake-quantized as the kernels' default
  activations are, per token with dynamic absmax scales (optionally after the config's rotation):
  nothing of the quantizer to learn, the weights learn to live with it (GPLQ's dynamic form).

`full_precision()` runs every one of them, and the attention quantizers of nn/quant_attention.py,
unquantized inside its `with` block, in this thread: AQ-DETR's layer-by-layer distillation runs
the same weights both ways.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch.nn.functional as F
from torch import nn

from ..ops.simulate import fake_quantize_activation
from ..quant.config import QuantConfig
from ..quant.lsq import LSQPlusQuantizer, LSQWeightQuantizer, lsq_fake_quantize, lsq_linear
from .quant_linear import linear_weight

_local = threading.local()


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Within the block, LSQ layers and attention quantizers of this thread run unquantized."""
    depth = getattr(_local, "full_precision", 0)
    _local.full_precision = depth + 1
    try:
        yield
    finally:
        _local.full_precision = depth


def quantizing() -> bool:
    """False inside `full_precision()`."""
    return not getattr(_local, "full_precision", 0)


class LSQLinear(nn.Linear):
    """nn.Linear (fp weights, trainable) with an `input_quantizer` (LSQ+, per tensor) on its input
    and, with `weight_bits`, a `weight_quantizer` (LSQ, per output channel) on its weight.

    A subclass of nn.Linear, so structure-based code (block finding, quantize_, QuantLinear.from_float)
    treats it as the linear it replaces."""

    takes_bias_override = True  # see forward

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, symmetric: bool = False,
                 device=None, dtype=None, weight_bits: Optional[int] = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.input_quantizer = LSQPlusQuantizer(bits, symmetric).to(device)
        self.weight_quantizer = None if weight_bits is None else LSQWeightQuantizer(self.weight, weight_bits)

    @classmethod
    def from_linear(cls, module: nn.Module, bits: int, symmetric: bool = False,
                    weight_bits: Optional[int] = None) -> "LSQLinear":
        """From an nn.Linear or transformers Conv1D (whose [in, out] weight is transposed here)."""
        weight = linear_weight(module)
        bias = getattr(module, "bias", None)
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, bits, symmetric,
                    device=weight.device, dtype=weight.dtype)
        layer.weight.data.copy_(weight.detach())
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        if weight_bits is not None:
            layer.weight_quantizer = LSQWeightQuantizer(layer.weight, weight_bits)
        return layer

    def forward(self, x, bias_override=None):
        """`bias_override` replaces the bias for this call (nn/weight_reads.py)."""
        bias = self.bias if bias_override is None else bias_override
        if not quantizing():
            return F.linear(x, self.weight, bias)
        quantizer = self.input_quantizer
        if self.weight_quantizer is None:  # the fused form, which keeps only x for backward
            return lsq_linear(x, self.weight, bias, quantizer.scale, quantizer.zero, quantizer.bits)
        # a plain F.linear output, which model code may change in place (Conditional DETR's boxes)
        x_hat = lsq_fake_quantize(x, quantizer.scale, quantizer.zero, quantizer.bits)
        return F.linear(x_hat, self.weight_quantizer(self.weight), bias)


class TokenQuantLinear(nn.Linear):
    """nn.Linear (fp weights, trainable) whose input is fake-quantized per token at
    `config.act_bits` with a dynamic absmax scale, after `config`'s rotation when it has one: the
    activations a QuantLinear of `config` computes (ops/simulate.py, straight-through rounding,
    scales held constant), with the weight in fp. A subclass of nn.Linear, as LSQLinear."""

    takes_bias_override = True

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig, device=None, dtype=None):
        if config.act_bits is None:
            raise ValueError(f"{config} quantizes no activations")
        config.check_in_features(in_features)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config

    @classmethod
    def from_linear(cls, module: nn.Module, config: QuantConfig) -> "TokenQuantLinear":
        """From an nn.Linear or transformers Conv1D (whose [in, out] weight is transposed here)."""
        weight = linear_weight(module)
        bias = getattr(module, "bias", None)
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, config, device=weight.device,
                    dtype=weight.dtype)
        layer.weight.data.copy_(weight.detach())
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def forward(self, x, bias_override=None):
        """`bias_override` replaces the bias for this call (nn/weight_reads.py)."""
        bias = self.bias if bias_override is None else bias_override
        if not quantizing():
            return F.linear(x, self.weight, bias)
        rows = self.config.rotated(x.float()).reshape(-1, x.shape[-1])
        x_hat = fake_quantize_activation(rows, self.config.act_bits, None, None).reshape(x.shape)
        return F.linear(x_hat.to(x.dtype), self.config.rotated(self.weight), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config}"


class LSQConv2d(nn.Conv2d):
    """nn.Conv2d (fp weights, trainable) whose input is LSQ+ fake-quantized per tensor and whose
    weight is LSQ-quantized per output channel. Zero padding pads the fake-quantized input with
    zeros, as the integer convolution pads its codes with the zero point."""

    def __init__(self, conv: nn.Conv2d, bits: int, weight_bits: int, symmetric: bool = False):
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r}: only zero padding has an integer convolution")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                         dtype=conv.weight.dtype)
        self.weight.data.copy_(conv.weight.detach())
        if conv.bias is not None:
            self.bias.data.copy_(conv.bias.detach())
        self.input_quantizer = LSQPlusQuantizer(bits, symmetric).to(conv.weight.device)
        self.weight_quantizer = LSQWeightQuantizer(self.weight, weight_bits)

    def forward(self, x):
        if not quantizing():
            return self._conv_forward(x, self.weight, self.bias)
        quantizer = self.input_quantizer
        x_hat = lsq_fake_quantize(x, quantizer.scale, quantizer.zero, quantizer.bits)
        return self._conv_forward(x_hat, self.weight_quantizer(self.weight), self.bias)
