"""End-to-end latency of whole quantized models vs fp16 eager and torch.compile (qla_kernels/benchmark.py
documents the models, variants and columns).

    python benchmarks/bench_e2e.py [--quick] [--llama-layers 2] [--out benchmarks/results]

Writes benchmarks/results/e2e_<device>_<date>.json and .png and prints the markdown table the README
shows. On a machine without CUDA it runs tiny models on the reference backend, labelled as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qla_kernels import benchmark


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama-layers", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    report = benchmark.run(quick=args.quick, llama_layers=args.llama_layers)
    print(benchmark.table(report), flush=True)
    print(f"wrote {benchmark.write(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
