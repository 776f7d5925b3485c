"""Modules: QuantLinear and the in-place model conversion."""

from .quant_linear import QuantLinear
from .quantize import is_linear, quantize_, register_quantize_handler
from .serialization import load_quantized, save_quantized
