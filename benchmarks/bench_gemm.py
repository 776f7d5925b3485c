"""Fused int8-activation GEMM vs cuBLAS fp16 and torch._int_mm, at the shapes that matter.

    python benchmarks/bench_gemm.py [--quick] [--out benchmarks/results]

Per shape (M, N = out features, K = in features) and per weight config it times, in one process:
- `cublas_fp16`: torch.matmul(x, Wᵀ) in fp16 (cuBLAS), the baseline every ratio uses;
- `fp16_eager_lora`: fp16 linear + bias + LoRA (x·A)·Bᵀ (r=32) + residual as separate PyTorch ops;
- `int_mm_eager_full`: eager per-token int8 quantization, torch._int_mm, eager dequant + bias +
  LoRA + residual (what "int8 with corrections" costs without fusion);
- ours `bare`: our pre-kernel (x → int8 per token) + fused GEMM with only the dequant epilogue;
- ours `+bias`, `+lowrank`, `+residual`, `full`: the same with each epilogue piece, T = x·A from
  the same pre-kernel read of x (its cost included), and all of them together.
Times are triton.testing.do_bench medians (ms). Ceilings are measured in the same run (a large
device copy for bandwidth; 8192³ fp16 matmul and torch._int_mm for compute) and give each shape's
roofline: max(flops / int8 ceiling, minimal bytes / bandwidth); `roofline_fraction` = roofline /
ours. Results: benchmarks/results/gemm_<gpu>_<date>.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.quant import quantize_weight

RANK = 32
SHAPES = [
    # (model, layer, M, N, K)
    ("ViT-B/16 b64", "qkv", 64 * 197, 2304, 768),
    ("ViT-B/16 b64", "proj", 64 * 197, 768, 768),
    ("ViT-B/16 b64", "fc1", 64 * 197, 3072, 768),
    ("ViT-B/16 b64", "fc2", 64 * 197, 768, 3072),
    ("DeiT-S b64", "qkv", 64 * 197, 1152, 384),
    ("DeiT-S b64", "proj", 64 * 197, 384, 384),
    ("DeiT-S b64", "fc1", 64 * 197, 1536, 384),
    ("DeiT-S b64", "fc2", 64 * 197, 384, 1536),
    ("BERT-base s128 b32", "qkv", 32 * 128, 2304, 768),
    ("BERT-base s128 b32", "ffn_in", 32 * 128, 3072, 768),
    ("BERT-base s128 b32", "ffn_out", 32 * 128, 768, 3072),
    ("LLaMA-8B prefill", "q_proj", 2048, 4096, 4096),
    ("LLaMA-8B prefill", "gate", 2048, 14336, 4096),
    ("LLaMA-8B prefill", "down", 2048, 4096, 14336),
    ("square", "8192^3", 8192, 8192, 8192),
    ("LLaMA-8B decode", "q_proj M=1", 1, 4096, 4096),
    ("LLaMA-8B decode", "q_proj M=16", 16, 4096, 4096),
    ("LLaMA-8B decode", "q_proj M=64", 64, 4096, 4096),
    ("LLaMA-8B decode", "down M=16", 16, 4096, 14336),
    ("LLaMA-8B decode", "down M=64", 64, 4096, 14336),
]
QUICK = {("ViT-B/16 b64", "fc1"), ("ViT-B/16 b64", "fc2"), ("ViT-B/16 b64", "qkv"), ("square", "8192^3"),
         ("LLaMA-8B decode", "q_proj M=1"), ("LLaMA-8B decode", "q_proj M=16")}
CONFIGS = {"W8A8": qk.W8A8(), "W4A8": qk.W4A8(), "W4A8-g128": qk.W4A8(group_size=128), "W4A4": qk.W4A4()}
SMALL_M_CONFIGS = ("W4A8", "W4A8-g128", "W8A8")
L2_FLUSH_BYTES = 256 << 20


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copies_to_defeat_l2(bytes_per_copy: int) -> int:
    return max(1, min(16, math.ceil(L2_FLUSH_BYTES / max(bytes_per_copy, 1))))


class Rotating:
    """Cycles through independent copies of a layer's inputs so repeated calls do not hit L2."""

    def __init__(self, make, copies: int):
        self.items = [make(i) for i in range(copies)]
        self.index = 0

    def next(self):
        item = self.items[self.index]
        self.index = (self.index + 1) % len(self.items)
        return item


def clone_weight(weight):
    return dataclasses.replace(weight, **{f.name: getattr(weight, f.name).clone() for f in dataclasses.fields(weight)
                                          if isinstance(getattr(weight, f.name), torch.Tensor)})


def measure_ceilings(device) -> dict:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    fp16_ms = bench(lambda: a @ b)
    ai = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8)
    bi = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8).t()
    int8_ms = bench(lambda: torch._int_mm(ai, bi))
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    return {
        "fp16_tflops": 2 * n**3 / fp16_ms / 1e9,
        "int8_tops": 2 * n**3 / int8_ms / 1e9,
        "copy_gbps": 2 * src.numel() / copy_ms / 1e6,
    }


def eager_per_token_int8(x):
    scale = x.float().abs().amax(dim=1).clamp_min(1e-8) / 127
    return torch.round(x.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def bench_shape(model, layer, m, n, k, configs, ceilings, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    weight_fp = torch.randn(n, k, device=device, generator=gen) * 0.02
    bias = torch.randn(n, device=device, generator=gen).half()
    lora_a = (torch.randn(k, RANK, device=device, generator=gen) * 0.02).half()
    lora_b = (torch.randn(n, RANK, device=device, generator=gen) * 0.02).half()
    copies = copies_to_defeat_l2(m * k * 2 + n * k * 2)
    inputs = Rotating(lambda i: (torch.randn(m, k, device=device, dtype=torch.float16),
                                 torch.randn(m, n, device=device, dtype=torch.float16)), copies)
    weights16 = Rotating(lambda i: weight_fp.half().clone(), copies)
    row = {"model": model, "layer": layer, "M": m, "N": n, "K": k, "rank": RANK, "l2_copies": copies}

    def fp16():
        x, _ = inputs.next()
        return x @ weights16.next().t()

    def fp16_lora():
        x, residual = inputs.next()
        return torch.addmm(bias, x, weights16.next().t()) + (x @ lora_a) @ lora_b.t() + residual

    row["cublas_fp16_ms"] = bench(fp16)
    row["fp16_eager_lora_ms"] = bench(fp16_lora)
    if m > 16:  # torch._int_mm needs M > 16
        w8 = quantize_weight(weight_fp, qk.W8A8())
        w8t, sw = w8.data.t(), w8.scale

        def int_mm_full():
            x, residual = inputs.next()
            q, sx = eager_per_token_int8(x)
            acc = torch._int_mm(q, w8t)
            return (acc.float() * sx[:, None] * sw[None, :] + bias).half() + (x @ lora_a) @ lora_b.t() + residual

        row["int_mm_eager_full_ms"] = bench(int_mm_full)
    flops = 2 * m * n * k
    for name in configs:
        qweight = quantize_weight(weight_fp, CONFIGS[name])
        bits = CONFIGS[name].act_bits
        weights = Rotating(lambda i: clone_weight(qweight), copies)

        def ours(bias_on=False, lowrank=False, residual_on=False):
            x, residual = inputs.next()
            q, sx, t = ops.quantize_activation(x, bits, down_proj=lora_a if lowrank else None)
            return ops.fused_linear(q, sx, weights.next(), bias=bias if bias_on else None,
                                    lowrank_t=t if lowrank else None, lowrank_u=lora_b if lowrank else None,
                                    residual=residual if residual_on else None, out_dtype=torch.float16)

        variants = {"bare": {}, "+bias": dict(bias_on=True), "+lowrank": dict(lowrank=True),
                    "+residual": dict(residual_on=True), "full": dict(bias_on=True, lowrank=True, residual_on=True)}
        with qk.use_backend("triton"):
            for variant, kwargs in variants.items():
                row[f"{name}_{variant}_ms"] = bench(lambda: ours(**kwargs))
            inputs.index = 0
            x, residual = inputs.items[0]
            out = ours(bias_on=True, lowrank=True, residual_on=True)
        expected = torch.addmm(bias, x, weight_fp.half().t()) + (x @ lora_a) @ lora_b.t() + residual
        row[f"{name}_rel_error_vs_fp16"] = float((out.float() - expected.float()).norm() / expected.float().norm())
        full_ms = row[f"{name}_full_ms"]
        weight_bytes = sum(v.numel() * v.element_size() for v in (qweight.data, qweight.scale, qweight.group_scale)
                           if v is not None)
        min_bytes = m * k * 2 + weight_bytes + 2 * m * n * 2  # x in, weights, residual in, y out (fp16)
        compute_ms = flops / (ceilings["int8_tops"] * 1e9)
        memory_ms = min_bytes / (ceilings["copy_gbps"] * 1e6)
        roofline_ms = max(compute_ms, memory_ms)
        row[f"{name}_roofline_ms"] = roofline_ms
        row[f"{name}_bound"] = "compute" if compute_ms >= memory_ms else "memory"
        row[f"{name}_roofline_fraction"] = roofline_ms / full_ms
        row[f"{name}_full_speedup_vs_fp16"] = row["cublas_fp16_ms"] / full_ms
        row[f"{name}_full_speedup_vs_fp16_eager_lora"] = row["fp16_eager_lora_ms"] / full_ms
        row[f"{name}_full_tops"] = flops / full_ms / 1e9
        row[f"{name}_epilogue_overhead"] = full_ms / row[f"{name}_bare_ms"] - 1
    return row


def plot(rows, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['layer']}" for r in rows]
    names = [n for n in CONFIGS if any(f"{n}_full_ms" in r for r in rows)]
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.9), 5))
    width = 0.8 / (len(names) + 1)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))],
               [r.get(f"{name}_full_speedup_vs_fp16", 0) for r in rows], width, label=f"{name} full epilogue + pre-kernel")
    ax.bar([j + len(names) * width for j in range(len(rows))],
           [r["cublas_fp16_ms"] / r["int_mm_eager_full_ms"] if "int_mm_eager_full_ms" in r else 0 for r in rows],
           width, label="torch._int_mm + eager epilogue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("speedup vs cuBLAS fp16 (higher is better)")
    ax.set_title(f"qla fused GEMM + pre-kernel (LoRA r={RANK}, bias, residual) vs cuBLAS fp16 on {device_name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="six shapes only (ViT-B/16 qkv, fc1, fc2; LLaMA decode M = 1, 16; 8192³)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    ceilings = measure_ceilings(device)
    print(f"{name}: measured ceilings {json.dumps({k: round(v, 1) for k, v in ceilings.items()})}", flush=True)
    rows = []
    for model, layer, m, n, k in SHAPES:
        if args.quick and (model, layer) not in QUICK:
            continue
        configs = SMALL_M_CONFIGS if m <= 64 else tuple(CONFIGS)
        row = bench_shape(model, layer, m, n, k, configs, ceilings, device)
        rows.append(row)
        summary = "  ".join(f"{c} {row[f'{c}_full_ms']:.4f}ms x{row[f'{c}_full_speedup_vs_fp16']:.2f} "
                            f"(epi +{100 * row[f'{c}_epilogue_overhead']:.1f}%, roof {100 * row[f'{c}_roofline_fraction']:.0f}%)"
                            for c in configs)
        print(f"{model:>18} {layer:>12} M={m:<6} N={n:<6} K={k:<6} fp16 {row['cublas_fp16_ms']:.4f}ms  {summary}", flush=True)
    stamp = datetime.date.today().isoformat()
    slug = name.replace(" ", "_").replace("/", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name, "date": stamp, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "qla_kernels": qk.__version__,
        "ceilings": ceilings, "rows": rows,
    }
    json_path = out / f"gemm_{slug}_{stamp}{'_quick' if args.quick else ''}.json"
    json_path.write_text(json.dumps(report, indent=1))
    plot(rows, out / json_path.with_suffix(".png").name, name)
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
