"""W4A16 group-wise GEMM vs cuBLAS and tinygemm at LLaMA-8B shapes, decode to prefill.

    python benchmarks/bench_w4a16.py [--quick] [--out benchmarks/results]

Per shape (N = out, K = in features, group 128) and M it times, in one process, rotating through
enough weight copies that no weight stays in the 50 MB L2:
- `cublas_bf16` and `cublas_fp16`: torch.matmul with the fp weight;
- `tinygemm`: torch._weight_int4pack_mm (when this torch build provides it; else the reason);
- ours `bare`: the W4A16 fused GEMM alone as the default dispatch runs it: the CUDA decode kernel
  (csrc/w4a16_decode.cu) for M <= 16 when `_C` is built, the Triton kernel (dequant in the K loop)
  otherwise; `triton` is the Triton kernel at every M, for comparison;
- ours `lora`: the decode pre-kernel (RMSNorm -> activation + T = x·A, r=16) + the GEMM with the
  LoRA up-projection in its epilogue, i.e. what a LoRA-corrected layer costs end to end.
Reports ms (do_bench median), achieved GB/s of the int4 weights + scales, the fraction of the
measured copy bandwidth, and speedups. JSON + PNG in benchmarks/results/.
"""

from __future__ import annotations

import argparse
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

SHAPES = [("q_proj", 4096, 4096), ("qkv", 6144, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]
MS = (1, 2, 4, 8, 16, 32, 64, 128, 2048)
QUICK_MS = (1, 16, 64)
GROUP = 128
RANK = 16
L2_FLUSH_BYTES = 256 << 20


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbps(device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6


def tinygemm_weights(weight: torch.Tensor):
    """(packed int4 weight, scales_and_zeros) for torch._weight_int4pack_mm, or (None, reason)."""
    try:
        n, k = weight.shape
        w = weight.float().reshape(n, k // GROUP, GROUP)
        low, high = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
        scale = ((high - low).clamp_min(1e-6) / 15)
        codes = torch.round((w - low) / scale).clamp(0, 15).reshape(n, k).to(torch.int32)
        packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        zeros = low + 8 * scale  # tinygemm dequantizes (q - 8) * scale + zero
        scales_and_zeros = torch.stack([scale.reshape(n, -1).t(), zeros.reshape(n, -1).t()], dim=2)
        return packed, scales_and_zeros.to(torch.bfloat16).contiguous()
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def bench_shape(layer, n, k, ms, bandwidth, device) -> list:
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(n, k, device=device, generator=gen) * 0.02
    qweight = quantize_weight(weight, qk.W4A16(group_size=GROUP))
    weight_bytes = sum(t.numel() * t.element_size() for t in (qweight.data, qweight.scale, qweight.zero))
    copies = max(1, min(16, math.ceil(L2_FLUSH_BYTES / weight_bytes)))
    quantized = [qweight.to(device)] + [qweight.to(device) for _ in range(copies - 1)]
    bf16 = [weight.bfloat16().clone() for _ in range(max(1, min(8, math.ceil(L2_FLUSH_BYTES / (n * k * 2)))))]
    fp16 = [w.half() for w in bf16]
    tiny, tiny_reason = tinygemm_weights(weight)
    lora_a = (torch.randn(k, RANK, device=device, generator=gen) * 0.02).half()
    lora_b = (torch.randn(n, RANK, device=device, generator=gen) * 0.02).half()
    norm_weight = torch.ones(k, device=device, dtype=torch.float16)
    decode_kernel = qk.backends()["cuda"].available
    rows = []
    for m in ms:
        x16 = torch.randn(m, k, device=device, dtype=torch.float16)
        xbf = x16.bfloat16()
        state = {"i": 0}

        def pick(items):
            state["i"] = (state["i"] + 1) % len(items)
            return items[state["i"]]

        row = {"layer": layer, "M": m, "N": n, "K": k, "group": GROUP, "rank": RANK, "weight_copies": copies,
               "weight_bytes": weight_bytes}
        row["cublas_bf16_ms"] = bench(lambda: xbf @ pick(bf16).t())
        row["cublas_fp16_ms"] = bench(lambda: x16 @ pick(fp16).t())
        if tiny is not None:
            row["tinygemm_ms"] = bench(lambda: torch.ops.aten._weight_int4pack_mm(xbf, tiny[0], GROUP, tiny[1]))
        else:
            row["tinygemm_unavailable"] = tiny_reason
        with qk.use_backend("triton"):
            row["triton_bare_ms"] = bench(lambda: ops.fused_linear(x16, None, pick(quantized), out_dtype=torch.float16))
        row["ours_kernel"] = "cuda" if decode_kernel and m <= ops.cuda.DECODE_MAX_ROWS else "triton"
        row["ours_bare_ms"] = bench(lambda: ops.fused_linear(x16, None, pick(quantized), out_dtype=torch.float16))

        def with_lora():
            normed, t = ops.normalize_activation(x16, "rmsnorm", norm_weight, None, 1e-6, down_proj=lora_a)
            return ops.fused_linear(normed, None, pick(quantized), lowrank_t=t, lowrank_u=lora_b,
                                    out_dtype=torch.float16)

        row["ours_lora_ms"] = bench(with_lora)
        expected = x16.float() @ qweight.to(device).dequantize().half().float().t()
        got = ops.fused_linear(x16, None, quantized[0], out_dtype=torch.float16).float()
        row["ours_rel_error"] = float((got - expected).norm() / expected.norm())
        row["ours_weight_gbps"] = weight_bytes / row["ours_bare_ms"] / 1e6
        row["ours_bandwidth_fraction"] = row["ours_weight_gbps"] / bandwidth
        row["speedup_vs_bf16"] = row["cublas_bf16_ms"] / row["ours_bare_ms"]
        if "tinygemm_ms" in row:
            row["speedup_vs_tinygemm"] = row["tinygemm_ms"] / row["ours_bare_ms"]
        row["lora_overhead"] = row["ours_lora_ms"] / row["ours_bare_ms"] - 1
        rows.append(row)
        print(f"{layer:>8} M={m:<5} bf16 {row['cublas_bf16_ms']:.4f}ms  ours ({row['ours_kernel']}) {row['ours_bare_ms']:.4f}ms "
              f"x{row['speedup_vs_bf16']:.2f} ({100 * row['ours_bandwidth_fraction']:.0f}% of copy bw)  "
              f"tinygemm {row.get('tinygemm_ms', float('nan')):.4f}ms  +LoRA {100 * row['lora_overhead']:.1f}%", flush=True)
    return rows


def plot(rows, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows}, key=[s[0] for s in SHAPES].index)
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        mine = [r for r in rows if r["layer"] == layer]
        ms = [r["M"] for r in mine]
        ax.plot(ms, [r["speedup_vs_bf16"] for r in mine], marker="o", label="ours W4A16 (CUDA at M<=16, Triton above)")
        ax.plot(ms, [r["cublas_bf16_ms"] / r["triton_bare_ms"] for r in mine], marker=".", linestyle=":",
                label="ours, Triton at every M")
        ax.plot(ms, [r["cublas_bf16_ms"] / r["ours_lora_ms"] for r in mine], marker="s", label="ours + LoRA r=16 + pre-kernel")
        if all("tinygemm_ms" in r for r in mine):
            ax.plot(ms, [r["cublas_bf16_ms"] / r["tinygemm_ms"] for r in mine], marker="^", label="tinygemm")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{layer} {mine[0]['N']}x{mine[0]['K']}")
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("speedup vs cuBLAS bf16")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"W4A16 group {GROUP} on {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS} only")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_w4a16 needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth_gbps(device)
    print(f"{name}: measured copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for layer, n, k in SHAPES:
        rows += bench_shape(layer, n, k, QUICK_MS if args.quick else MS, bandwidth, device)
    stamp = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"w4a16_{name.replace(' ', '_')}_{stamp}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"device": name, "date": stamp, "torch": torch.__version__, "triton": triton.__version__,
                                "python": platform.python_version(), "copy_gbps": bandwidth, "rows": rows}, indent=1))
    plot(rows, path.with_suffix(".png"), name)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
