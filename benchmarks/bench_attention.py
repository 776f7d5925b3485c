"""The quantized attention core (ops.quantized_attention) against the fp attention a user runs.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--runs 9] [--threads 2] [--out ...]

Shapes: DETR-R50 at 800×1066 (8 heads of 32: the encoder's 850 tokens, decoder self-attention
over 100 queries, cross-attention 100 × 850) and ViT-B/16 at batch 64 (12 heads of 64, 197
tokens). Ours, two cores: 4-bit q, k, A, v with static zero points (AQ-DETR's), and the `paper`
preset's (q, k, v per token at run time, A on the 4-bit log2 grid); the quantization of q, k, v
and A included (the op reads fp q, k, v). Baseline: torch's scaled_dot_product_attention in fp32 on
CPU, in fp16 on CUDA (flash attention where it applies). On CUDA, triton.testing.do_bench
(median); on CPU the median of --runs, the two interleaved. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops.attention import AttentionQuantization, TokenwiseLog2Quantization

SHAPES = {"detr_r50 encoder": (1, 8, 850, 850, 32), "detr_r50 decoder self": (1, 8, 100, 100, 32),
          "detr_r50 cross": (1, 8, 100, 850, 32), "vit_b16 b64": (64, 12, 197, 197, 64)}


def _cpu_median(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    backend = "cpu" if args.device == "cpu" else "triton"
    if not qk.backends()[backend].available:
        raise SystemExit(f"the {backend} backend is not available: {qk.backends()[backend]}")
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    cores = {"static 4-bit (AQ-DETR)": AttentionQuantization(4, torch.tensor([0.4, 0.4, 0.4, 1 / 15], device=device),
                                                             torch.tensor([0.0, 0.0, 0.0, -8.0], device=device)),
             "per-token / log2 4-bit (paper preset)": TokenwiseLog2Quantization(4)}
    rows = []
    for name, (batch, heads, q_tokens, k_tokens, head_dim) in SHAPES.items():
        generator = torch.Generator(device=device).manual_seed(0)
        query = torch.randn(batch, heads, q_tokens, head_dim, device=device, dtype=dtype, generator=generator)
        key, value = (torch.randn(batch, heads, k_tokens, head_dim, device=device, dtype=dtype, generator=generator)
                      for _ in range(2))
        scaling = head_dim ** -0.5

        def baseline():
            return F.scaled_dot_product_attention(query, key, value, scale=scaling)

        for core, quantization in cores.items():
            def ours():
                with qk.use_backend(backend):
                    return ops.quantized_attention(query, key, value, quantization, scaling)

            with torch.no_grad():
                if args.device == "cuda":
                    import triton.testing

                    ours_ms, baseline_ms = triton.testing.do_bench(ours), triton.testing.do_bench(baseline)
                else:
                    ours_ms, baseline_ms = _cpu_median(ours, args.runs), _cpu_median(baseline, args.runs)
            rows.append({"shape": name, "core": core, "dims": [batch, heads, q_tokens, k_tokens, head_dim],
                         "ours_ms": ours_ms, "baseline_ms": baseline_ms, "speedup": baseline_ms / ours_ms})
            print(f"{name}, {core}: ours {ours_ms:.3f} ms, SDPA {baseline_ms:.3f} ms ({baseline_ms / ours_ms:.2f}x)")
    if args.device == "cuda":
        label = torch.cuda.get_device_name()
        report = {"gpu": label, "torch": torch.__version__, "baseline": "SDPA fp16", "rows": rows}
    else:
        from qla_kernels.ops import cpu

        label = cpu.cpu_name()
        report = {"cpu": label, "threads": args.threads, "torch": torch.__version__, "baseline": "SDPA fp32",
                  "rows": rows}
    name = label.replace(" ", "_").replace("(R)", "")
    out = Path(args.out or Path(__file__).parent / "results" / f"attention_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
