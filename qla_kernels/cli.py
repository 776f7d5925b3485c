"""The `qla` console entry point.

    qla demo        quantize the real MiniLM model (W8A8, W4A16) and compare it with fp
    qla backends    which backends can run here, and why not
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import List, Optional

import torch
from torch import nn
from tqdm import tqdm

from . import QuantLinear, W4A16, W8A8, backends, quantize_
from .nn import is_linear
from .sentence_embedding import SENTENCES, embed, load_minilm


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


def run_demo(configs=(W8A8(), W4A16(group_size=128)), out=sys.stdout) -> List[dict]:
    """Quantizes MiniLM per config and reports embedding cosine vs fp, weight bytes and time."""
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="qla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="quantize the real MiniLM model and compare with fp")
    commands.add_parser("backends", help="list the backends and whether they can run here")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo()
    elif args.command == "backends":
        for info in backends().values():
            print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
