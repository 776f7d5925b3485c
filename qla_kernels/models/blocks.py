"""Finding a model's blocks and norms by structure, not by architecture name.

A *block* is a child of a container (nn.ModuleList / nn.Sequential) holding at least two modules
of one class, each containing a linear layer or a convolution — timm ViT/DeiT `blocks`, Swin
`layers.i.blocks`, BERT/RoBERTa `encoder.layer`, GPT-2 `transformer.h`, LLaMA `model.layers`,
ResNet `layerN`. When such containers
nest (Swin's stages hold block lists), the innermost ones are the blocks.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from ..nn.fused import original_class
from ..nn.quant_conv import QuantConv2d
from ..nn.module_kinds import is_linear
from ..nn.quant_linear import QuantLinear


def _holds_linear(module: nn.Module) -> bool:
    """A linear or a convolution (CNN blocks: ResNet's BasicBlock / Bottleneck)."""
    return any(is_linear(m) or isinstance(m, (QuantLinear, nn.Conv2d, QuantConv2d)) for m in module.modules())




def _is_block_list(container: nn.Module) -> bool:
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return False
    children = list(container.children())
    return (len(children) >= 2 and len({original_class(c) for c in children}) == 1
            and all(_holds_linear(c) for c in children))


def find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, block) for every block, in definition order (the forward order of the
    architectures above). Raises ValueError naming what is missing when none is found."""
    lists = [(name, module) for name, module in model.named_modules() if _is_block_list(module)]
    innermost = [
        (name, module) for name, module in lists
        if not any(other is not module and any(sub is other for sub in module.modules()) for _, other in lists)
    ]
    if not innermost:
        raise ValueError(
            f"{type(model).__name__}: no repeated blocks found (expected an nn.ModuleList or nn.Sequential "
            "of at least two modules of one class, each containing a linear layer)"
        )
    return [(f"{name}.{index}" if name else str(index), child)
            for name, module in innermost for index, child in enumerate(module.children())]
