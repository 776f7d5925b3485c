"""End-to-end latency of whole quantized models vs fp16 eager and torch.compile (qla_kernels/apps/benchmark.py
documents the models, variants and columns).

    python benchmarks/bench_e2e.py [--quick] [--llama-layers 2] [--models vit_b16 --batches 64
        --variants fp16_eager,w8a8 --decode-batches 1 --no-bert --no-breakdown] [--out benchmarks/results]

Writes benchmarks/results/e2e_<device>_<date>.json and .png and prints the markdown table the README
shows. On a machine without CUDA it runs tiny models on the reference backend, labelled as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qla_kernels.apps import benchmark


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama-layers", type=int, default=2)
    parser.add_argument("--models", help="comma-separated vision models (default: all, or --quick's)")
    parser.add_argument("--batches", help="comma-separated vision batch sizes")
    parser.add_argument("--variants", help="comma-separated variants")
    parser.add_argument("--decode-batches", help="comma-separated decode batch sizes (default 1,16)")
    parser.add_argument("--no-bert", action="store_true", help="leave BERT-base out")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-kernel profile of ViT-B/16")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    def listed(text, kind=str):
        return None if not text else tuple(kind(item) for item in text.split(",") if item)
    report = benchmark.run(quick=args.quick, llama_layers=args.llama_layers, models=listed(args.models),
                           batches=listed(args.batches, int), variants=listed(args.variants),
                           decode_batches=listed(args.decode_batches, int), bert=False if args.no_bert else None,
                           breakdown=not args.no_breakdown)
    print(benchmark.table(report), flush=True)
    print(f"wrote {benchmark.write(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
