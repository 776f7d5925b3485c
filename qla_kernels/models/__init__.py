"""Per-architecture facts for timm and HF models, read off the module structure (never copied
model code): `find_blocks` locates the repeated blocks, `describe` traces one forward pass to
name each block's norms, attention and MLP linears, norm kind and position, MLP kind and token
layout. The fused block modules and the calibration methods build on them."""

from ..nn.module_kinds import is_norm
from .blocks import find_blocks
from .facts import ArchitectureFacts, BlockFacts, describe, example_input
from .fusion import FusionReport, fuse_blocks
from .runtime import RuntimeReport, convert_for_runtime
from .templates import template_for
