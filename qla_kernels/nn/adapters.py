"""QLA adapters: a LoRA on the FFN branch and a depthwise-separable adapter on the attention branch.

Both start as exact no-ops (their last projection is zero) and are attached to a block by hooks
(`attach_adapters`), so the host model's modules and attributes stay as they are:

- FFN branch: LoRA(h) = up(down(h)) on the MLP's normalized input h, added to the MLP output
  linear's output (in parallel with the MLP).
- Attention branch: gate · up(down(GELU(DW3×3(h)))) on the attention's input h (norm1(x); the
  block input x in post-norm blocks), added to the attention output projection's output. Patch
  tokens are laid out on their grid for the depthwise conv; class / distillation / register
  tokens bypass the conv. 1-D sequences use a depthwise conv along the tokens with padding
  tokens zeroed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class LoRAAdapter(nn.Module):
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class DWSepAdapter(nn.Module):
    """`grid` (H, W) with `prefix_tokens` leading tokens for vision tokens, or None for 1-D sequences."""

    def __init__(self, dim: int, rank: int, grid: Optional[Tuple[int, int]], prefix_tokens: int = 0):
        super().__init__()
        self.grid, self.prefix_tokens = grid, prefix_tokens
        conv = nn.Conv2d if grid is not None else nn.Conv1d
        self.depthwise = conv(dim, dim, 3, padding=1, groups=dim)
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.gate = nn.Parameter(torch.ones(()))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, tokens, dim = h.shape
        prefix, body = h[:, : self.prefix_tokens], h[:, self.prefix_tokens:]
        if self.grid is not None:
            height, width = self.grid
            if body.shape[1] != height * width:
                raise ValueError(f"DWSepAdapter expects {height}x{width} patch tokens after {self.prefix_tokens} "
                                 f"prefix tokens, got {body.shape[1]}")
            spatial = body.transpose(1, 2).reshape(batch, dim, height, width)
            body = self.depthwise(spatial).reshape(batch, dim, tokens - self.prefix_tokens).transpose(1, 2)
        else:
            if token_mask is not None:
                body = body * token_mask[:, self.prefix_tokens:, None].to(body.dtype)
            body = self.depthwise(body.transpose(1, 2)).transpose(1, 2)
        mixed = torch.cat([prefix, body], dim=1)
        return self.gate * self.up(self.down(F.gelu(mixed)))
