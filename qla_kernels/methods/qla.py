"""QLA: lightweight adapters trained to fix a quantized model.

`add_adapters` attaches, to every block found by structure, a depthwise-separable adapter on the
attention branch and a LoRA on the FFN branch (nn/adapters.py), both exact no-ops at first.
`train` fits them against the fp teacher with the hybrid loss — cross-entropy when labels exist,
knowledge distillation (KL at temperature T, weighted 0.5·T²) and feature reconstruction (MSE of
every block output, weight ~1e-3) — with the quantized backbone frozen and run by the `simulate`
backend (straight-through rounding), so the adapters fit the error the kernels make.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..models.blocks import find_blocks
from ..models.facts import describe, example_input
from ..nn.adapters import (
    DWSepAdapter,
    LoRAAdapter,
    LoweredAdapter,
    prepare_attention_adapter,
    prepare_attention_adapter_from_input,
    prepare_ffn_adapter,
)
from ..nn.compensation import block_input, link, primary_output, with_primary_output
from ..ops.dispatch import use_backend
from .batches import materialize, model_output, run_model, token_mask

ADAPTER_NAMES = ("qla_attention", "qla_ffn")


def _width(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    return module.normalized_shape[-1]


def add_adapters(model_q: nn.Module, rank: int = 8, example: Optional[Any] = None, seed: int = 0) -> List[str]:
    """Attaches QLA adapters to every block of `model_q` (in place); the model's output is
    unchanged until they are trained. `example` is one input batch used to read the block
    structure (built from the model's config when omitted); `seed` fixes the adapters' random
    initialization. Returns the adapted block names."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if getattr(model_q, "_qla_handles", None):
        raise ValueError("model_q already has QLA adapters")
    facts = describe(model_q, example if example is not None else example_input(model_q))
    if facts.token_layout == "grid":
        raise ValueError("windowed (Swin-style) blocks are not supported yet: their attention output is in window order")
    if callable(getattr(model_q, "can_generate", None)) and model_q.can_generate():
        raise ValueError("causal language models need a causal depthwise conv with a conv-state cache beside the KV "
                         "cache; that adapter is not implemented yet")
    blocks = find_blocks(model_q)
    link(model_q, "_qla_blocks", [block for _, block in blocks])
    model_q._qla_handles = [model_q.register_forward_pre_hook(_store_mask, with_kwargs=True)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, block in blocks:
            _add_block_adapters(model_q, block, facts, rank)
    return [name for name, _ in blocks]


def _add_block_adapters(model_q: nn.Module, block: nn.Module, facts, rank: int) -> None:
    dim = _width(block.get_submodule(facts.block.mlp_norm))
    device = next(itertools.chain(block.buffers(), block.parameters())).device
    block.qla_attention = DWSepAdapter(dim, rank, facts.grid, facts.prefix_tokens).to(device)
    block.qla_ffn = LoRAAdapter(dim, rank).to(device)
    _hook(model_q, block, facts)


def _store_mask(model, args, kwargs):
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    for block in model._qla_blocks:
        block._qla_inputs["mask"] = mask


def _store_block_input(block, args, kwargs):
    block._qla_inputs["attention"] = block_input(args, kwargs)


def _store_attention_input(norm, args, output):
    norm._qla_block._qla_inputs["attention"] = output


def _store_ffn_input(norm, args, output):
    norm._qla_block._qla_inputs["ffn"] = output


def _add_attention(linear, args, output):
    block = linear._qla_block
    out = primary_output(output)
    adapter = block.qla_attention(block._qla_inputs.pop("attention"), block._qla_inputs.get("mask"))
    return with_primary_output(output, out + adapter.to(out.dtype))


def _add_ffn(linear, args, output):
    block = linear._qla_block
    out = primary_output(output)
    return with_primary_output(output, out + block.qla_ffn(block._qla_inputs.pop("ffn")).to(out.dtype))


def _hook(model_q: nn.Module, block: nn.Module, facts) -> None:
    """Hooks keep their state on modules (nn.compensation.link), so deep copies stay independent."""
    block._qla_inputs = {}
    handles = model_q._qla_handles
    if facts.block.norm_position == "post":
        handles.append(block.register_forward_pre_hook(_store_block_input, with_kwargs=True))
    else:
        norm = block.get_submodule(facts.block.attention_norm)
        link(norm, "_qla_block", block)
        handles.append(norm.register_forward_hook(_store_attention_input))
    mlp_norm = block.get_submodule(facts.block.mlp_norm)
    link(mlp_norm, "_qla_block", block)
    handles.append(mlp_norm.register_forward_hook(_store_ffn_input))
    for name, hook in ((facts.block.attention_output, _add_attention), (facts.block.mlp_output, _add_ffn)):
        linear = block.get_submodule(name)
        link(linear, "_qla_block", block)
        handles.append(linear.register_forward_hook(hook))


@dataclasses.dataclass
class TrainReport:
    steps: int
    first_loss: float
    last_loss: float
    trainable_parameters: int


def train(
    model_q: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    temperature: float = 2.0,
    feature_weight: float = 1e-3,
    train_head: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> TrainReport:
    """Trains the adapters of `model_q` (after `add_adapters`) against `teacher` with AdamW."""
    if getattr(model_q, "_qla_lowered", False):
        raise ValueError("the adapters were fused onto the GEMMs (qla.fuse): train before fusing")
    torch.manual_seed(seed)
    batches = materialize(batches)
    parameters = [p for name, p in model_q.named_parameters() if any(a in name for a in ADAPTER_NAMES)]
    if not parameters:
        raise ValueError("model_q has no QLA adapters: call add_adapters first")
    for p in model_q.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    if train_head:
        head = getattr(model_q, "head", None) or getattr(model_q, "classifier", None)
        if head is None:
            raise ValueError("train_head=True but the model has no `head` or `classifier`")
        for p in head.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
                parameters.append(p)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    blocks_q, blocks_t = [b for _, b in find_blocks(model_q)], [b for _, b in find_blocks(teacher)]
    features_q, features_t = [], []
    handles = [b.register_forward_hook(lambda m, a, o: features_q.append(primary_output(o))) for b in blocks_q]
    handles += [b.register_forward_hook(lambda m, a, o: features_t.append(primary_output(o))) for b in blocks_t]
    teacher.eval()
    model_q.eval()  # frozen backbone: no dropout; the adapters train through the simulated quantizers
    losses = []
    try:
        with use_backend("simulate"):
            for _ in range(epochs):
                for batch in tqdm(batches, desc="QLA", unit="batch", disable=not progress):
                    features_q.clear(), features_t.clear()
                    with torch.no_grad():
                        target = model_output(run_model(teacher, batch)).float()
                    output = model_output(run_model(model_q, batch)).float()
                    loss = _hybrid_loss(output, target, batch, temperature)
                    mask = token_mask(batch)
                    for fq, ft in zip(features_q, features_t):
                        difference = (fq.float() - ft.float()).square()
                        if mask is not None and difference.shape[:2] == mask.shape:
                            difference = difference[mask]
                        loss = loss + feature_weight * difference.mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
        for p in parameters:
            p.requires_grad_(False)
    return TrainReport(len(losses), losses[0], losses[-1], sum(p.numel() for p in parameters))


def _hybrid_loss(output: torch.Tensor, target: torch.Tensor, batch: Any, temperature: float) -> torch.Tensor:
    """KD (KL at temperature T, 0.5·T²) + CE with labels; hidden-state outputs use MSE instead of KD."""
    labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if output.dim() == 2:  # logits
        kd = F.kl_div(F.log_softmax(output / temperature, -1), F.log_softmax(target / temperature, -1),
                      log_target=True, reduction="batchmean") * 0.5 * temperature ** 2
        return kd + (F.cross_entropy(output, labels) if labels is not None else 0.0)
    return F.mse_loss(output, target)


@torch.no_grad()
def fuse(model_q: nn.Module, example: Optional[Any] = None) -> List[str]:
    """Lowers the trained adapters onto the quantized GEMMs (in place; a runtime conversion, like
    `qwt.lower`: save before it). Per block, with the gate and the up bias folded:

    - attention branch: T_dw = down(GELU(DW(h))) computed from the attention input, added by the
      output projection's low-rank segment with U = gate·up (bias gate·b_up joins its bias);
    - FFN branch: T_lora = norm2(x1)·A added by the MLP output linear's low-rank segment with
      U = up, joined with a lowered QwT compensation's columns when there is one.

    In a fused block (`models.fuse_blocks`, call it after this) T_lora comes out of the norm2
    pre-kernel's read of x1. Returns the blocks lowered."""
    if not getattr(model_q, "_qla_handles", None):
        raise ValueError("model_q has no QLA adapters: call add_adapters (and train) first")
    if getattr(model_q, "_qla_lowered", False):
        raise ValueError("the adapters are already fused")
    facts = describe(model_q, example if example is not None else example_input(model_q))
    for handle in model_q._qla_handles:
        handle.remove()
    model_q._qla_handles = [model_q.register_forward_pre_hook(_store_mask, with_kwargs=True)]
    names = {id(block): name for name, block in find_blocks(model_q)}
    for block in model_q._qla_blocks:
        proj, fc2 = block.get_submodule(facts.block.attention_output), block.get_submodule(facts.block.mlp_output)
        attention, ffn = block.qla_attention, block.qla_ffn
        gate = attention.gate.detach().float()
        proj.lowered_adapter = LoweredAdapter(gate * attention.up.weight.float())
        folded_bias = (gate * attention.up.bias.float()).to(proj.weight_scale.device)
        if proj.bias is None:
            proj.bias = nn.Parameter(folded_bias, requires_grad=False)
        else:
            proj.bias.data.add_(folded_bias.to(proj.bias.dtype))
        fc2.lowered_adapter = LoweredAdapter(ffn.up.weight.float())
        link(block, "_qla_attention_linear", proj)
        link(block, "_qla_ffn_linear", fc2)
        handles = model_q._qla_handles
        if facts.block.norm_position == "post":
            handles.append(block.register_forward_pre_hook(prepare_attention_adapter_from_input, with_kwargs=True))
        else:
            handles.append(block.get_submodule(facts.block.attention_norm).register_forward_hook(prepare_attention_adapter))
        handles.append(block.get_submodule(facts.block.mlp_norm).register_forward_hook(prepare_ffn_adapter))
    model_q._qla_lowered = True
    return [names[id(block)] for block in model_q._qla_blocks]
