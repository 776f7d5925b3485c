"""Storage formats: int4 packing, quantized weight layouts, checkpoint files."""

from .int4 import pack_int4, unpack_int4
from .weights import WEIGHT_FORMATS, QuantizedWeight, dequantize_weight, integer_weight
