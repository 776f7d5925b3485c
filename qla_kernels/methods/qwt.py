"""QwT (Quantization without Tears): a closed-form linear compensation per block.

For each block, in forward order, on the quantized model with every earlier compensation already
attached (so each block also corrects what earlier ones left):

    X = the block's input on the quantized stream (tokens × d, plus a ones column for the bias)
    Y = fp_block(X) − quantized_block(X)
    [W; b] = argmin ||X·[W; b] − Y||² + λ·mean(diag XᵀX)·||W||²,  solved by Cholesky in fp64

XᵀX and XᵀY are accumulated in fp64 while streaming over the batches, never holding all tokens.
Padding tokens (attention_mask == 0) are excluded. A deterministic ~20% of the samples (all tokens
of an image or sentence together) is held out: the compensation is kept only if its R² on those
tokens is positive (the paper's R² > 0 rule; on the fitting tokens R² is never negative, so a
same-data gate would never fire, and tokens of a sample the fit has seen are nearly the same data).

Post-norm blocks (BERT, RoBERTa: the block's output *is* a LayerNorm's output) are fitted on that
LayerNorm's input, the pre-LN residual sum, and the compensation is added there — a documented
deviation from the paper, which adds it after the block: adding before the norm keeps the
correction inside the normalized statistics, as the fused post-norm pre-kernel will compute it.

Calibration runs the quantized model under the `simulate` backend (numerically the deployed model).
The compensation is exact fp32 here; `QwTCompensation.truncated(energy)` gives the low-rank
factors (T = x·V_r, U = U_r·S_r) that the fused kernels' low-rank segment will run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from ..models.batches import materialize, run_model, token_mask
from ..models.blocks import find_blocks
from ..models.facts import without_kv_cache
from ..models.runtime import lower_qwt
from ..nn.compensation import QwTCompensation, attach, block_input, compensated_blocks, primary_output
from ..nn.module_kinds import is_norm
from ..nn.quant_conv import QuantConv2d
from ..nn.quant_linear import QuantLinear
from ..ops.dispatch import use_backend
from .qwt_solver import Accumulator, ConvAccumulator, conv_tokens, heldout_mask

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_HOLDOUT = 0.2


@dataclasses.dataclass
class BlockReport:
    name: str
    post_norm: bool  # fitted and added before the block's output LayerNorm
    fit_tokens: int
    heldout_tokens: int
    r2_fit: float  # of the least-squares fit before the gate, pooled over output channels
    r2_heldout: float  # the same fit on the held-out tokens (what the gate judges, per channel)
    condition_number: float  # of the regularized XᵀX (largest over the ridges tried)
    ridge: float  # median ridge over kept channels (relative to mean diag XᵀX)
    kept_fraction: float  # output channels whose held-out R² was positive
    enabled: bool
    reason: str = ""


class _Stop(Exception):
    pass


def _capture_block_input(model: nn.Module, block: nn.Module, batch) -> Tuple[tuple, dict]:
    """Runs `model` on `batch` until `block` is called; returns the block's (args, kwargs)."""
    captured = {}

    def hook(module, args, kwargs):
        captured["call"] = (args, kwargs)
        raise _Stop

    # First among the block's pre-hooks: a later one (a post-norm block's lowered QLA adapter
    # preparing its T) must not run for a call that never reaches the layer that consumes it.
    handle = block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        run_model(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "call" not in captured:
        raise ValueError(f"the block {type(block).__name__} was not called by the model's forward")
    return without_kv_cache(*captured["call"])


def _output_norm(block: nn.Module, args: tuple, kwargs: dict) -> Tuple[torch.Tensor, Optional[nn.Module], Optional[torch.Tensor]]:
    """Runs the block; returns (output, the norm whose output *is* the block output or None, that norm's input)."""
    seen: List[Tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # holds the tensors, so no id is reused
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], out)))
               for m in block.modules() if is_norm(m)]
    try:
        output = primary_output(block(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    for norm, norm_input, norm_output in seen:
        if norm_output is output:
            return output, norm, norm_input
    return output, None, None


@torch.no_grad()
def calibrate(
    model_fp: nn.Module,
    model_q: nn.Module,
    batches: Iterable[Any],
    *,
    ridge: Union[float, str] = "auto",
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
    progress: bool = True,
) -> List[BlockReport]:
    """Fits and attaches a QwT compensation to every block of `model_q` (in place).

    `model_fp` is the unquantized model with the same architecture; blocks are paired by position
    (found by structure, `qla_kernels.models.blocks.find_blocks`). `batches` are calibration inputs
    (tensors, dicts, or (input, label) tuples); they are passed over once per block. Returns one
    report per block (tokens, R² on fitting and held-out tokens, condition number, kept or not).
    """
    if ridge == "auto":
        ridges = RIDGE_GRID
    elif isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and ridge >= 0:
        ridges = (float(ridge),)
    else:
        raise ValueError(f"ridge must be 'auto' or a float >= 0, got {ridge!r}")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    batches = materialize(batches)
    blocks_fp, blocks_q = find_blocks(model_fp), find_blocks(model_q)
    if [type(b) for _, b in blocks_fp] != [type(b) for _, b in blocks_q]:
        raise ValueError("model_fp and model_q do not have the same blocks")
    was_training = model_fp.training, model_q.training
    model_fp.eval(), model_q.eval()
    generator = torch.Generator().manual_seed(seed)
    reports = []
    bar = tqdm(total=len(blocks_q) * len(batches), desc="QwT", unit="batch", disable=not progress)
    try:
        with use_backend("simulate"):
            for (name, block_q), (_, block_fp) in zip(blocks_q, blocks_fp):
                bar.set_postfix_str(name)
                accumulator, output_norm = None, None
                skip_reason = ""
                # Swin's blocks also take 4-D input, channels last; CNN blocks are the convolution-only ones.
                convolutional = not any(isinstance(m, (nn.Linear, QuantLinear)) for m in block_q.modules()) and any(
                    isinstance(m, (nn.Conv2d, QuantConv2d)) for m in block_q.modules())
                for batch in batches:
                    args, kwargs = _capture_block_input(model_q, block_q, batch)
                    x = block_input(args, kwargs)
                    y_q, norm_q, norm_q_input = _output_norm(block_q, args, kwargs)
                    y_fp, norm_fp, norm_fp_input = _output_norm(block_fp, args, kwargs)
                    if norm_q is not None and norm_fp is not None:
                        output_norm, y_q, y_fp = norm_q, norm_q_input, norm_fp_input
                    bar.update()
                    if convolutional and x.dim() == 4 and y_q.dim() == 4:  # CNN block, NCHW: group-wise 1×1
                        tokens = conv_tokens(x, y_fp - y_q)
                        if tokens is None:
                            skip_reason = f"output grid {tuple(y_q.shape[2:])} is not the input grid at one stride"
                            continue
                        x_tokens, y_tokens, stride = tokens
                        heldout = heldout_mask(torch.Size((y_q.shape[0], *y_q.shape[2:])), holdout, generator).reshape(-1)
                        if accumulator is None:
                            accumulator = ConvAccumulator(x_tokens.shape[1], y_tokens.shape[1], stride)
                        accumulator.add(x_tokens.cpu(), y_tokens.cpu(), heldout)
                        continue
                    if y_q.shape[:-1] != x.shape[:-1]:
                        skip_reason = f"block changes the token layout {tuple(x.shape)} -> {tuple(y_q.shape)}"
                        continue
                    x_tokens, y_tokens = x.reshape(-1, x.shape[-1]), (y_fp - y_q).reshape(-1, y_q.shape[-1])
                    heldout = heldout_mask(x.shape[:-1], holdout, generator).reshape(-1)
                    mask = token_mask(batch)
                    if mask is not None and mask.shape == x.shape[:-1]:
                        real = mask.reshape(-1).cpu()
                        x_tokens, y_tokens, heldout = x_tokens[mask.reshape(-1)], y_tokens[mask.reshape(-1)], heldout[real]
                    if accumulator is None:
                        accumulator = Accumulator(x_tokens.shape[1], y_tokens.shape[1])
                    accumulator.add(x_tokens.cpu(), y_tokens.cpu(), heldout)
                if accumulator is None:
                    nan = float("nan")
                    reports.append(BlockReport(name, False, 0, 0, nan, nan, nan, nan, 0.0, False, skip_reason))
                    continue
                solution = accumulator.solve(ridges)
                enabled = solution.kept_fraction > 0
                reports.append(BlockReport(
                    name, output_norm is not None, accumulator.fit.count, accumulator.heldout.count,
                    solution.r2_fit, solution.r2_heldout, solution.condition_number, solution.ridge,
                    solution.kept_fraction, enabled, "" if enabled else "no output channel has a positive held-out R²",
                ))
                if enabled and isinstance(accumulator, ConvAccumulator):
                    attach(block_q, accumulator.compensation(solution, x.device))
                elif enabled:
                    w = solution.weight
                    norm_name = next((n for n, m in block_q.named_modules() if m is output_norm), "")
                    attach(block_q, QwTCompensation(w[:-1].t().float().contiguous().to(x.device),
                                                    w[-1].float().to(x.device), output_norm=norm_name))
    finally:
        bar.close()
        model_fp.train(was_training[0]), model_q.train(was_training[1])
    return reports


@dataclasses.dataclass
class TruncationReport:
    name: str
    rank: int
    full_rank: int
    energy_kept: float


def truncate(model_q: nn.Module, energy: float = 0.99) -> List[TruncationReport]:
    """Replaces every block's QwT compensation by its truncated SVD keeping `energy` of the squared
    singular values: the form the fused kernels' low-rank segment runs (T = x·V_r, U = U_r·S_r).
    Returns the rank chosen per block; measure the accuracy it keeps on your data."""
    reports = []
    for name, block in list(compensated_blocks(model_q)):
        full_rank = min(block.qwt.weight.shape)
        low_rank, kept = block.qwt.truncated(energy)
        attach(block, low_rank)
        reports.append(TruncationReport(name, low_rank.rank, full_rank, kept))
    if not reports:
        raise ValueError("the model has no QwT compensation to truncate (run qwt.calibrate first)")
    return reports


def lower(model_q: nn.Module, batch: Any) -> List[str]:
    """Runs every block's QwT compensation inside the fused GEMM of the block's last linear
    (`models.runtime.lower_qwt`, strict: a block whose output would change is a ValueError and
    then no block is lowered). Lowering is a runtime conversion (`convert_for_runtime` does it
    with an example): save before it, lower after loading. Returns the linears lowered."""
    return lower_qwt(model_q, batch, strict=True)[0]
