"""Modules: QuantLinear and QuantConv2d, the in-place model conversions, save / load."""

from .quant_conv import QuantConv2d, quantize_convs_
from .quant_linear import QuantLinear
from .module_kinds import is_linear
from .quantize import quantize_, register_quantize_handler
from .serialization import load_quantized, save_quantized
