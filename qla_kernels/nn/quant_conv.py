"""QuantConv2d: fake-quantized convolutions for CNNs (ResNet) — simulation only.

There is no integer convolution kernel yet, so this layer computes in floating point on every
backend what an int8 implicit-GEMM convolution would: weights rounded per output channel to the
config's weight bits (symmetric; group-wise configs use per-channel scales for convolutions) and,
when the config quantizes activations, the input rounded per sample (dynamic absmax over C·H·W)
with a straight-through gradient. It exists so that QwT and QLA can be studied on CNNs;
`save_quantized` refuses it (nothing to deploy yet).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.simulate import fake_quantize
from ..quant.config import QuantConfig
from ..quant.primitives import absmax_scale, quantize_symmetric


class QuantConv2d(nn.Module):
    """An nn.Conv2d with per-output-channel weight codes and per-sample activation fake quantization."""

    def __init__(self, conv: nn.Conv2d, config: QuantConfig):
        super().__init__()
        if not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig, got {config!r}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (zeros only)")
        self.config = config
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        weight = conv.weight.detach()
        codes, scale = quantize_symmetric(weight.reshape(weight.shape[0], -1), config.weight_bits, "row")
        self.register_buffer("weight", codes.reshape(weight.shape))
        self.register_buffer("weight_scale", scale)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QuantConfig) -> "QuantConv2d":
        return cls(conv, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [batch, channels, height, width], got {tuple(x.shape)}")
        weight = (self.weight.float() * self.weight_scale[:, None, None, None]).to(x.dtype)
        if self.config.act_bits is not None:
            rows = x.reshape(x.shape[0], -1)
            scale = absmax_scale(rows.detach().abs().amax(dim=1), self.config.act_bits)
            x = fake_quantize(rows.float(), scale, self.config.act_bits).to(x.dtype).reshape(x.shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, config={self.config}, simulation only")


def quantize_convs_(model: nn.Module, config: QuantConfig,
                    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replaces, in place, every nn.Conv2d selected by `filter_fn(module, fqn)` (default: all) by a
    QuantConv2d (simulation only, see the module docstring). Returns `model`."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and (filter_fn is None or filter_fn(m, name))]
    for name, module in targets:
        model.set_submodule(name, QuantConv2d.from_float(module, config))
    return model
