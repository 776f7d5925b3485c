"""GPLQ: activation-first QAT, weights-later PTQ (+ QwT), exported to the fused kernels.

Stage 1 (`activation_qat`): a copy of the fp model whose every selected linear reads its input
through an LSQ+ quantizer (nn/lsq_linear.py: learnable per-tensor step and zero point, initialised
from calibration statistics) while its weights stay fp32. One short epoch trains the quantizers
and, by default, the fp32 weights at a small learning rate (`train_weights=False` freezes them,
as the thesis did) with GPLQ's PCA feature-mimicking loss: each block's student and teacher
outputs are projected onto the teacher's principal subspace (the fewest components explaining
`pca_variance` of its variance, computed once from teacher features, centred by the teacher mean)
and their squared distance is minimised; KD on the logits can be added.

Stage 2 (`weight_ptq`): per-channel weight quantization with a clipping search, then QwT
(methods/qwt.py with its held-out R² gate: the QwT paper notes the closed form can hurt
QAT-trained models, and the gate drops such blocks). QwT's target is the original fp teacher.

Export is the conversion itself: the learned step and (rounded) zero point become the QuantLinear's
static activation scale and zero point, and the stage-1 quantizer already computed exactly the
kernel's codes (quant/lsq.py), so the exported model is what was trained, op for op.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..models.batches import materialize, model_output, run_model, token_mask
from ..models.blocks import find_blocks
from ..nn.compensation import primary_output
from ..nn.lsq_linear import LSQLinear, TokenQuantLinear
from ..nn.quant_linear import QuantLinear, linear_weight
from ..nn.quantize import announce_quantized, select_linears
from ..nn.weight_reads import route_weight_reads, weight_reads_routed
from ..quant.config import QuantConfig
from ..quant.observers import METHODS, ActivationObserver, static_scale
from ..quant.weight import WEIGHT_CLIPS, clip_weight, quantize_weight
from . import qwt

ACTIVATIONS = ("static", "dynamic")


@dataclasses.dataclass
class PrincipalSubspace:
    """The teacher's principal subspace of one block's output features."""

    mean: torch.Tensor  # [d], the teacher mean
    components: torch.Tensor  # [d, k], orthonormal columns, largest variance first
    explained: float  # fraction of the teacher's variance the k components hold

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of ‖(f_s − μ)V − (f_t − μ)V‖²; μ cancels, so this is ‖(f_s − f_t)V‖²."""
        projected = (student.float() - teacher.float()) @ self.components
        return projected.square().sum(dim=-1).mean()


class _Moments:
    """Streaming fp64 mean and covariance of feature rows."""

    def __init__(self, dim: int):
        self.count, self.total, self.outer = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).double().cpu()
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.outer += rows.t() @ rows

    def subspace(self, variance: float, device) -> PrincipalSubspace:
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        cumulative = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-300)
        k = int((cumulative < variance).sum()) + 1
        k = min(k, eigenvalues.numel())
        return PrincipalSubspace(mean.float().to(device), eigenvectors[:, :k].float().contiguous().to(device),
                                 float(cumulative[k - 1]))


def _block_features(blocks: List[nn.Module], sink: List[torch.Tensor]) -> list:
    return [block.register_forward_hook(lambda m, a, o: sink.append(primary_output(o))) for block in blocks]


def _real_tokens(features: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is not None and features.shape[:2] == mask.shape:
        return features[mask]
    return features.reshape(-1, features.shape[-1])


@torch.no_grad()
def _observe_teacher(teacher: nn.Module, names: List[str], batches: List[Any], max_rows: int, progress: bool):
    """One pass of the teacher: a sample of every selected linear's input and each block's output moments."""
    observers = {name: ActivationObserver(max_rows, seed=i) for i, name in enumerate(names)}
    handles = [teacher.get_submodule(name).register_forward_pre_hook(
        lambda m, args, observer=observers[name]: observer.observe(args[0])) for name in names]
    blocks = [block for _, block in find_blocks(teacher)]
    features: List[torch.Tensor] = []
    handles += _block_features(blocks, features)
    moments: List[_Moments] = []
    try:
        with weight_reads_routed(teacher):
            for batch in tqdm(batches, desc="GPLQ teacher statistics", unit="batch", disable=not progress):
                features.clear()
                run_model(teacher, batch)
                mask = token_mask(batch)
                if not moments:
                    moments = [_Moments(f.shape[-1]) for f in features]
                for moment, feature in zip(moments, features):
                    moment.add(_real_tokens(feature, mask))
    finally:
        for handle in handles:
            handle.remove()
    return observers, moments


@dataclasses.dataclass
class ActivationQATReport:
    quantized_layers: int
    steps: int
    losses: List[float]  # total loss per step
    pca_components: List[int]  # per block
    pca_explained: List[float]  # per block
    trainable_parameters: int
    seconds: float


def activation_qat(
    model_fp: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_lr: float = 1e-5,
    train_weights: bool = True,
    pca_variance: float = 0.6,
    kd_weight: float = 0.0,
    temperature: float = 2.0,
    activations: str = "static",
    init: str = "percentile",
    symmetric: bool = False,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    max_rows: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> Tuple[nn.Module, ActivationQATReport]:
    """GPLQ stage 1 → (W32A`config.act_bits` student, report); `model_fp` is left unchanged.

    `activations="static"` (the thesis' form): every linear selected by `filter_fn(module, fqn)`
    (default: all, as in `quantize_`) becomes an LSQLinear whose per-tensor quantizer is
    initialised by `init` ("minmax" | "percentile" | "mse", quant/observers.py) on the teacher's
    inputs to that layer, asymmetric unless `symmetric`; the exported model runs static scales.
    `activations="dynamic"`: each becomes a TokenQuantLinear, whose input is quantized per token
    with dynamic scales (and rotated, with `config.rotate`) exactly as the exported QuantLinear's:
    there is no quantizer to learn, so only the weights train (`train_weights` must hold). On
    models with outlier channels, such as BERT, 4-bit static per-tensor scales lose most of the
    accuracy before any training (the README's GPLQ section has the measurement); per-token scales
    keep it.
    AdamW: `lr` for the step sizes and zero points, `weight_lr` for every other float parameter
    when `train_weights`. Loss: mean over blocks of the PCA feature-mimicking loss, plus
    `kd_weight`·KL(teacher ‖ student) at `temperature` (×T²/2) when the model outputs logits.
    """
    if config.act_bits is None:
        raise ValueError(f"GPLQ quantizes activations first; {type(config).__name__} has no activation quantization")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    dynamic = activations == "dynamic"
    if config.rotate and not dynamic:
        raise ValueError("GPLQ's static activation quantizers do not rotate their input (rotate='hadamard'): use "
                         "activations='dynamic', or a config without rotation")
    if dynamic and not train_weights:
        raise ValueError("activations='dynamic' has no quantizer parameters to learn: it trains the weights, so "
                         "train_weights must be True")
    if init not in METHODS:
        raise ValueError(f"init must be one of {METHODS}, got {init!r}")
    if not 0 < pca_variance <= 1:
        raise ValueError(f"pca_variance must be in (0, 1], got {pca_variance}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    batches = materialize(batches)
    start = time.perf_counter()
    targets = select_linears(model_fp, config, filter_fn)
    teacher_was_training = model_fp.training
    model_fp.eval()
    try:
        observers, moments = _observe_teacher(model_fp, [] if dynamic else list(targets), batches, max_rows,
                                              progress)
        device = next(model_fp.parameters()).device
        subspaces = [moment.subspace(pca_variance, device) for moment in moments]
        student = copy.deepcopy(model_fp)
        for name, module in targets.items():
            if dynamic:
                layer = TokenQuantLinear.from_linear(module, config)
            else:
                layer = LSQLinear.from_linear(module, config.act_bits, symmetric)
                scale, zero = static_scale(observers[name], config.act_bits, init, symmetric, linear_weight(module))
                layer.input_quantizer.initialize(scale, zero)
            student.set_submodule(name, layer)
        route_weight_reads(student, (LSQLinear, TokenQuantLinear))
        losses, trainable = _train(student, model_fp, batches, subspaces, epochs, lr, weight_lr if train_weights else None,
                                   kd_weight, temperature, seed, progress)
    finally:
        model_fp.train(teacher_was_training)
    report = ActivationQATReport(len(targets), len(losses), losses, [s.components.shape[1] for s in subspaces],
                                 [s.explained for s in subspaces], trainable, time.perf_counter() - start)
    return student, report


def _train(student, teacher, batches, subspaces, epochs, lr, weight_lr, kd_weight, temperature, seed, progress):
    quantizer_params = [p for n, p in student.named_parameters() if ".input_quantizer." in f".{n}"]
    other_params = [p for n, p in student.named_parameters()
                    if ".input_quantizer." not in f".{n}" and p.is_floating_point()]
    for p in other_params:
        p.requires_grad_(weight_lr is not None)
    for p in quantizer_params:
        p.requires_grad_(True)
    groups = [{"params": quantizer_params, "lr": lr}] if quantizer_params else []
    if weight_lr is not None:
        groups.append({"params": other_params, "lr": weight_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    features_s: List[torch.Tensor] = []
    features_t: List[torch.Tensor] = []
    handles = _block_features([b for _, b in find_blocks(student)], features_s)
    handles += _block_features([b for _, b in find_blocks(teacher)], features_t)
    student.eval()  # no dropout, frozen normalisation statistics: stay in the teacher's basin
    losses: List[float] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bar = tqdm(total=epochs * len(batches), desc="GPLQ activation QAT", unit="batch", disable=not progress)
            for _ in range(epochs):
                for batch in batches:
                    features_s.clear(), features_t.clear()
                    with torch.no_grad():
                        target = model_output(run_model(teacher, batch))
                    output = model_output(run_model(student, batch))
                    mask = token_mask(batch)
                    loss = torch.stack([
                        subspace.loss(_real_tokens(fs, mask), _real_tokens(ft, mask))
                        for subspace, fs, ft in zip(subspaces, features_s, features_t)
                    ]).mean()
                    if kd_weight and output.dim() == 2:
                        kd = F.kl_div(F.log_softmax(output.float() / temperature, -1),
                                      F.log_softmax(target.float() / temperature, -1), log_target=True,
                                      reduction="batchmean") * 0.5 * temperature ** 2
                        loss = loss + kd_weight * kd
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
                    bar.update()
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        for p in student.parameters():
            p.requires_grad_(False)
    trainable = sum(p.numel() for group in groups for p in group["params"])
    return losses, trainable


@dataclasses.dataclass
class WeightPTQReport:
    quantized_layers: int
    weight_clip: str
    qwt: Optional[List[qwt.BlockReport]]  # None when QwT was not run


def weight_ptq(
    student: nn.Module,
    model_fp: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any],
    *,
    weight_clip: str = "mse",
    compensate: bool = True,
    progress: bool = True,
) -> Tuple[nn.Module, WeightPTQReport]:
    """GPLQ stage 2, in place on the stage-1 `student` → (quantized model, report).

    Each LSQLinear or TokenQuantLinear becomes a QuantLinear: weights (rotated, with
    `config.rotate`) clipped per channel by `weight_clip` ("none" | "mse" | "percentile",
    quant/weight.clip_weight) and rounded into `config`'s format; an LSQLinear's learned step
    and integer zero point become the static activation scale and zero point, a TokenQuantLinear's
    layer keeps dynamic per-token scales. Then, when `compensate`, QwT against `model_fp` (the
    original fp model).
    """
    if weight_clip not in WEIGHT_CLIPS:
        raise ValueError(f"weight_clip must be one of {WEIGHT_CLIPS}, got {weight_clip!r}")
    layers = {name: m for name, m in student.named_modules() if isinstance(m, (LSQLinear, TokenQuantLinear))}
    if not layers:
        raise ValueError("student has no LSQLinear or TokenQuantLinear: run activation_qat first")
    for name, module in layers.items():
        if isinstance(module, TokenQuantLinear):
            trained_bits, trained_rotate = module.config.act_bits, module.config.rotate
        else:
            trained_bits, trained_rotate = module.input_quantizer.bits, None
        if trained_bits != config.act_bits or trained_rotate != config.rotate:
            raise ValueError(f"{name!r} was trained with {trained_bits}-bit activations, rotate={trained_rotate!r}; "
                             f"config {config} has {config.act_bits}, rotate={config.rotate!r}")
    for name, module in tqdm(layers.items(), desc="GPLQ weight PTQ", unit="layer", disable=not progress):
        with torch.no_grad():
            qweight = quantize_weight(clip_weight(config.rotated(module.weight), config, weight_clip), config)
        layer = QuantLinear.from_float(module, config, qweight=qweight)
        if isinstance(module, LSQLinear):
            quantizer = module.input_quantizer
            layer.set_static_activation(quantizer.step_size(), quantizer.integer_zero())
        student.set_submodule(name, layer)
    route_weight_reads(student, (QuantLinear,))
    announce_quantized(student)
    reports = qwt.calibrate(model_fp, student, batches, progress=progress) if compensate else None
    return student, WeightPTQReport(len(layers), weight_clip, reports)


def quantize(
    model_fp: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any],
    *,
    weight_clip: str = "mse",
    compensate: bool = True,
    progress: bool = True,
    **stage1,
) -> nn.Module:
    """GPLQ end to end: `activation_qat` (keyword options in `stage1`) then `weight_ptq`. Returns a
    new quantized model running on the qla kernels; `model_fp` is left unchanged."""
    batches = materialize(batches)
    student, _ = activation_qat(model_fp, config, batches, progress=progress, **stage1)
    model_q, _ = weight_ptq(student, model_fp, config, batches, weight_clip=weight_clip, compensate=compensate,
                            progress=progress)
    return model_q
