"""Fused transformer blocks: a quantized block's forward as a chain of pre-kernels and fused GEMMs
(DESIGN.md "Block templates"), with no dequantize → requantize round trips.

- templates.py: where each kind of block keeps its parts (one dataclass per chain);
- chain.py: what the chains share (pre-kernels, GEMMs on plans, the MLP, the mixins' base);
- packed_qkv.py, post_norm.py, model_attention.py, mlp.py: one chain each;
- packing.py: layers that run as one GEMM; fuse.py: putting a chain on a block and taking it off.
"""

from .chain import FusedModule, hooked_modules
from .fuse import (
    FUSED_BLOCK_TYPES,
    FUSED_MODULE_TYPES,
    fuse_block,
    fuse_mlp,
    original_class,
    unfuse_block,
)
from .mlp import FusedMLP
from .model_attention import FusedModelAttentionBlock
from .packed_qkv import FusedPackedQKVBlock
from .packing import check_packable, same_input_quantization
from .post_norm import FusedPostNormBlock
from .templates import (
    ACTIVATIONS,
    MLPTemplate,
    ModelAttentionTemplate,
    PackedQKVTemplate,
    PostNormTemplate,
    WindowLayout,
    attention_heads,
)

__all__ = [
    "ACTIVATIONS", "FUSED_BLOCK_TYPES", "FUSED_MODULE_TYPES", "FusedMLP", "FusedModelAttentionBlock", "FusedModule",
    "FusedPackedQKVBlock", "FusedPostNormBlock", "MLPTemplate", "ModelAttentionTemplate", "PackedQKVTemplate",
    "PostNormTemplate", "WindowLayout", "attention_heads", "check_packable", "fuse_block", "fuse_mlp",
    "hooked_modules", "original_class", "same_input_quantization", "unfuse_block",
]
