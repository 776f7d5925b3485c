"""The launch table: every Triton launch that real models make, compiled ahead of time, no GPU.

    python -m qla_kernels.launch_table --write-table      the whole table (make aot-check)
    python -m qla_kernels.launch_table --ci --sample N    what make test checks
    python -m qla_kernels.launch_table --compare-log FILE launches a GPU run logged (QLA_LAUNCH_LOG)
                                                          that the table lacks

Each model is built with random weights at its real widths (two blocks, since blocks are found
as repeated modules: ViT-B/16, DeiT-S, Swin-T with two blocks per stage, BERT-base, LLaMA-3-8B,
GPT-2, CLIP ViT-B/16, Gemma-2B) and converted as a user converts it: `quantize_` with W8A8, W4A8
(per channel and g128), W4A4 or W4A16 (g128), and on ViT-B/16, BERT-base and LLaMA-3-8B W4A8
and W4A4 with online Hadamard rotation (the rotating pre-kernel); activation scales dynamic,
static per tensor, or static with a zero point; no corrections, QLA adapters (rank 8) with a
QwT compensation of rank 128 or 24 lowered into the GEMMs, QwT alone at rank 48 or at full rank; then `fuse_blocks`, and a
cast to fp16, bf16 or fp32 (fp32: tf32x3 dots, fp32 T). The CNNs (ResNet-50 at batch 64, 224²;
DETR-R50's backbone at 800×1066, two blocks per stage) quantize their convolutions
(`quantize_convs_`; ResNet-50's classifier with `quantize_`) with W8A8, W4A8 or W4A4 at each scale kind, without corrections or with QwT's
group-wise compensations, and convert with `convert_for_runtime` (norms and activations folded,
residual blocks fused, QwT lowered). Every converted model runs at its real
batch on the meta device under `ops.triton.kernel_launch.planning` for sm_90 (H100) and sm_80
(A100): the launch code selects as it would on those GPUs (tiles, every autotune candidate,
split-K, stages) and records instead of launching. LLaMA's LM head (vocabulary 128,256) runs as a
plain QuantLinear at prefill and decode, and op-level calls add what no conversion makes
(per-row zero points); the quantized attention core (AQ-DETR's static quantizers and the `paper`
preset's per-token / log2 ones) is planned at DETR-R50's, ViT-B/16's, BERT-base's and LLaMA- and
Gemma-style attention shapes as the pseudo-model `quantized_attention`. The distinct compile keys are compiled and checked by `ops.triton.aot`.

`--write-table` records, after a check that passes, the key of every launch and its class (what
it computes, without sizes and tiles) in benchmarks/results/aot_launch_table.json. `--ci` plans a
subset of the conversions and fails when it plans a key the recorded table lacks (the launch
code changed: run the whole table again); `--sample N` then checks N keys spread over every
kernel, architecture and constexpr value. Exits 1 if any launch fails a check.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .ops.triton.kernel_launch import A100, H100, PlannedLaunch, Target, key_to_json, launch_class, planning

CONFIGS = ("W8A8", "W4A8", "W4A8g128", "W4A4", "W4A16g128")
# Online Hadamard rotation (the rotating pre-kernel), planned on the models that set `rotated`:
# dynamic scales without and with QLA + QwT (T from the unrotated rows), static with a zero point.
ROTATED_CONFIGS = ("W4A8rot", "W4A4rot")
ROTATED_CONVERSIONS = (("dynamic", "none"), ("dynamic", "qla_qwt24"), ("static_zero", "none"))
ACTIVATION_SCALES = ("dynamic", "static", "static_zero")
# (QLA adapters?, QwT rank or "full" or None). Ranks only pick the epilogue's and the pre-kernel's
# BLOCK_R (ranks are not specialized): 8 + 128 and 128 take the widest, 8 + 24 and 24 the 32-wide,
# 48 the 64-wide step; QLA's rank 8 alone the 16-wide one.
CORRECTIONS = {"none": (False, None), "qla_qwt128": (True, 128), "qwt_full": (False, "full"),
               "qla_qwt24": (True, 24), "qwt48": (False, 48)}
RANK_VARIANTS = ("qla_qwt24", "qwt48")  # converted with dynamic scales only: the rank is independent of them
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TARGETS = (H100, A100)
QLA_RANK = 8
TABLE_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "aot_launch_table.json"


def quant_config(name: str):
    import qla_kernels as qk

    return {"W8A8": qk.W8A8(), "W4A8": qk.W4A8(), "W4A8g128": qk.W4A8(group_size=128), "W4A4": qk.W4A4(),
            "W4A16g128": qk.W4A16(group_size=128), "W4A8rot": qk.W4A8(rotate="hadamard"),
            "W4A4rot": qk.W4A4(rotate="hadamard")}[name]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model at its real widths and the input shapes it is called with."""

    name: str
    example_shape: Tuple[int, ...]  # a small input that fusion checks the blocks on
    call_shapes: Tuple[Tuple[int, ...], ...]  # the real calls
    text: bool = False  # inputs are token ids
    # Every config × scales × corrections, or (models that add an epilogue, not a shape regime)
    # every config with dynamic scales, without corrections and with QLA + QwT 128.
    full_grid: bool = True
    vocab: int = 1024  # token ids are drawn below it
    cnn: bool = False  # convolutions (quantize_convs_, CNN_CONFIGS, CNN_CORRECTIONS, convert_for_runtime)
    rotated: bool = False  # also ROTATED_CONFIGS × ROTATED_CONVERSIONS


MODELS = (
    ModelSpec("vit_b16", (1, 3, 224, 224), ((64, 3, 224, 224),), rotated=True),
    ModelSpec("deit_s", (1, 3, 224, 224), ((64, 3, 224, 224),)),
    ModelSpec("swin_t", (1, 3, 224, 224), ((64, 3, 224, 224),)),
    ModelSpec("bert_base", (1, 16), ((32, 128),), text=True, rotated=True),
    ModelSpec("llama8b", (1, 16), ((1, 1), (16, 1), (1, 2048)), text=True, rotated=True),
    ModelSpec("gpt2", (1, 16), ((8, 1024), (1, 1)), text=True, full_grid=False),  # tanh GELU, Conv1D
    ModelSpec("clip_b16", (1, 3, 224, 224), ((64, 3, 224, 224),), full_grid=False),  # QuickGELU
    ModelSpec("gemma2b", (1, 16), ((1, 1), (1, 2048)), text=True, full_grid=False),  # GeGLU (tanh), RMSNorm 1 + w
    ModelSpec("resnet50", (1, 3, 64, 64), ((64, 3, 224, 224),), cnn=True),
    ModelSpec("detr_r50_backbone", (1, 3, 64, 64), ((1, 3, 800, 1066),), cnn=True),
)
# Op-level calls planned like a model: the quantized attention core at DETR-R50's shapes at
# 800×1066 (8 heads of 32; the encoder's 25×34 tokens with a padding mask, the decoder's 100
# queries, cross-attention), ViT-B/16's at batch 64, BERT-base's with a padding mask, and
# LLaMA-style (heads of 128) and Gemma-style (heads of 256) causal ones, for each quantizer kind: AQ-DETR's static ones
# (bits, symmetric) and the `paper` preset's per-token / log2 ones at 4 and 8 bits.
ATTENTION_CALLS = "quantized_attention"
ATTENTION_SHAPES = ((1, 8, 850, 850, 32, True), (1, 8, 100, 100, 32, False), (1, 8, 100, 850, 32, True),
                    (64, 12, 197, 197, 64, False), (8, 12, 128, 128, 64, True), (1, 32, 512, 512, 128, True),
                    (1, 8, 512, 512, 256, True))
ATTENTION_QUANTIZERS = (("static", 4, False), ("static", 4, True), ("static", 8, True),
                        ("tokenwise_log2", 4, True), ("tokenwise_log2", 8, True))
CNN_CONFIGS = ("W8A8", "W4A8", "W4A4")  # convolutions are per channel; W4A16 has no integer convolution
# None, or QwT's group-wise compensations (calibrated on one random batch) lowered into the fused
# residual blocks' last convolutions.
CNN_CORRECTIONS = ("none", "qwt_conv")


def build(name: str) -> nn.Module:
    """The fp model `name` with random weights (seeded), two blocks of each shape, in eval mode."""
    torch.manual_seed(0)
    if name == "resnet50":  # two bottlenecks per stage: every layer shape, stride and downsample
        import torchvision

        return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [2, 2, 2, 2]).eval()
    if name in ("vit_b16", "deit_s", "swin_t"):
        import timm

        if name == "swin_t":
            model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2, 2, 2))
        else:
            model = timm.create_model("vit_base_patch16_224" if name == "vit_b16" else "deit_small_patch16_224",
                                      pretrained=False, depth=2)
        return model.eval()
    import transformers

    if name == "bert_base":
        config = transformers.BertConfig(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                                         intermediate_size=3072, vocab_size=1024)
        return transformers.BertModel(config).eval()
    if name == "llama8b":  # the real LM head (vocabulary 128,256) is planned on its own: see lm_head_launches
        config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=1024,
                                          max_position_embeddings=4096)
        return transformers.LlamaForCausalLM(config).eval()
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=768, n_layer=2, n_head=12, n_positions=1024, vocab_size=1024,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    if name == "clip_b16":
        config = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                                               num_attention_heads=12, image_size=224, patch_size=16)
        return transformers.CLIPVisionModel(config).eval()
    if name == "detr_r50_backbone":
        # Hugging Face DETR-R50's ResNet-50 backbone (frozen norms; two blocks per stage). Its
        # transformer's linears launch what the other models' do; the whole DETR does not run on the
        # meta device (its attention masks read values).
        backbone = transformers.ResNetConfig(depths=[2, 2, 2, 2], layer_type="bottleneck", out_features=["stage4"])
        config = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                         backbone_config=backbone, encoder_layers=1, decoder_layers=1)
        return transformers.DetrForObjectDetection(config).model.backbone.model.eval()
    if name == "gemma2b":
        config = transformers.GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                                          vocab_size=1024, max_position_embeddings=4096)
        return transformers.GemmaForCausalLM(config).eval()
    raise ValueError(f"unknown model {name!r}; expected one of {[spec.name for spec in MODELS]}")


def model_inputs(spec: ModelSpec, shape: Tuple[int, ...], device: str) -> torch.Tensor:
    """Random token ids or images (seeded; on the meta device only the shape)."""
    if device == "meta":
        return torch.empty(shape, dtype=torch.long if spec.text else torch.float32, device="meta")
    generator = torch.Generator().manual_seed(0)
    if spec.text:
        return torch.randint(0, spec.vocab, shape, generator=generator)
    return torch.randn(shape, generator=generator)


def quantize(spec: ModelSpec, model_fp: nn.Module, config: str, scales: str) -> nn.Module:
    """`model_fp` quantized with `config` and its activation scales made static (per tensor, with
    a zero point) when `scales` says so. LM heads stay fp (planned on their own), and so do
    linears whose width the config's groups do not divide (Swin-T's first stages at g128), as a
    user's filter_fn would keep them."""
    import qla_kernels as qk
    from .nn.quant_linear import linear_weight

    from .nn.quant_conv import QuantConv2d, quantize_convs_

    quant = quant_config(config)
    group = quant.group_size or 1
    model = copy.deepcopy(model_fp)
    if spec.cnn:
        quantize_convs_(model, quant)
    if not spec.cnn or any(isinstance(m, nn.Linear) for m in model.modules()):
        qk.quantize_(model, quant, filter_fn=lambda module, fqn: (
            "lm_head" not in fqn and linear_weight(module).shape[1] % group == 0))
    if scales != "dynamic":
        for module in model.modules():
            if isinstance(module, (qk.QuantLinear, QuantConv2d)):
                module.set_static_activation(0.05, 3 if scales == "static_zero" else None)
    return model


def convert(spec: ModelSpec, model_q: nn.Module, corrections: str, model_fp: Optional[nn.Module] = None) -> nn.Module:
    """A copy of the quantized `model_q` with `corrections` lowered into its GEMMs (random, trained-
    looking values: QwT compensations attached where `qwt.calibrate` attaches them, QLA adapters),
    then fused as a user runs it (see the module docstring). `model_fp`, the CNNs' QwT teacher:
    `build(spec.name)` by default."""
    import qla_kernels as qk
    from .methods import qla, qwt
    from .models.blocks import find_blocks
    from .models.facts import describe
    from .nn.compensation import QwTCompensation, attach

    example = model_inputs(spec, spec.example_shape, "cpu")
    model = copy.deepcopy(model_q)
    if spec.cnn:
        if corrections == "qwt_conv":
            teacher = model_fp if model_fp is not None else build(spec.name)
            qwt.calibrate(teacher, model, [model_inputs(spec, (2, *spec.example_shape[1:]), "cpu")], progress=False)
        with torch.no_grad():
            qk.convert_for_runtime(model, example)
        return model
    adapters, qwt_rank = CORRECTIONS[corrections]
    if qwt_rank is not None:
        facts = describe(model, example).block
        generator = torch.Generator().manual_seed(1)
        random = lambda *shape: torch.randn(*shape, generator=generator) * 0.01  # noqa: E731
        for _, block in find_blocks(model):
            d_in = block.get_submodule(facts.attention_inputs[0]).in_features
            d_out = block.get_submodule(facts.mlp_output).out_features
            if qwt_rank == "full":
                compensation = QwTCompensation(random(d_out, d_in), random(d_out), output_norm=facts.output_norm)
            else:
                compensation = QwTCompensation(random(d_out, qwt_rank), random(d_out), random(d_in, qwt_rank),
                                               facts.output_norm)
            attach(block, compensation)
        if adapters:
            qla.add_adapters(model, rank=QLA_RANK, example=example)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "qla_" in name:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            qla.fuse(model)
        qwt.lower(model, example)
    qk.fuse_blocks(model, example)
    return model


def lm_head_launches(config: str, dtype: torch.dtype, target: Target) -> List[PlannedLaunch]:
    """LLaMA-3-8B's LM head (4096 → 128,256) as a plain QuantLinear at prefill and decode: its
    output at prefill has more than 2**31 elements once M >= 16,745."""
    import qla_kernels as qk

    head = qk.QuantLinear(4096, 128256, False, quant_config(config), device="meta").to(dtype)
    with planning(target) as launches, torch.no_grad():
        for rows in (1, 16, 2048, 16745):
            head(torch.empty(rows, 4096, device="meta", dtype=dtype))
    return launches


def op_launches(dtype: torch.dtype, target: Target) -> List[PlannedLaunch]:
    """What the ops take that no conversion produces: per-row activation zero points (at 8 bits,
    the GEMM's −z·colsum term), at ViT-B/16's fc1 and fc2 at batch 64, plain and re-quantized."""
    import qla_kernels as qk
    from . import ops

    launches = []
    for in_features, out_features in ((768, 3072), (3072, 768)):
        layer = qk.QuantLinear(in_features, out_features, True, qk.W8A8(), device="meta").to(dtype)
        weight = dataclasses.replace(layer.quantized_weight(),
                                     colsum=torch.empty(out_features, dtype=torch.int32, device="meta"))
        rows = 64 * 197
        a = torch.empty(rows, in_features, dtype=torch.int8, device="meta")
        scale, zero = torch.empty(rows, device="meta"), torch.empty(rows, dtype=torch.int8, device="meta")
        with planning(target) as planned, torch.no_grad():
            ops.fused_linear(a, scale, weight, a_zero_point=zero, bias=layer.bias, out_dtype=dtype)
            ops.fused_linear(a, scale, weight, a_zero_point=zero, bias=layer.bias, activation="gelu", requant_bits=8)
        launches += planned
    return launches


def attention_launches(dtype: torch.dtype, target: Target) -> List[PlannedLaunch]:
    """The quantized attention core at ATTENTION_SHAPES for each of ATTENTION_QUANTIZERS."""
    from . import ops

    launches = []
    for batch, heads, q_tokens, k_tokens, head_dim, masked in ATTENTION_SHAPES:
        query = torch.empty(batch, heads, q_tokens, head_dim, dtype=dtype, device="meta")
        key = torch.empty(batch, heads, k_tokens, head_dim, dtype=dtype, device="meta")
        mask = torch.empty(batch, 1, q_tokens, k_tokens, device="meta") if masked else None
        for kind, bits, symmetric in ATTENTION_QUANTIZERS:
            if kind == "tokenwise_log2":
                quantization = ops.TokenwiseLog2Quantization(bits)
            else:
                quantization = ops.AttentionQuantization(bits, torch.empty(4, device="meta"),
                                                         None if symmetric else torch.empty(4, device="meta"))
            with planning(target) as planned, torch.no_grad():
                ops.quantized_attention(query, key, key, quantization, head_dim ** -0.5, mask)
            launches += planned
    return launches


def model_launches(spec: ModelSpec, model: nn.Module, target: Target, dtype: torch.dtype) -> List[PlannedLaunch]:
    """The launches of `model` (on the meta device, cast to `dtype`) at the spec's real calls."""
    with planning(target) as launches, torch.no_grad():
        for shape in spec.call_shapes:
            inputs = model_inputs(spec, shape, "meta")
            model(inputs.to(dtype) if not spec.text else inputs)
    return launches


@dataclasses.dataclass(frozen=True)
class Conversion:
    model: str
    config: str
    scales: str
    corrections: str


def conversions(models: Sequence[str]) -> Iterator[Conversion]:
    """The table's conversions, grouped by model, then config and scales (plan reuses those)."""
    specs = {spec.name: spec for spec in MODELS}
    for model in models:
        if model == ATTENTION_CALLS:
            yield Conversion(model, "W4A4", "static_zero", "none")
            continue
        if specs[model].cnn:
            for config in CNN_CONFIGS:
                for scales in ACTIVATION_SCALES:
                    for corrections in CNN_CORRECTIONS:
                        yield Conversion(model, config, scales, corrections)
            continue
        full = specs[model].full_grid
        for config in CONFIGS:
            for scales in (("dynamic",) if config.startswith("W4A16") or not full else ACTIVATION_SCALES):
                for corrections in (CORRECTIONS if full else ("none", "qla_qwt128")):
                    if scales == "dynamic" or corrections not in RANK_VARIANTS:
                        yield Conversion(model, config, scales, corrections)
        if specs[model].rotated:
            for config in ROTATED_CONFIGS:
                for scales, corrections in ROTATED_CONVERSIONS:
                    yield Conversion(model, config, scales, corrections)


# What `make test` plans (then compiles a sample of): every model, config, scale kind and
# correction at least once, in about a minute. LLaMA (4096-wide layers, the slowest to plan)
# only at W8A8: its W4A16 conversion added no constexpr value to the sample's cover (280 values
# from 2600 launches either way), and Gemma plans W4A16 decoder layers.
CI_CONVERSIONS = tuple(Conversion(*fields) for fields in (
    ("vit_b16", "W8A8", "dynamic", "qla_qwt128"), ("vit_b16", "W4A4", "static_zero", "qwt_full"),
    ("vit_b16", "W4A8g128", "static", "none"), ("vit_b16", "W4A16g128", "dynamic", "qla_qwt24"),
    ("deit_s", "W4A8", "dynamic", "qwt48"),
    ("swin_t", "W8A8", "static_zero", "qla_qwt128"), ("swin_t", "W4A16g128", "dynamic", "none"),
    ("bert_base", "W8A8", "static_zero", "qla_qwt128"), ("bert_base", "W4A4", "dynamic", "qwt_full"),
    ("bert_base", "W4A4rot", "dynamic", "qla_qwt24"),
    ("llama8b", "W8A8", "dynamic", "qla_qwt128"),
    ("gpt2", "W4A8", "dynamic", "qla_qwt128"), ("clip_b16", "W8A8", "dynamic", "none"),
    ("gemma2b", "W4A16g128", "dynamic", "none"),
    ("resnet50", "W8A8", "static_zero", "qwt_conv"), ("resnet50", "W4A4", "dynamic", "none"),
    (ATTENTION_CALLS, "W4A4", "static_zero", "none"),
))


def _portable(value):
    """A launch argument as it crosses processes: a meta tensor's pickle drops its storage offset,
    which decides its alignment (Triton specializes on it), so tensors travel as their layout."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.storage_offset())
    return value


def _restored(value):
    if isinstance(value, tuple) and value and value[0] == "tensor":
        _, shape, stride, dtype, offset = value
        extent = offset + sum((size - 1) * step for size, step in zip(shape, stride)) + 1
        return torch.empty(extent, dtype=dtype, device="meta").as_strided(shape, stride, offset)
    return value


_KERNELS = {}  # kernel name -> jit function: what planned launches carry between processes


def _kernels() -> Dict[str, object]:
    if not _KERNELS:
        from .ops.triton.attention import quantized_attention_kernel
        from .ops.triton.conv_gemm import depthwise_conv_kernel, implicit_conv_kernel
        from .ops.triton.dwsep import dwsep_down_kernel
        from .ops.triton.fused_linear import fused_linear_kernel, requantize_rows_kernel
        from .ops.triton.quantize import quantize_activation_kernel
        from .ops.triton.rotate import rotate_quantize_kernel

        for kernel in (fused_linear_kernel, requantize_rows_kernel, quantize_activation_kernel, dwsep_down_kernel,
                       quantized_attention_kernel, rotate_quantize_kernel, implicit_conv_kernel,
                       depthwise_conv_kernel):
            _KERNELS[kernel.fn.__name__] = kernel
    return _KERNELS


def _plan_group(group: Tuple[str, str, Tuple[Conversion, ...]]) -> Tuple[List[tuple], List[str]]:
    """The launches of one model and config's conversions (in a worker process), as picklable
    (target index, kernel name, grid, arguments, meta) rows, and the refused conversions."""
    torch.set_num_threads(1)  # the workers share the machine's cores
    name, config, items = group
    launches: List[tuple] = []
    refused: List[str] = []

    def add(target: Target, planned: Sequence[PlannedLaunch]) -> None:
        launches.extend((TARGETS.index(target), planned_launch.kernel.fn.__name__, planned_launch.grid,
                         tuple(_portable(arg) for arg in planned_launch.args), planned_launch.meta)
                        for planned_launch in planned)

    if name == ATTENTION_CALLS:
        for dtype in DTYPES:
            for target in TARGETS:
                add(target, attention_launches(dtype, target))
        return launches, refused
    if name == "op_calls":
        for dtype in DTYPES:
            for target in TARGETS:
                add(target, op_launches(dtype, target))
                if config:
                    add(target, lm_head_launches(config, dtype, target))
        return launches, refused
    spec = {spec.name: spec for spec in MODELS}[name]
    model_fp = build(name)
    for scales in ACTIVATION_SCALES:
        chosen = [item for item in items if item.scales == scales]
        if not chosen:
            continue
        model_q = quantize(spec, model_fp, config, scales)
        for item in chosen:
            try:
                converted = convert(spec, model_q, item.corrections, model_fp)
            except ValueError as error:  # refused for the user too (a correction on a layer left fp)
                refused.append(f"{item}: {error}")
                continue
            on_meta = copy.deepcopy(converted).to("meta")
            del converted
            for dtype in DTYPES:
                cast = copy.deepcopy(on_meta).to(dtype)
                for target in TARGETS:
                    add(target, model_launches(spec, cast, target, dtype))
    return launches, refused


def plan(work: Sequence[Conversion], jobs: Optional[int] = None,
         progress: bool = True) -> Tuple[Dict[Target, List[PlannedLaunch]], List[str]]:
    """Every launch of the conversions' models per target (duplicates included), and the
    conversions that were refused (with the reason a user would get). The op-level calls always
    join, LLaMA's LM head (for LLaMA's configs) when LLaMA does. Models and configs are planned
    in `jobs` forked processes (default: the CPU count)."""
    import multiprocessing

    from tqdm import tqdm

    groups: Dict[Tuple[str, str], List[Conversion]] = {}
    for item in work:
        groups.setdefault((item.model, item.config), []).append(item)
    llama_configs = [config for model, config in groups if model == "llama8b"]
    tasks = [(model, config, tuple(items)) for (model, config), items in groups.items()]
    tasks += [("op_calls", config, ()) for config in (llama_configs or [""])]
    # The slowest first (LLaMA, Gemma: reference checks of 4096-wide layers), so the pool ends together.
    tasks.sort(key=lambda task: -len(task[2]) * (8 if task[0] in ("llama8b", "gemma2b") else 1))
    planned: Dict[Target, List[PlannedLaunch]] = {target: [] for target in TARGETS}
    refused: List[str] = []
    kernels = _kernels()
    jobs = jobs or os.cpu_count() or 1
    with multiprocessing.get_context("fork").Pool(jobs) as pool, \
            tqdm(total=len(tasks), desc="plan", unit="model×config", disable=not progress) as bar:
        for launches, group_refused in pool.imap_unordered(_plan_group, tasks):
            for target_index, kernel, grid, args, meta in launches:
                planned[TARGETS[target_index]].append(
                    PlannedLaunch(kernels[kernel], grid, tuple(_restored(arg) for arg in args), meta))
            refused += group_refused
            bar.update()
    return planned, sorted(refused)


def spread_sample(work: Sequence[tuple], count: int) -> List[tuple]:
    """`count` entries of `work` that cover every kernel, architecture and constexpr value the
    whole table has (greedily, first by how many uncovered values an entry adds), in a fixed order."""
    def features(item):
        target, launch = item
        return {(target.arch, launch.kernel.fn.__name__, name, repr(value)) for name, value in launch.meta.items()}

    chosen, covered = [], set()
    remaining = list(range(len(work)))
    feature_sets = [features(item) for item in work]
    while remaining and len(chosen) < count:
        best = max(remaining, key=lambda i: (len(feature_sets[i] - covered), -i))
        if not feature_sets[best] - covered:
            break
        chosen.append(best)
        covered |= feature_sets[best]
        remaining.remove(best)
    step = max(1, len(remaining) // max(1, count - len(chosen)))
    chosen += remaining[::step][:count - len(chosen)]
    return [work[i] for i in sorted(chosen)]


def key_hash(arch: int, key_json: str) -> str:
    return hashlib.sha256(f"{arch}:{key_json}".encode()).hexdigest()[:20]


def _hashes(work: Sequence[tuple]) -> Dict[str, List[str]]:
    hashes: Dict[str, set] = {}
    for target, launch in work:
        hashes.setdefault(str(target.arch), set()).add(key_hash(target.arch, key_to_json(launch.key)))
    return {arch: sorted(values) for arch, values in sorted(hashes.items())}


def read_table() -> dict:
    if not TABLE_FILE.exists():
        raise ValueError(f"{TABLE_FILE} is missing: run `make aot-check` (the whole table) to write it")
    return json.loads(TABLE_FILE.read_text())


def compare_log(path: str) -> int:
    """Launches in a QLA_LAUNCH_LOG file (a GPU run) that the committed table does not hold."""
    from .ops.triton.kernel_launch import read_launch_log

    table = read_table()
    outside, archs = [], set()
    entries = read_launch_log(path)
    for arch, key in entries:
        archs.add(arch)
        if str(arch) not in table["key_hashes"]:
            outside.append((arch, f"no table for sm_{arch}"))
        elif key_hash(arch, key) not in set(table["key_hashes"][str(arch)]):
            kernel, args, meta = json.loads(key)
            outside.append((arch, json.dumps({"kernel": kernel, "meta": dict(meta), "args": dict(args)})))
    for arch, launch in outside:
        print(f"sm_{arch} launch outside the AOT table: {launch}")
    print(f"{len(entries)} distinct launches logged (sm {sorted(archs)}), {len(outside)} outside the table "
          f"of {TABLE_FILE.name} ({table['date']}, Triton {table['triton']})")
    return 1 if outside else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .ops.device import interpreting
    from .ops.triton.aot import check_launches, for_targets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true",
                        help="plan the CI subset of conversions only, and require every key it plans to be in "
                             "the committed table")
    parser.add_argument("--sample", type=int, help="check this many keys, spread over the table")
    parser.add_argument("--jobs", type=int, help="planning and compile processes (default: the CPU count)")
    parser.add_argument("--json", help="write every checked launch's row here")
    parser.add_argument("--models", default=",".join([spec.name for spec in MODELS] + [ATTENTION_CALLS]),
                        help="comma-separated models of the table")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--write-table", action="store_true",
                        help=f"after a whole-table check that passes, write {TABLE_FILE.name} (keys, classes, counts)")
    parser.add_argument("--add-to-table", action="store_true",
                        help=f"after a check of --models that passes, add their keys and classes to {TABLE_FILE.name} "
                             "(the models a change adds; keys the table already holds are not compiled again)")
    parser.add_argument("--configs", help="comma-separated configs: only these conversions of --models (with "
                                          "--add-to-table, the configs a change adds)")
    parser.add_argument("--compare-log", metavar="FILE", help="report launches of a QLA_LAUNCH_LOG file outside "
                                                              "the committed table (no planning, no compiling)")
    args = parser.parse_args(argv)
    if args.compare_log:
        return compare_log(args.compare_log)
    if interpreting():
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    known = [spec.name for spec in MODELS] + [ATTENTION_CALLS]
    if any(name not in known for name in models):
        raise ValueError(f"unknown models {[n for n in models if n not in known]}; expected some of {known}")
    if args.write_table and (args.ci or args.sample or models != known):
        raise ValueError("--write-table needs the whole table (no --ci, --sample or --models)")
    if args.add_to_table and (args.ci or args.sample or args.write_table or models == known):
        raise ValueError("--add-to-table takes --models (a subset) and no --ci, --sample or --write-table")
    started = time.time()
    configs = None if not args.configs else {name.strip() for name in args.configs.split(",") if name.strip()}
    if configs and args.write_table:
        raise ValueError("--write-table needs the whole table (no --configs)")
    chosen = [item for item in (CI_CONVERSIONS if args.ci else conversions(models))
              if item.model in models and (configs is None or item.config in configs)]
    planned, skipped = plan(chosen, jobs=args.jobs)
    work = for_targets(planned)
    planned_seconds = time.time() - started
    for reason in skipped:
        print(f"not in the table: {reason}", file=sys.stderr)
    stale = []
    if args.ci:
        table = read_table()
        known_hashes = {arch: set(values) for arch, values in table["key_hashes"].items()}
        stale = [(target, launch) for target, launch in work
                 if key_hash(target.arch, key_to_json(launch.key)) not in known_hashes.get(str(target.arch), set())]
        for target, launch in stale[:20]:
            print(f"planned but not in {TABLE_FILE.name}: sm_{target.arch} {launch_class(launch)}", file=sys.stderr)
    total = len(work)
    if args.add_to_table:  # keys the table holds were checked when they were recorded
        held = {arch: set(values) for arch, values in read_table()["key_hashes"].items()}
        work = [(target, launch) for target, launch in work
                if key_hash(target.arch, key_to_json(launch.key)) not in held.get(str(target.arch), set())]
    if args.sample:
        work = spread_sample(work, args.sample)
    print(f"{len(chosen)} conversions, {total} distinct launches (compile keys × architecture) planned in "
          f"{planned_seconds:.0f} s; checking {len(work)}", file=sys.stderr)
    started = time.time()
    rows = check_launches(work, jobs=args.jobs, cache=not args.no_cache)
    compile_seconds = time.time() - started
    failed = [row for row in rows if row["problems"]]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"planned": total, "checked": len(rows), "stale": len(stale), "rows": rows}, handle, indent=1,
                      default=str)
    for row in failed:
        print(json.dumps({key: row[key] for key in ("arch", "kernel", "meta", "problems")}, default=str))
    fresh = sum(not row["cached"] for row in rows)
    print(f"{len(rows)} launches checked for sm_90/sm_80 in {compile_seconds:.0f} s ({fresh} compiled now, "
          f"{len(rows) - fresh} from the results cache); {len(failed)} fail a check", file=sys.stderr)
    if stale:
        print(f"{len(stale)} planned launches are not in {TABLE_FILE} (launch selection changed): run "
              "`make aot-check` to check and record the whole table", file=sys.stderr)
    if args.write_table and not failed:
        import torch as _torch
        import triton

        TABLE_FILE.parent.mkdir(parents=True, exist_ok=True)
        TABLE_FILE.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": _torch.__version__,
            "conversions": len(chosen), "refused_conversions": skipped, "launches": total,
            "plan_seconds": round(planned_seconds), "compile_seconds": round(compile_seconds),
            "compiled_now": sum(not row["cached"] for row in rows),
            "per_kernel": _per_kernel(rows), "key_hashes": _hashes(work),
            "classes": sorted({launch_class(launch) for _, launch in work}),
        }, indent=1) + "\n")
        print(f"wrote {TABLE_FILE}", file=sys.stderr)
    if args.add_to_table and not failed:
        _add_to_table(models, configs, chosen, skipped, work, total, planned_seconds, compile_seconds, rows)
    return 1 if failed or stale else 0


def _add_to_table(models, configs, chosen, skipped, work, total, planned_seconds, compile_seconds, rows) -> None:
    """Merges the checked launches of `models` (their `configs`, or all) into the committed table,
    and records the addition."""
    import triton

    table = read_table()
    for arch, hashes in _hashes(work).items():
        table["key_hashes"][arch] = sorted(set(table["key_hashes"].get(arch, [])) | set(hashes))
    table["classes"] = sorted(set(table["classes"]) | {launch_class(launch) for _, launch in work})
    table.setdefault("additions", []).append({
        "date": datetime.date.today().isoformat(), "triton": triton.__version__, "models": list(models),
        **({"configs": sorted(configs)} if configs else {}), "conversions": len(chosen),
        "refused_conversions": skipped, "launches": total,
        "plan_seconds": round(planned_seconds), "compile_seconds": round(compile_seconds),
        "compiled_now": sum(not row["cached"] for row in rows), "per_kernel": _per_kernel(rows)})
    TABLE_FILE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"added {len(work)} launches of {list(models)} to {TABLE_FILE}", file=sys.stderr)


def _per_kernel(rows: Sequence[dict]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for row in rows:
        name = f"sm_{row['arch']} {row['kernel']}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


if __name__ == "__main__":
    sys.exit(main())
