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
import warnings
from typing import Any, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..models.batches import materialize, model_output, run_model, token_mask
from ..models.blocks import find_blocks
from ..models.facts import describe, example_input
from ..nn.adapters import (
    AdapterPlacement,
    LoweredAdapter,
    attach_adapters,
    prepare_attention_adapter,
    prepare_attention_adapter_from_input,
    prepare_ffn_adapter,
    adapter_hooks,
)
from ..nn import forward_context
from ..nn.compensation import block_input, link, primary_output
from ..nn.conv_adapters import ConvAdapter, attach_conv_adapter, conv_adapters
from ..nn.fused import original_class
from ..nn.quant_linear import QuantLinear
from ..ops.dispatch import use_backend

ADAPTER_NAMES = ("qla_attention", "qla_ffn", "qla_conv")


def add_adapters(model_q: nn.Module, rank: int = 8, example: Optional[Any] = None, seed: int = 0) -> List[str]:
    """Attaches QLA adapters to every block of `model_q` (in place; blocks of another class than
    the first are left out, with a warning); the model's output is unchanged until they are
    trained. `example` is one input batch used to read the block structure (built from the
    model's config when omitted); `seed` fixes the adapters' random initialization. Returns the
    adapted block names."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if getattr(model_q, "_qla_handles", None):
        raise ValueError("model_q already has QLA adapters")
    facts = describe(model_q, example if example is not None else example_input(model_q))
    causal = callable(getattr(model_q, "can_generate", None)) and model_q.can_generate()
    spatial = facts.token_layout == "grid"
    if spatial and facts.block.norm_position != "pre":
        raise ValueError("spatial (Swin-style) blocks are expected to be pre-norm")
    blocks = find_blocks(model_q)
    kind = original_class(blocks[0][1])
    names = [name for name, block in blocks if original_class(block) is kind]
    others = [name for name, block in blocks if original_class(block) is not kind]
    if others:  # CaiT's class-attention blocks after its self-attention blocks
        warnings.warn(f"QLA adapters go on the {kind.__name__} blocks (described by the first block); blocks of "
                      f"another class get none: {others}", stacklevel=2)
    placement = AdapterPlacement(
        facts.block.norm_position, facts.block.attention_norm, facts.block.mlp_norm, facts.block.attention_inputs[0],
        facts.block.attention_output, facts.block.mlp_output, rank, None if causal or spatial else facts.grid,
        0 if spatial else facts.prefix_tokens, causal, spatial)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_adapters(model_q, names, placement)
    return names


def add_conv_adapters(model_q: nn.Module, example: Any, rank: int = 8, kernel: int = 3, seed: int = 0) -> List[str]:
    """Attaches QLA's depthwise-separable compensation (nn/conv_adapters.py) beside every block of
    a CNN `model_q` (in place; exact no-ops until trained with `train`). `example` (one input
    batch) gives each block's input and output channels and its stride (the input grid over the
    output grid, which must divide exactly). At conversion each runs in its fused block's last
    convolution. Returns the adapted block names."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if getattr(model_q, "_qla_handles", None) or conv_adapters(model_q):
        raise ValueError("model_q already has QLA adapters")
    blocks = find_blocks(model_q)
    shapes = {}

    def record(name, args, kwargs, output) -> None:
        shapes.setdefault(name, (tuple(block_input(args, kwargs).shape), tuple(primary_output(output).shape)))

    handles = [block.register_forward_hook(
        lambda module, args, kwargs, output, name=name: record(name, args, kwargs, output), with_kwargs=True)
        for name, block in blocks]
    try:
        with torch.no_grad(), use_backend("simulate"):
            run_model(model_q, example)
    finally:
        for handle in handles:
            handle.remove()
    adapters = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, block in blocks:
            if name not in shapes:
                raise ValueError(f"the example does not reach block {name!r}")
            (n, c_in, h, w), out = shapes[name]
            if len(out) != 4 or h % out[2] or w % out[3] or h // out[2] != w // out[3]:
                raise ValueError(f"block {name!r} maps a {h}×{w} grid to {tuple(out[2:])}: not one stride, no "
                                 "convolutional adapter fits it")
            device = next(iter(block.buffers()), torch.empty(0)).device
            adapters[name] = ConvAdapter(c_in, out[1], rank, h // out[2], kernel).to(device)
    for name, block in blocks:
        attach_conv_adapter(block, adapters[name])
    return [name for name, _ in blocks]


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
    mixup: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> TrainReport:
    """Trains the adapters of `model_q` (after `add_adapters`) against `teacher` with AdamW.

    `mixup` adds, per batch of float inputs (images), a batch of convex mixes of its samples
    (one random partner and weight per sample), distilled without labels: the teacher is queried
    between the calibration images, where a model fitted to its outputs on the images themselves
    generalises worst. Token-id inputs are not mixed."""
    if getattr(model_q, "_qla_lowered", False):
        raise ValueError("the adapters were fused onto the GEMMs (qla.fuse): train before fusing")
    torch.manual_seed(seed)
    batches = materialize(batches)
    if mixup:
        batches = batches + [mixed for mixed in map(_mixed_inputs, batches) if mixed is not None]
    parameters = [p for name, p in model_q.named_parameters() if any(a in name for a in ADAPTER_NAMES)]
    if not parameters:
        raise ValueError("model_q has no QLA adapters: call add_adapters (add_conv_adapters for CNNs) first")
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
                    mask = token_mask(batch)
                    loss = _hybrid_loss(output, target, batch, temperature, mask)
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


def _mixed_inputs(batch: Any) -> Optional[torch.Tensor]:
    """λ·x + (1 − λ)·x[perm] per sample for a batch of float inputs (labels dropped), else None."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[0] < 2:
        return None
    partner = torch.randperm(x.shape[0], device=x.device)
    weight = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
    return weight * x + (1 - weight) * x[partner]


def _hybrid_loss(output: torch.Tensor, target: torch.Tensor, batch: Any, temperature: float,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KD (KL at temperature T, 0.5·T²) + CE with labels; hidden-state outputs use MSE instead of
    KD, over real tokens only (`mask`, [batch, seq]): padding positions' states are never read."""
    labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if output.dim() == 2:  # logits
        kd = F.kl_div(F.log_softmax(output / temperature, -1), F.log_softmax(target / temperature, -1),
                      log_target=True, reduction="batchmean") * 0.5 * temperature ** 2
        return kd + (F.cross_entropy(output, labels) if labels is not None else 0.0)
    if mask is not None and output.shape[:2] == mask.shape:
        return F.mse_loss(output[mask], target[mask])
    return F.mse_loss(output, target)


@torch.no_grad()
def fuse(model_q: nn.Module) -> List[str]:
    """Lowers the trained adapters onto the quantized GEMMs (in place; a runtime conversion, like
    `qwt.lower`: save before it). Per block, with the gate and the up bias folded:

    - attention branch: T_dw = down(GELU(DW(h))) computed from the attention input, added by the
      output projection's low-rank segment with U = gate·up (bias gate·b_up joins its bias);
    - FFN branch: T_lora = norm2(x1)·A added by the MLP output linear's low-rank segment with
      U = up, joined with a lowered QwT compensation's columns when there is one.

    In a fused block (`models.fuse_blocks`, call it after this) T_lora comes out of the norm2
    pre-kernel's read of x1. Returns the blocks lowered."""
    placement = getattr(model_q, "_qla_placement", None)
    if placement is None:
        raise ValueError("model_q has no QLA adapters: call add_adapters (and train) first")
    if getattr(model_q, "_qla_lowered", False):
        raise ValueError("the adapters are already fused")
    for name, block in zip(model_q._qla_block_names, model_q._qla_blocks):
        for linear in (placement.attention_output, placement.mlp_output):
            if not isinstance(block.get_submodule(linear), QuantLinear):
                raise ValueError(f"{name}.{linear} is a {type(block.get_submodule(linear)).__name__}, not a QuantLinear: "
                                 "the adapter has no GEMM to join (keep the adapters unfused for this model)")
    for handle in model_q._qla_handles:
        handle.remove()
    handles = model_q._qla_handles = adapter_hooks(model_q)
    for block in model_q._qla_blocks:
        handles += forward_context.scope_hooks(block)
        proj, fc2 = block.get_submodule(placement.attention_output), block.get_submodule(placement.mlp_output)
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
        if placement.norm_position == "post":
            handles.append(block.register_forward_pre_hook(prepare_attention_adapter_from_input, with_kwargs=True))
        else:
            handles.append(block.get_submodule(placement.attention_norm).register_forward_hook(prepare_attention_adapter))
        handles.append(block.get_submodule(placement.mlp_norm).register_forward_hook(prepare_ffn_adapter))
    model_q._qla_lowered = True
    return list(model_q._qla_block_names)
