"""End-to-end recipes behind `qla quantize` and `qla eval`: load a model and data from local paths
(never a hub), quantize with a method, save, evaluate against the fp model.

Models: a timm model name (weights from `--checkpoint`, a local file, else a seeded random init) or a local
Hugging Face model directory. Data: an image folder (torchvision ImageFolder layout; images get the
timm model's own eval transform) or a text file with one sentence per line.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..methods import gplq, gptq, ptq, qla, qwt, rotation
from ..models.batches import model_output, run_model, token_mask
from ..models.blocks import find_blocks
from ..nn import QuantLinear, is_linear, quantize_
from ..quant.config import W4A4, W4A8, W4A16, W8A8, QuantConfig

CONFIG_NAMES = ("w8a8", "w4a8", "w4a16", "w4a4")
METHODS = ("ptq", "qwt", "gptq", "gptq+qwt", "gplq", "ptq+qla", "qwt+qla", "gptq+qla", "gptq+qwt+qla", "gplq+qla")


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "vision" or "text"
    tokenizer: Any = None
    transform: Any = None


def make_config(name: str, group_size: Optional[int] = None, rotate: Optional[str] = None) -> QuantConfig:
    name = name.lower()
    if name not in CONFIG_NAMES:
        raise ValueError(f"config must be one of {CONFIG_NAMES}, got {name!r}")
    if rotate is not None and name == "w4a16":
        raise ValueError("W4A16 quantizes no activations: there is nothing to rotate (--rotate is for w8a8, w4a8, w4a4)")
    if name == "w8a8":
        return W8A8(rotate=rotate)
    if name == "w4a4":
        return W4A4(rotate=rotate)
    if name == "w4a8":
        return W4A8(group_size=group_size, rotate=rotate)
    return W4A16(group_size=group_size if group_size is not None else 128)


def load_model(spec: str, checkpoint: Optional[str] = None) -> LoadedModel:
    """A local HF model directory, or a timm model name with an optional local checkpoint file."""
    if Path(spec).is_dir():
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(spec, local_files_only=True)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        model_class = AutoModelForCausalLM if causal else AutoModel
        model = model_class.from_pretrained(spec, local_files_only=True).eval()
        return LoadedModel(model, "text", tokenizer=AutoTokenizer.from_pretrained(spec, local_files_only=True))
    import timm
    from timm.data import create_transform, resolve_data_config

    try:
        # Without a checkpoint the weights are a random init: seeded, so that `qla quantize` and
        # `qla eval` build the same fp model (eval compares the saved quantization with it).
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = timm.create_model(spec, pretrained=False, checkpoint_path=checkpoint or "").eval()
    except RuntimeError as error:
        raise ValueError(f"--model {spec!r} is neither a local Hugging Face directory nor a timm model: {error}") from None
    transform = create_transform(**resolve_data_config({}, model=model))
    return LoadedModel(model, "vision", transform=transform)


def load_batches(path: str, loaded: LoadedModel, batches: int, batch_size: int) -> List[Any]:
    """Up to `batches` batches: (images, labels) from an image folder, or tokenized dicts from a text file."""
    source = Path(path)
    if loaded.kind == "vision":
        if not source.is_dir():
            raise ValueError(f"{path} must be an image folder (class sub-folders of images) for a vision model")
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(source), transform=loaded.transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        return [batch for _, batch in zip(range(batches), loader)]
    if not source.is_file():
        raise ValueError(f"{path} must be a text file (one sentence per line) for a text model")
    lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    if loaded.tokenizer.pad_token is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return [dict(loaded.tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=256,
                                  return_tensors="pt"))
            for i in range(0, min(len(lines), batches * batch_size), batch_size)]


HELD_OUT_FRACTION = 0.2  # of the calibration batches, kept out of calibration to judge each stage


def held_out_error(fp: nn.Module, quantized: nn.Module, batches: List[Any]) -> float:
    """One number to compare stages by (lower is better): KL(fp‖q) for logits, else 1 − cosine."""
    metrics = evaluate(fp, quantized, batches)
    return metrics["kl"] if "kl" in metrics else 1.0 - metrics["cosine"]


STAGE_NAMES = {"qwt": "QwT", "qla": "QLA"}  # the optional stages, as warnings name them


@dataclasses.dataclass(frozen=True)
class Stages:
    """What a method runs, in the pipeline's order: rotation (the config's), then the weights
    (`weights`: "ptq" round to nearest, "gptq", or "gplq" activation-first QAT + clipped
    weights), then QwT, then QLA adapters."""

    weights: str
    qwt: bool
    qla: bool


def parse_method(method: str) -> Stages:
    """`method` (one of METHODS) → its Stages. "qwt" is PTQ + QwT; "gplq" includes its QwT."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    parts = method.split("+")
    weights = parts[0] if parts[0] in ("ptq", "gptq", "gplq") else "ptq"
    return Stages(weights, "qwt" in parts or weights == "gplq", "qla" in parts)


@dataclasses.dataclass(frozen=True)
class QLAOptions:
    """QLA's stage in `quantize_model`: adapter rank, epochs over the calibration batches, AdamW lr.
    The defaults were chosen on the shipped corpus' validation split (README, "Accuracy at 4 bits")."""

    rank: int = 8
    epochs: int = 4
    lr: float = 3e-3

    def __post_init__(self):
        for name in ("rank", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QLA {name} must be a positive int, got {value!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"QLA lr must be a positive number, got {self.lr!r}")


def _add_qla_adapters(model: nn.Module, example: Any, rank: int) -> List[str]:
    """Transformer blocks get QLA's attention and FFN adapters; blocks of convolutions only (CNNs)
    the depthwise-separable compensation."""
    blocks = find_blocks(model)
    if any(is_linear(m) or isinstance(m, QuantLinear) for _, block in blocks for m in block.modules()):
        return qla.add_adapters(model, rank=rank, example=example)
    return qla.add_conv_adapters(model, example, rank=rank)


def quantize_model(fp: nn.Module, config: QuantConfig, method: str, batches: List[Any],
                   static_activations: bool = False, progress: bool = True,
                   qla_options: QLAOptions = QLAOptions()) -> Tuple[nn.Module, Dict[str, Any]]:
    """A quantized copy of `fp` by `method` (`parse_method`: rotation → weights → QwT → QLA;
    rotation is the config's `rotate`: folded into the residual stream where the model allows it,
    `methods.rotation`, with online rotation left on the linears that do not read the stream;
    online everywhere otherwise and for GPLQ; `report["rotation"]` says which and why), with
    static activation scales when `static_activations`
    (calibrated by percentile search; for "gplq", its learned LSQ+ quantizers, else GPLQ trains
    the weights against per-token dynamic activations). Returns the model and what calibration
    reported.

    With two batches or more, the last HELD_OUT_FRACTION of them (at least one) is held out of
    calibration and judges every stage (`held_out_error`): the report lists each stage's error
    and its gain over the stage before, a QwT or QLA stage that makes it worse is dropped (the
    model before it is kept, and the report and a warning say so), and a result worse than plain
    round-to-nearest PTQ is flagged (`worse_than_ptq`) with a warning."""
    stages = parse_method(method)
    if not batches:
        raise ValueError("no calibration batches")
    held = max(1, round(HELD_OUT_FRACTION * len(batches))) if len(batches) >= 2 else 0
    calibration, held_out = (batches[:-held], batches[-held:]) if held else (batches, [])
    report: Dict[str, Any] = {"config": str(config), "method": method, "calibration_batches": len(calibration),
                              "held_out_batches": len(held_out), "stages": []}

    def judged(stage: str, model: nn.Module) -> Optional[float]:
        if not held_out:
            return None
        error = held_out_error(fp, model, held_out)
        entry = {"stage": stage, "held_out_error": error}
        kept = [s for s in report["stages"] if not s.get("dropped")]
        if kept:
            entry["gain"] = kept[-1]["held_out_error"] - error
        report["stages"].append(entry)
        return error

    def optional_stage(name: str, model: nn.Module, error: Optional[float], run) -> Tuple[nn.Module, Optional[float]]:
        """Runs `run(model)` in place; drops it (returns the model before) when it makes the held-out error worse."""
        before = copy.deepcopy(model) if held_out else None
        run(model)
        after = judged(name, model)
        if after is not None and after > error:
            report["stages"][-1]["dropped"] = True
            warnings.warn(f"{STAGE_NAMES[name]} made the held-out error worse ({error:.4g} -> {after:.4g}): dropped")
            return before, error
        return model, after

    original = fp
    online_layers: Optional[List[str]] = None  # with a folded rotation: the linears still rotating online
    if config.rotate and stages.weights == "gplq":
        report["rotation"] = {"form": "online", "not_folded": "GPLQ trains every linear against one config"}
    elif config.rotate:
        folded = copy.deepcopy(fp)
        try:
            fold = rotation.fold_rotation(folded, calibration[0])
        except ValueError as reason:
            report["rotation"] = {"form": "online", "not_folded": str(reason)}
        else:  # the teacher from here on is the folded fp model: the same outputs, its stream in the rotated basis
            fp, online_layers = folded, fold.online
            report["rotation"] = {"form": "folded", "online": fold.online}

    def weights(quantizer) -> nn.Module:
        """`quantizer(model, config, filter_fn)` on a copy of fp: with a folded rotation, the config
        rotates online only on the fold's `online` linears, the others read the rotated stream."""
        model = copy.deepcopy(fp)
        if online_layers is None:
            return quantizer(model, config, None)
        quantizer(model, config, lambda module, name: name in online_layers)
        return quantizer(model, dataclasses.replace(config, rotate=None), None)

    if stages.weights == "gplq":
        student, stage1 = gplq.activation_qat(fp, config, calibration, progress=progress,
                                              activations="static" if static_activations else "dynamic")
        model, _ = gplq.weight_ptq(student, fp, config, calibration, compensate=False, progress=progress)
        report.update(gplq_activations="static" if static_activations else "dynamic", gplq_steps=stage1.steps,
                      gplq_loss_first=stage1.losses[0], gplq_loss_last=stage1.losses[-1])
        if static_activations:
            report["static_scales"] = stage1.quantized_layers
    elif stages.weights == "gptq":
        model = weights(lambda m, c, only: gptq.quantize(m, c, calibration, filter_fn=only, progress=progress))
    else:
        model = weights(quantize_)
    if static_activations and config.act_bits and stages.weights != "gplq":
        report["static_scales"] = len(ptq.calibrate(model, calibration, progress=progress))
    error = judged(stages.weights, model)
    if stages.qwt:
        blocks: List[Any] = []
        model, error = optional_stage("qwt", model, error, lambda m: blocks.extend(
            qwt.calibrate(fp, m, calibration, progress=progress)))
        dropped = report["stages"][-1].get("dropped", False) if held_out else False
        report["qwt_blocks"] = len(blocks)
        report["qwt_blocks_kept"] = 0 if dropped else sum(b.enabled for b in blocks)
    if stages.qla:
        def adapt(m: nn.Module) -> None:
            names = _add_qla_adapters(m, calibration[0], qla_options.rank)
            trained = qla.train(m, fp, calibration, epochs=qla_options.epochs, lr=qla_options.lr, progress=progress)
            report.update(qla_blocks=len(names), qla_steps=trained.steps, qla_rank=qla_options.rank)
        model, error = optional_stage("qla", model, error, adapt)
    if held_out:
        baseline = error if method == "ptq" and not static_activations and online_layers is None else held_out_error(
            fp, quantize_(copy.deepcopy(original), config), held_out)
        report["ptq_held_out_error"] = baseline
        report["worse_than_ptq"] = error > baseline
        if error > baseline:
            warnings.warn(f"{method} gives a held-out error of {error:.4g}, worse than plain PTQ's {baseline:.4g} "
                          "(round to nearest, per-token activations)")
    return model, report


@torch.no_grad()
def evaluate(fp: nn.Module, quantized: nn.Module, batches: List[Any]) -> Dict[str, float]:
    """Quantized vs fp on `batches`: for logits, KL(fp‖q), top-1 agreement and (with labels)
    accuracy of both; for hidden states, the cosine of their token means."""
    totals: Dict[str, float] = {}
    count = 0
    for batch in batches:
        reference, output = model_output(run_model(fp, batch)).float(), model_output(run_model(quantized, batch)).float()
        mask = token_mask(batch)
        if reference.dim() == 3:  # [batch, tokens, features]: compare per sequence
            weights = mask.unsqueeze(-1).float() if mask is not None else torch.ones_like(reference[..., :1])
            reference = (reference * weights).sum(1) / weights.sum(1)
            output = (output * weights).sum(1) / weights.sum(1)
        stats = {"cosine": torch.nn.functional.cosine_similarity(reference, output, dim=-1)}
        if isinstance(batch, (tuple, list)):  # image folder: logits and labels
            p, q = torch.log_softmax(reference, -1), torch.log_softmax(output, -1)
            stats["kl"] = (p.exp() * (p - q)).sum(-1)
            stats["top1_agreement"] = (reference.argmax(-1) == output.argmax(-1)).float()
            labels = batch[1]
            stats["accuracy_fp"] = (reference.argmax(-1) == labels).float()
            stats["accuracy_quantized"] = (output.argmax(-1) == labels).float()
        for key, values in stats.items():
            totals[key] = totals.get(key, 0.0) + float(values.sum())
        count += reference.shape[0]
    return {key: value / count for key, value in totals.items()} | {"samples": count}
