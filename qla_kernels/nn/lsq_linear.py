"""LSQLinear: an fp linear whose input is LSQ+ fake-quantized, for activation-first QAT (GPLQ)."""

from __future__ import annotations

from torch import nn

from ..quant.lsq import LSQPlusQuantizer, lsq_linear
from .quant_linear import linear_weight


class LSQLinear(nn.Linear):
    """nn.Linear (fp weights, trainable) with an `input_quantizer` (LSQ+, per tensor) on its input.

    A subclass of nn.Linear, so structure-based code (block finding, quantize_, QuantLinear.from_float)
    treats it as the linear it replaces."""

    takes_bias_override = True  # see forward

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, symmetric: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.input_quantizer = LSQPlusQuantizer(bits, symmetric).to(device)

    @classmethod
    def from_linear(cls, module: nn.Module, bits: int, symmetric: bool = False) -> "LSQLinear":
        """From an nn.Linear or transformers Conv1D (whose [in, out] weight is transposed here)."""
        weight = linear_weight(module)
        bias = getattr(module, "bias", None)
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, bits, symmetric,
                    device=weight.device, dtype=weight.dtype)
        layer.weight.data.copy_(weight.detach())
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def forward(self, x, bias_override=None):
        """`bias_override` replaces the bias for this call (nn/weight_reads.py)."""
        quantizer = self.input_quantizer
        bias = self.bias if bias_override is None else bias_override
        return lsq_linear(x, self.weight, bias, quantizer.scale, quantizer.zero, quantizer.bits)
