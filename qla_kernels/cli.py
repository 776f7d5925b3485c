"""The `qla` console entry point.

    qla demo        quantize the real MiniLM model (W8A8, W4A16) and compare it with fp
    qla quantize    quantize a timm model or local HF model (PTQ, QwT or GPLQ) into one .safetensors file
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
from typing import List, Optional

import torch
from torch import nn
from tqdm import tqdm

from . import QuantLinear, W4A16, W8A8, backends, load_quantized, quantize_, save_quantized
from .apps import workflow
from .nn import is_linear
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


def run_demo(configs=(W8A8(), W4A16(group_size=128)), out=None) -> List[dict]:
    """Quantizes MiniLM per config and reports embedding cosine vs fp, weight bytes and time."""
    out = out or sys.stdout
    torch.manual_seed(0)
    steps = tqdm(total=1 + 2 * len(configs), desc="qla demo", unit="step", file=sys.stderr)
    model, tokenizer = load_minilm()
    start = time.perf_counter()
    reference = embed(model, tokenizer, SENTENCES)
    fp_seconds = time.perf_counter() - start
    fp_bytes = linear_weight_bytes(model)
    steps.update()
    rows = [{"config": "fp32", "cos_mean": 1.0, "cos_min": 1.0, "weight_bytes": fp_bytes,
             "quantize_s": 0.0, "embed_s": fp_seconds}]
    for config in configs:
        steps.set_postfix_str(f"quantize {config}")
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        quantize_(quantized, config)
        quantize_seconds = time.perf_counter() - start
        steps.update()
        steps.set_postfix_str(f"embed {config}")
        start = time.perf_counter()
        embeddings = embed(quantized, tokenizer, SENTENCES)
        embed_seconds = time.perf_counter() - start
        steps.update()
        cosine = (embeddings * reference).sum(dim=-1)
        rows.append({"config": str(config), "cos_mean": cosine.mean().item(), "cos_min": cosine.min().item(),
                     "weight_bytes": linear_weight_bytes(quantized), "quantize_s": quantize_seconds,
                     "embed_s": embed_seconds})
    steps.close()
    print(f"\nall-MiniLM-L6-v2 (real weights), {len(SENTENCES)} sentences, CPU reference backend "
          f"(integer-exact PyTorch: a correctness run, not a speed measurement)", file=out)
    print(f"{'config':<24} {'cos mean':>9} {'cos min':>9} {'linear weight MB':>17} {'vs fp32':>8} "
          f"{'quantize s':>11} {'embed s':>8}", file=out)
    for row in rows:
        print(f"{row['config']:<24} {row['cos_mean']:>9.5f} {row['cos_min']:>9.5f} "
              f"{row['weight_bytes'] / 1e6:>17.2f} {row['weight_bytes'] / fp_bytes:>8.3f} "
              f"{row['quantize_s']:>11.2f} {row['embed_s']:>8.2f}", file=out)
    return rows


def _add_model_arguments(parser):
    parser.add_argument("--model", required=True, help="timm model name, or a local Hugging Face model directory")
    parser.add_argument("--checkpoint", help="local weights file for a timm model (default: random init)")
    parser.add_argument("--batch-size", type=int, default=32)


def run_quantize(args, out=None) -> dict:
    out = out or sys.stdout
    loaded = workflow.load_model(args.model, args.checkpoint)
    config = workflow.make_config(args.config, args.group_size)
    batches = workflow.load_batches(args.calib, loaded, args.calib_batches, args.batch_size)
    quantized, report = workflow.quantize_model(loaded.model, config, args.method, batches,
                                                static_activations=args.activations == "static")
    save_quantized(quantized, args.out)
    report["out"] = args.out
    print(json.dumps(report), file=out)
    return report


def run_eval(args, out=None) -> dict:
    out = out or sys.stdout
    loaded = workflow.load_model(args.model, args.checkpoint)
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
    quantize.add_argument("--method", default="qwt", choices=workflow.METHODS,
                          help="ptq: round-to-nearest (+ --activations static); qwt: PTQ + QwT; gplq: activation-first "
                               "QAT (one epoch over the calibration batches) + clipped weights + QwT")
    quantize.add_argument("--activations", default="dynamic", choices=("dynamic", "static"),
                          help="per-token dynamic scales, or static per-tensor scales calibrated by percentile search")
    quantize.add_argument("--calib", required=True, help="image folder or text file for calibration")
    quantize.add_argument("--calib-batches", type=int, default=16)
    quantize.add_argument("--out", required=True, help="output .safetensors file")
    evaluate = commands.add_parser("eval", help="compare a quantized file with its fp model")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--quantized", required=True, help="a file written by qla quantize")
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
