"""AQ-DETR (Wang et al., AAAI 2024; thesis chapters 2.3 and 3.2): fully quantized DETR-family
detectors trained with LSQ+ QAT, auxiliary queries and layer-by-layer distillation, exported to
the kernels.

`prepare` makes the student, a copy of the fp model in which
- every linear reads its input through an asymmetric LSQ+ quantizer and its weight through a
  symmetric per-channel LSQ quantizer (nn/lsq_linear.py), every plain convolution likewise; the
  stem, the first convolution in module order (it reads the image), takes `stem_bits`;
- every attention core that transformers' attention interface runs (found by running the model,
  not by class) quantizes q, k, the attention map A and v (nn/quant_attention.py):
  A = softmax(Q(q)·Q(k)ᵀ/√d), F = Q(A)·Q(v).
DETR adds the positional embeddings to the queries and keys before their projections; the
projections' input quantizers see the sums, which is where the deployed kernels quantize (the
GEMM reads x + pos). Every quantizer starts from calibration statistics of the fp model.

`train` runs QAT in `simulate`'s numerics with the model's own Hungarian loss:
- auxiliary queries (`auxiliary_queries` = n_A > 0): n_A extra learnable query embeddings join
  the object queries during training only; they are matched, per decoder layer (the model's
  auxiliary decoding losses), to the ground truth replicated `replicas` (K) times, the object
  queries to the ground truth once. In the decoder's self-attention the two groups do not see
  each other, so the object queries compute during training exactly what they compute without
  the auxiliary ones: dropping them at export costs nothing and changes nothing (tested).
- layer-by-layer distillation (`distillation` = λ_dis > 0): at every encoder self-attention the
  quantized output mimics the output of the same module run unquantized on the same input
  (`full_precision()`: the same weights, no separate teacher), by KL divergence of their
  softmax over channels (each token scaled by the fp output's standard deviation), weighted by
  λ_dis.
- optionally, against a frozen fp teacher: `kd_weight`, the KL of the class distributions, and
  `feature_weight`, the relative squared error of the encoder's output features.

`export` turns the student into the quantized model of the kernels (QuantLinear, QuantConv2d
with the learned steps as static scales and the learned weight codes, QuantizedAttention), with
the original query count; `qk.convert_for_runtime` then freezes it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..formats.weights import QuantizedWeight
from ..nn.lsq_linear import LSQConv2d, LSQLinear, full_precision, quantizing
from ..nn.quant_attention import LSQAttentionQuantizer, QuantizedAttention, observing_attention, register_attention
from ..nn.quant_conv import QuantConv2d, plain_convolution
from ..nn.quant_linear import QuantLinear, conv1d_class
from ..nn.quantize import announce_quantized
from ..ops.conv import conv_weight_matrix
from ..quant.config import W4A4, W8A8, QuantConfig
from ..quant.observers import METHODS, ActivationObserver, static_scale
from ..quant.primitives import qrange


@dataclasses.dataclass(frozen=True)
class AQDETRConfig:
    """What AQ-DETR quantizes and how it trains (module docstring). `bits` for every linear,
    convolution and attention tensor (4 or 8: the kernels' W4A4 / W8A8); `stem_bits` for the
    first convolution (None: `bits`); `init` the calibration rule of the activation steps
    (quant/observers.py)."""

    bits: int = 4
    stem_bits: Optional[int] = 8
    auxiliary_queries: int = 0
    replicas: int = 4
    distillation: float = 0.0
    init: str = "mse"

    def __post_init__(self):
        for name in ("bits", "stem_bits"):
            value = getattr(self, name)
            if value is None and name == "stem_bits":
                continue
            if value not in (4, 8) or isinstance(value, bool):
                raise ValueError(f"{name} must be 4 or 8 (the kernels' W4A4 / W8A8), got {value!r}")
        for name, least in (("auxiliary_queries", 0), ("replicas", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int ≥ {least}, got {value!r}")
        if isinstance(self.distillation, bool) or not isinstance(self.distillation, (int, float)) \
                or not math.isfinite(self.distillation) or self.distillation < 0:
            raise ValueError(f"distillation must be a finite number ≥ 0, got {self.distillation!r}")
        if self.init not in METHODS:
            raise ValueError(f"init must be one of {METHODS}, got {self.init!r}")


def _quant_config(bits: int) -> QuantConfig:
    return W4A4() if bits == 4 else W8A8()


def _linears(model: nn.Module) -> Dict[str, nn.Module]:
    kinds = (nn.Linear,) + tuple(k for k in (conv1d_class(),) if k is not None)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _convolutions(model: nn.Module) -> Dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and plain_convolution(m)}


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def _check_images(images, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float [N, C, H, W] tensor, got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")


@dataclasses.dataclass
class _AttentionCall:
    query_tokens: int
    key_tokens: int


def _attention_calls(model: nn.Module, images: torch.Tensor) -> Dict[nn.Module, _AttentionCall]:
    calls: Dict[nn.Module, _AttentionCall] = {}

    def record(module, query, key, value, probs):
        calls.setdefault(module, _AttentionCall(query.shape[-2], key.shape[-2]))

    with torch.no_grad(), observing_attention(record):
        model(pixel_values=images)
    return calls


@torch.no_grad()
def prepare(model: nn.Module, config: AQDETRConfig, calibration_images: torch.Tensor, batch_size: int = 16,
            progress: bool = True) -> nn.Module:
    """The LSQ+ student of a DETR-family `model` (transformers, `pixel_values` input), quantizers
    initialised on `calibration_images` [N, 3, H, W]; `model` is left unchanged. With
    `config.auxiliary_queries` the student carries them (module docstring), inactive outside
    `train`."""
    if not isinstance(config, AQDETRConfig):
        raise ValueError(f"config must be an AQDETRConfig, got {type(config).__name__}")
    _check_images(calibration_images, "calibration_images")
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError("prepare needs a transformers model (its attention runs through AttentionInterface)")
    student = copy.deepcopy(model).eval()
    student.set_attn_implementation(register_attention())
    linears, convolutions = _linears(student), _convolutions(student)
    if not linears:
        raise ValueError("the model has no linear layer to quantize")
    stem = next(iter(convolutions), None)
    observers = {name: ActivationObserver() for name in (*linears, *convolutions)}
    attention_observers: Dict[nn.Module, List[ActivationObserver]] = {}

    def observe_attention(module, query, key, value, probs):
        found = attention_observers.setdefault(module, [ActivationObserver() for _ in range(4)])
        for observer, tensor in zip(found, (query, key, value, probs)):
            observer.observe(tensor)

    handles = [module.register_forward_pre_hook(
        lambda m, args, name=name: observers[name].observe(args[0] if name in linears else args[0].transpose(1, -1)))
        for name, module in (*linears.items(), *convolutions.items())]
    try:
        with observing_attention(observe_attention):
            for images in tqdm(list(_batches(calibration_images, batch_size)), desc="AQ-DETR calibration",
                               disable=not progress):
                student(pixel_values=images)
    finally:
        for handle in handles:
            handle.remove()
    if not attention_observers:
        raise ValueError("no attention ran through transformers' attention interface: nothing to quantize there")
    replacements = []
    for name, module in linears.items():
        layer = LSQLinear.from_linear(module, config.bits, weight_bits=config.bits)
        layer.input_quantizer.initialize(*static_scale(observers[name], config.bits, config.init, symmetric=False))
        replacements.append((name, layer))
    for name, module in convolutions.items():
        bits = config.stem_bits if (name == stem and config.stem_bits is not None) else config.bits
        layer = LSQConv2d(module, bits, bits)
        layer.input_quantizer.initialize(*static_scale(observers[name], bits, config.init, symmetric=False))
        replacements.append((name, layer))
    for name, layer in replacements:
        student.set_submodule(name, layer)
    lo, hi = qrange(config.bits)
    symmetric = config.bits == 8  # q − z of 8-bit codes would not fit the int8 products
    for module, found in attention_observers.items():
        quantizer = LSQAttentionQuantizer(config.bits, symmetric).to(calibration_images.device)
        for lsq, observer in zip((quantizer.query, quantizer.key, quantizer.value), found):
            lsq.initialize(*static_scale(observer, config.bits, config.init, symmetric=symmetric))
        # A ∈ [0, 1]: its grid from 0 to the largest probability seen (zero point at qmin when it has one)
        largest = max(float(found[3].maximum), 1e-8)
        if symmetric:
            quantizer.probs.initialize(largest / hi)
        else:
            quantizer.probs.initialize(largest / (hi - lo), lo)
        module.attention_quantizer = quantizer
    if config.auxiliary_queries:
        _add_auxiliary_queries(student, config.auxiliary_queries, calibration_images[:1])
    student.aqdetr_config = config
    return student


class AuxiliaryQueryEmbedding(nn.Module):
    """The object-query embedding with n_A auxiliary rows after its own (each a copy of a random
    object query plus noise, from torch's global generator): `weight` is the concatenation while
    `active` (inside `train`), the original rows otherwise."""

    def __init__(self, original: nn.Embedding, count: int):
        super().__init__()
        self.original = original
        self.auxiliary = nn.Parameter(original.weight.detach()[torch.randint(original.num_embeddings, (count,))].clone()
                                      + 0.1 * torch.randn(count, original.embedding_dim, device=original.weight.device))
        self.active = False

    @property
    def num_embeddings(self) -> int:
        return self.original.num_embeddings + (self.auxiliary.shape[0] if self.active else 0)

    @property
    def weight(self) -> torch.Tensor:
        if not self.active:
            return self.original.weight
        return torch.cat([self.original.weight, self.auxiliary.to(self.original.weight.dtype)])

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.weight)


def _query_embedding(model: nn.Module) -> Tuple[str, nn.Embedding]:
    count = getattr(model.config, "num_queries", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Embedding) and m.num_embeddings == count]
    if len(found) != 1:
        raise ValueError(f"auxiliary queries need exactly one nn.Embedding of config.num_queries={count} rows (the "
                         f"object queries); found {[name for name, _ in found]}")
    return found[0]


def _add_auxiliary_queries(student: nn.Module, count: int, example: torch.Tensor) -> None:
    name, embedding = _query_embedding(student)
    queries = embedding.num_embeddings
    auxiliary = AuxiliaryQueryEmbedding(embedding, count)
    student.set_submodule(name, auxiliary)
    without = _attention_calls(student, example)
    auxiliary.active = True
    try:
        with_auxiliary = _attention_calls(student, example)
    finally:
        auxiliary.active = False
    # the decoder's self-attention: query and key tokens are the queries, with and without n_A
    self_attention = [m for m, call in with_auxiliary.items()
                      if call.query_tokens == call.key_tokens == queries + count
                      and (without[m].query_tokens, without[m].key_tokens) == (queries, queries)]
    if not self_attention:
        raise ValueError("found no decoder self-attention over the object queries to separate the auxiliary ones in")
    for module in self_attention:
        module.attention_quantizer.query_groups = (queries, count)


def auxiliary_embedding(model: nn.Module) -> Optional[AuxiliaryQueryEmbedding]:
    return next((m for m in model.modules() if isinstance(m, AuxiliaryQueryEmbedding)), None)


def encoder_self_attentions(student: nn.Module, example: torch.Tensor) -> List[nn.Module]:
    """The attention modules of the encoder: self-attention over as many tokens as the image has,
    found by running `example` [1, 3, H, W] at two sizes (the encoder's token count follows the
    image, the decoder's the queries)."""
    larger = F.interpolate(example, size=(example.shape[-2] + 32, example.shape[-1] + 32), mode="bilinear",
                           align_corners=False)
    calls, resized = _attention_calls(student, example), _attention_calls(student, larger)
    return [m for m, c in calls.items() if c.query_tokens == c.key_tokens and m in resized
            and resized[m].query_tokens == resized[m].key_tokens != c.query_tokens]


@dataclasses.dataclass
class TrainReport:
    steps: int
    losses: List[float]  # total loss per step
    distillation_losses: List[float]  # λ_dis · LLD term per step (empty without)
    seconds: float


def _replicated(targets: Sequence[Dict[str, torch.Tensor]], replicas: int) -> List[Dict[str, torch.Tensor]]:
    return [{**t, "class_labels": t["class_labels"].repeat(replicas), "boxes": t["boxes"].repeat(replicas, 1)}
            for t in targets]


@contextlib.contextmanager
def _training_loss(student: nn.Module, replicas: int) -> Iterator[None]:
    """The model's own loss on the object queries, plus the same loss of the auxiliary queries
    against the replicated ground truth, installed as `student.loss_function` for the block."""
    embedding = auxiliary_embedding(student)
    own = student.__dict__.get("_loss_function")  # one the user set stays theirs
    original = type(student).loss_function.fget(student)
    queries = None if embedding is None else embedding.original.num_embeddings

    def loss(logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, **kwargs):
        if queries is None:
            return original(logits, labels, device, pred_boxes, config, outputs_class, outputs_coord, **kwargs)

        def part(tensor, auxiliary):
            if tensor is None:
                return None
            return tensor[..., queries:, :] if auxiliary else tensor[..., :queries, :]

        main = original(part(logits, False), labels, device, part(pred_boxes, False), config,
                        part(outputs_class, False), part(outputs_coord, False), **kwargs)
        extra = original(part(logits, True), _replicated(labels, replicas), device, part(pred_boxes, True), config,
                         part(outputs_class, True), part(outputs_coord, True), **kwargs)
        return main[0] + extra[0], main[1], main[2]

    student.loss_function = loss
    if embedding is not None:
        embedding.active = True
    try:
        yield
    finally:
        if own is None:
            del student._loss_function
        else:
            student._loss_function = own
        if embedding is not None:
            embedding.active = False


def _channel_kl(quantized: torch.Tensor, reference: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Mean over tokens of KL(softmax(reference) ‖ softmax(quantized)) over the last dimension;
    `normalize` first divides both by the reference's standard deviation per token, so features
    of any scale give distributions that are not flat."""
    quantized, reference = quantized.float(), reference.float()
    if normalize:
        spread = reference.std(dim=-1, keepdim=True).clamp_min(1e-6)
        quantized, reference = quantized / spread, reference / spread
    return F.kl_div(F.log_softmax(quantized, dim=-1), F.log_softmax(reference, dim=-1),
                    log_target=True, reduction="none").sum(dim=-1).mean()


@contextlib.contextmanager
def _layer_distillation(modules: Sequence[nn.Module], collected: List[torch.Tensor]) -> Iterator[None]:
    def hook(module, args, kwargs, output):
        if not quantizing():
            return None
        with torch.no_grad(), full_precision():
            reference = module(*args, **kwargs)
        quantized = output[0] if isinstance(output, tuple) else output
        reference = reference[0] if isinstance(reference, tuple) else reference
        collected.append(_channel_kl(quantized, reference, normalize=True))
        return None

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train(student: nn.Module, images: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]], steps: int,
          batch_size: int = 32, lr: float = 1e-4, quantizer_lr: float = 1e-3, teacher: Optional[nn.Module] = None,
          kd_weight: float = 0.0, feature_weight: float = 0.0, seed: int = 0, progress: bool = True) -> TrainReport:
    """QAT of a `prepare`d student on `images` [N, 3, H, W] with DETR-format `targets`: `steps`
    AdamW steps of `batch_size` random images (`lr` for the weights, `quantizer_lr` for the steps
    and zero points), gradient norm clipped at 0.1 (DETR's). The config given to `prepare` says
    whether auxiliary queries and layer-by-layer distillation join; against a frozen fp `teacher`,
    `kd_weight` > 0 adds the KL of the class distributions (the object queries) and
    `feature_weight` > 0 the squared error of the encoder's output features relative to the
    teacher's mean square."""
    config = getattr(student, "aqdetr_config", None)
    if not isinstance(config, AQDETRConfig):
        raise ValueError("student was not made by aqdetr.prepare")
    _check_images(images)
    if len(targets) != images.shape[0]:
        raise ValueError(f"{len(targets)} targets for {images.shape[0]} images")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, weight in (("kd_weight", kd_weight), ("feature_weight", feature_weight)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name} must be a finite number ≥ 0, got {weight!r}")
        if weight > 0 and teacher is None:
            raise ValueError(f"{name} > 0 needs a teacher")
    quantizer_params = [p for n, p in student.named_parameters() if "quantizer." in n]
    other_params = [p for n, p in student.named_parameters() if "quantizer." not in n]
    optimizer = torch.optim.AdamW([{"params": other_params, "lr": lr},
                                   {"params": quantizer_params, "lr": quantizer_lr, "weight_decay": 0.0}],
                                  weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    encoder = encoder_self_attentions(student, images[:1]) if config.distillation else []
    losses, distillation_losses = [], []
    start = time.perf_counter()
    student.train()
    collected: List[torch.Tensor] = []
    try:
        with _training_loss(student, config.replicas), _layer_distillation(encoder, collected):
            for _ in tqdm(range(steps), desc="AQ-DETR QAT", disable=not progress):
                index = torch.randint(images.shape[0], (batch_size,), generator=generator)
                batch = images[index]
                labels = [targets[i] for i in index.tolist()]
                collected.clear()
                output = student(pixel_values=batch, labels=labels)
                loss = output.loss
                if collected:
                    distillation = config.distillation * torch.stack(collected).mean()
                    distillation_losses.append(float(distillation.detach()))
                    loss = loss + distillation
                if kd_weight or feature_weight:
                    with torch.no_grad():
                        reference = teacher(pixel_values=batch)
                if kd_weight:
                    student_logits = output.logits[:, :reference.logits.shape[1]]
                    loss = loss + kd_weight * _channel_kl(student_logits, reference.logits)
                if feature_weight:
                    features = reference.encoder_last_hidden_state.float()
                    error = (output.encoder_last_hidden_state.float() - features).square().mean()
                    loss = loss + feature_weight * error / features.square().mean().clamp_min(1e-12)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 0.1)
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        student.eval()
    return TrainReport(steps, losses, distillation_losses, time.perf_counter() - start)


def _linear_weight(layer: LSQLinear) -> QuantizedWeight:
    return QuantizedWeight(layer.weight_quantizer.codes(layer.weight), "int8", layer.weight_quantizer.step_size())


@torch.no_grad()
def export(student: nn.Module) -> nn.Module:
    """The student as the kernels' quantized model (a new module; the student is unchanged):
    every LSQLinear a QuantLinear and every LSQConv2d a QuantConv2d (W4A4 or W8A8 by their bits;
    the learned weight codes and steps; the learned input step and rounded zero point as the
    static activation scale), every attention quantizer a QuantizedAttention, and the
    auxiliary queries gone. Run `qk.convert_for_runtime` on the result to freeze it."""
    if not isinstance(getattr(student, "aqdetr_config", None), AQDETRConfig):
        raise ValueError("student was not made by aqdetr.prepare")
    model = copy.deepcopy(student)
    del model.aqdetr_config
    embedding = auxiliary_embedding(model)
    if embedding is not None:
        name = next(n for n, m in model.named_modules() if m is embedding)
        model.set_submodule(name, embedding.original)
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, LSQLinear):
            config = _quant_config(module.weight_quantizer.bits)
            layer = QuantLinear.from_float(module, config, qweight=_linear_weight(module))
        elif isinstance(module, LSQConv2d):
            config = _quant_config(module.weight_quantizer.bits)
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.groups, module.bias is not None,
                              device=module.weight.device)
            plain.weight.copy_(module.weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
            layer = QuantConv2d.from_float(plain, config)
            layer.load_codes(conv_weight_matrix(module.weight_quantizer.codes(module.weight)),
                             module.weight_quantizer.step_size())
        else:
            continue
        quantizer = module.input_quantizer
        layer.set_static_activation(quantizer.step_size().reshape(1),
                                    None if quantizer.zero is None else quantizer.integer_zero().reshape(1))
        replacements.append((name, layer))
    for name, layer in replacements:
        model.set_submodule(name, layer)
    for module in model.modules():
        quantizer = getattr(module, "attention_quantizer", None)
        if isinstance(quantizer, LSQAttentionQuantizer):
            module.attention_quantizer = QuantizedAttention.from_quantizer(quantizer)
    announce_quantized(model)  # transformers' save_pretrained writes the qla layout from here on
    return model.eval()
