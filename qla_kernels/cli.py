"""The `qla` console entry point.

    qla demo        quantize the real MiniLM model (W8A8, W4A16) and compare it with fp
    qla quantize    quantize a timm model or local HF model (rotation, PTQ / GPTQ / GPLQ, QwT, QLA) into one
                    .safetensors file, or an HF model into a save_pretrained directory
    qla eval        compare a quantized file with its fp model on an image folder or text file
    qla bench       end-to-end latency vs fp16 on this device (CPU: tiny models, labelled)
    qla backends    which backends can run here, and why not

Models and data come from local paths only (no hub access).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn
from tqdm import tqdm

from . import (QuantLinear, W4A16, W8A8, backends, convert_for_runtime, load_pretrained, load_quantized, quantize_,
               save_quantized, use_backend)
from .apps import workflow
from .nn import is_linear
from .ops import cpu as cpu_kernels
from .apps.sentence_embedding import SENTENCES, embed, load_minilm


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weight storage (fp weights, or quantized codes + scales + zeros)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += sum(b.numel() * b.element_size() for name, b in module.named_buffers()
                         if name.startswith("weight") and b is not None)
        elif is_linear(module):
            total += module.weight.numel() * module.weight.element_size()
    return total


def _forward_ms(model: nn.Module, batch: dict, backend: str = "auto", runs: int = 5) -> float:
    """Median ms of one forward of `batch` under `backend` (after a warm-up call)."""
    times = []
    with torch.no_grad(), use_backend(backend):
        model(**batch)
        for _ in range(runs):
            start = time.perf_counter()
            model(**batch)
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _speed_label() -> str:
    """Where the quantized GEMMs run on CPU tensors: the CPU kernels' path, or why the reference."""
    info = backends()["cpu"]
    return f"cpu backend, {cpu_kernels.describe()}" if info.available else f"reference backend ({info.reason})"


def run_demo(configs=(W8A8(), W4A16(group_size=128)), out=None) -> List[dict]:
    """Quantizes MiniLM per config and reports embedding cosine vs fp, weight bytes, and the speed
    of one padded batch of every sentence against fp32 in the same run (on the `cpu` backend where
    it is built, and W8A8 also on the reference, the CPU path before it)."""
    out = out or sys.stdout
    torch.manual_seed(0)
    steps = tqdm(total=1 + 2 * len(configs), desc="qla demo", unit="step", file=sys.stderr)
    model, tokenizer = load_minilm()
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    reference = embed(model, tokenizer, SENTENCES)
    fp_bytes = linear_weight_bytes(model)
    fp_ms = _forward_ms(model, batch)
    steps.update()
    rows = [{"config": "fp32", "cos_mean": 1.0, "cos_min": 1.0, "weight_bytes": fp_bytes, "quantize_s": 0.0,
             "forward_ms": fp_ms, "speedup": 1.0}]
    for config in configs:
        steps.set_postfix_str(f"quantize {config}")
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        quantize_(quantized, config)
        convert_for_runtime(quantized)
        quantize_seconds = time.perf_counter() - start
        steps.update()
        steps.set_postfix_str(f"embed {config}")
        embeddings = embed(quantized, tokenizer, SENTENCES)
        forward_ms = _forward_ms(quantized, batch)
        steps.update()
        cosine = (embeddings * reference).sum(dim=-1)
        row = {"config": str(config), "cos_mean": cosine.mean().item(), "cos_min": cosine.min().item(),
               "weight_bytes": linear_weight_bytes(quantized), "quantize_s": quantize_seconds,
               "forward_ms": forward_ms, "speedup": fp_ms / forward_ms}
        if config.act_bits == 8 and config.weight_bits == 8:
            row["reference_forward_ms"] = _forward_ms(quantized, batch, backend="reference", runs=1)
        rows.append(row)
    steps.close()
    shape = tuple(batch["input_ids"].shape)
    print(f"\nall-MiniLM-L6-v2 (real weights): cosine vs fp32 on {len(SENTENCES)} sentences; speed: one padded "
          f"batch {shape}, median of 5, {torch.get_num_threads()} threads, {cpu_kernels.cpu_name()}, "
          f"{_speed_label()}", file=out)
    print(f"{'config':<24} {'cos mean':>9} {'cos min':>9} {'linear weight MB':>17} {'vs fp32':>8} "
          f"{'quantize s':>11} {'forward ms':>11} {'speed-up':>9}", file=out)
    for row in rows:
        print(f"{row['config']:<24} {row['cos_mean']:>9.5f} {row['cos_min']:>9.5f} "
              f"{row['weight_bytes'] / 1e6:>17.2f} {row['weight_bytes'] / fp_bytes:>8.3f} "
              f"{row['quantize_s']:>11.2f} {row['forward_ms']:>11.1f} {row['speedup']:>8.2f}x", file=out)
        if "reference_forward_ms" in row:
            print(f"{'  (same, reference backend)':<24} {'':>9} {'':>9} {'':>17} {'':>8} {'':>11} "
                  f"{row['reference_forward_ms']:>11.1f} {fp_ms / row['reference_forward_ms']:>8.2f}x", file=out)
    print(f"W4A16 at {shape[0] * shape[1]} rows runs on the reference (dequantize, then torch's sgemm): the CPU "
          f"kernel for W4A16 is the decode one, up to {cpu_kernels.DECODE_MAX_ROWS} rows.", file=out)
    return rows


def _add_model_arguments(parser):
    parser.add_argument("--model", required=True, help="timm model name, or a local Hugging Face model directory")
    parser.add_argument("--checkpoint", help="local weights file for a timm model (default: random init)")
    parser.add_argument("--batch-size", type=int, default=32)


def run_quantize(args, out=None) -> dict:
    out = out or sys.stdout
    loaded = workflow.load_model(args.model, args.checkpoint)
    config = workflow.make_config(args.config, args.group_size, args.rotate)
    batches = workflow.load_batches(args.calib, loaded, args.calib_batches, args.batch_size)
    quantized, report = workflow.quantize_model(loaded.model, config, args.method, batches,
                                                static_activations=args.activations == "static",
                                                qla_options=workflow.QLAOptions(args.qla_rank, args.qla_epochs,
                                                                                args.qla_lr))
    if args.out.endswith(".safetensors"):
        save_quantized(quantized, args.out)
    elif not hasattr(quantized, "save_pretrained"):
        raise ValueError(f"--out {args.out!r}: a directory is written with Hugging Face's save_pretrained, which "
                         f"this {type(quantized).__name__} does not have; give a .safetensors file instead")
    else:
        quantized.save_pretrained(args.out)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(args.out)
    report["out"] = args.out
    print(json.dumps(report), file=out)
    return report


def run_eval(args, out=None) -> dict:
    out = out or sys.stdout
    loaded = workflow.load_model(args.model, args.checkpoint)
    if Path(args.quantized).is_dir():
        quantized = load_pretrained(args.quantized, local_files_only=True)
    else:
        quantized = load_quantized(copy.deepcopy(loaded.model), args.quantized)
    batches = workflow.load_batches(args.data, loaded, args.batches, args.batch_size)
    metrics = workflow.evaluate(loaded.model, quantized, batches)
    print(json.dumps(metrics), file=out)
    return metrics


def run_bench(args, out=None) -> dict:
    from .apps import benchmark

    out = out or sys.stdout
    report = benchmark.run(quick=args.quick, llama_layers=args.llama_layers)
    print(benchmark.table(report), file=out)
    if args.out:
        path = benchmark.write(report, args.out)
        print(f"wrote {path} and {path.with_suffix('.png')}", file=out)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="qla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="quantize the real MiniLM model and compare with fp")
    commands.add_parser("backends", help="list the backends and whether they can run here")
    quantize = commands.add_parser("quantize", help="quantize a model and save it")
    _add_model_arguments(quantize)
    quantize.add_argument("--config", required=True, choices=workflow.CONFIG_NAMES)
    quantize.add_argument("--group-size", type=int, help="W4A8 / W4A16 group size (W4A16 default 128)")
    quantize.add_argument("--rotate", choices=("hadamard",),
                          help="rotate every quantized activation by a randomized Hadamard matrix (weights folded)")
    quantize.add_argument("--method", default="qwt", choices=workflow.METHODS,
                          help="stages, run in this order after --rotate: the weights (ptq: round to nearest; gptq: "
                               "GPTQ; gplq: activation-first QAT, one epoch over the calibration batches, then "
                               "clipped weights and QwT), then +qwt (QwT; 'qwt' alone is ptq+qwt), then +qla (QLA "
                               "adapters trained against the fp model). A fifth of the calibration batches judges "
                               "every stage: a QwT or QLA stage that makes its error worse is dropped")
    quantize.add_argument("--activations", default="dynamic", choices=("dynamic", "static"),
                          help="per-token dynamic scales, or static per-tensor scales (calibrated by percentile "
                               "search; with gplq, LSQ+ quantizers trained in its QAT)")
    quantize.add_argument("--qla-rank", type=int, default=workflow.QLAOptions.rank, help="QLA adapter rank")
    quantize.add_argument("--qla-epochs", type=int, default=workflow.QLAOptions.epochs,
                          help="QLA training epochs over the calibration batches")
    quantize.add_argument("--qla-lr", type=float, default=workflow.QLAOptions.lr, help="QLA AdamW learning rate")
    quantize.add_argument("--calib", required=True, help="image folder or text file for calibration")
    quantize.add_argument("--calib-batches", type=int, default=16)
    quantize.add_argument("--out", required=True,
                          help="output .safetensors file (qk.load_quantized), or a directory for a Hugging Face model "
                               "(save_pretrained: AutoModel.from_pretrained loads it quantized, given import qla_kernels)")
    evaluate = commands.add_parser("eval", help="compare a quantized file with its fp model")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--quantized", required=True, help="a file or directory written by qla quantize")
    evaluate.add_argument("--data", required=True, help="image folder or text file")
    evaluate.add_argument("--batches", type=int, default=16)
    bench = commands.add_parser("bench", help="end-to-end latency of quantized models vs fp16 on this device")
    bench.add_argument("--quick", action="store_true", help="ViT-B/16 and DeiT-T at batch 1 and 64, no BERT")
    bench.add_argument("--llama-layers", type=int, default=2, help="8B-shaped decoder layers to decode with")
    bench.add_argument("--out", help="directory for the JSON report and plot (default: print only)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo()
    elif args.command == "backends":
        for info in backends().values():
            print(info)
    elif args.command == "quantize":
        run_quantize(args)
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "bench":
        run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
