"""qla_kernels: quantized inference for PyTorch with accuracy-recovery modules fused into the GEMM.

    import qla_kernels as qk
    qk.quantize_(model, qk.W8A8())                 # nn.Linear / HF Conv1D -> QuantLinear, in place
    qk.quantize_convs_(model, qk.W8A8())           # nn.Conv2d -> QuantConv2d (W8A8, W4A8, W4A4), in place
    qk.fuse_blocks(model, example)                 # blocks that fit a template run the fused chain
    qk.convert_for_runtime(model, example)         # the runtime form: frozen plans, fused chains
    with qk.use_backend("simulate"): ...           # "reference" | "simulate" | "cuda" | "auto"
    qk.save_quantized(model, "model.safetensors"); qk.load_quantized(skeleton, "model.safetensors")
    qk.backends()                                  # what can run here, and why not
    model.save_pretrained(d); AutoModel.from_pretrained(d) # Hugging Face: quant_method "qla" (integrations/)
    qk.load_pretrained(d)                          # the same, refusing to return it unquantized
    qk.load_lora(model, peft_dir, name="task"); qk.set_lora(model, "task" | None); qk.unload_lora(model, "task")
"""

from . import formats, integrations, methods, models, ops, quant
from .integrations import load_pretrained
from .integrations.peft import load_lora
from .models import convert_for_runtime, fuse_blocks
from .nn import QuantConv2d, QuantLinear, load_quantized, quantize_, quantize_convs_, register_quantize_handler, save_quantized
from .nn.task_lora import set_lora, unload_lora
from .ops import backends, use_backend
from .quant import W4A4, W4A8, W4A16, W8A8, QuantConfig

__version__ = "0.1.0"

integrations.install()

__all__ = [
    "QuantConfig", "W8A8", "W4A8", "W4A16", "W4A4", "QuantLinear", "quantize_", "QuantConv2d", "quantize_convs_",
    "register_quantize_handler", "save_quantized", "load_quantized", "use_backend", "backends", "fuse_blocks",
    "convert_for_runtime", "load_pretrained", "load_lora", "set_lora", "unload_lora",
    "formats", "quant", "ops", "methods", "models",
]
