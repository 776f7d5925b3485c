"""The `cpu` backend against the baselines a CPU user would pick, all in this process.

    python benchmarks/bench_cpu.py [--quick] [--runs 15] [--threads 2] [--out benchmarks/results/cpu_<cpu>.json]

- GEMMs (MiniLM / BERT-base / DeiT-S layer shapes, LLaMA-style decode at M = 1, 4, 16): fp32
  `F.linear`, `torch.ao` dynamic int8 linear (fbgemm), and ours per instruction-set path this CPU
  runs, W8A8 and W4A8 (int4 weights), weights packed once as a converted model holds them; the
  cost of each epilogue term over the bare GEMM at 2048 × 768 → 3072.
- W4A16 (group 128) on the decode kernel at the LLaMA shapes with M <= 16; at M = 1 over weight
  copies twice the last-level cache, against the copy and read bandwidth of as many bytes, through
  the op and the kernel alone (the op's Python per call is the difference).
- End to end: all-MiniLM-L6-v2 (real weights, 64 sentences in one padded batch): fp32 eager,
  `torch.ao` dynamic int8, ours W8A8 and W4A8 (converted for runtime: per linear, and with an
  example, fused blocks) on the `cpu` backend's default path, W8A8 converted on each other path
  this CPU runs, W8A8 with QLA adapters (rank 8) and with QLA + QwT (truncated to 0.99 energy)
  lowered and fused, and W8A8 on the reference (the previous CPU path),
  each with its embedding cosine vs fp32; BERT-base (seq 128, batch 8) and DeiT-S (batch 8) with
  random weights: fp32 eager, torch.ao dynamic int8, ours W8A8 and W4A8 with fused blocks, each
  with its output cosine vs fp32. Not measured: fp32 torch.compile and a LLaMA-shaped decoder end
  to end.
Variants are interleaved run by run (so drift hits all alike); min and median of --runs. ONNX
Runtime is not measured (the report says whether it is installed: it was not installable where
this was written). Writes JSON and a PNG beside it, labelled with the CPU, its flags and the path.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import qla_kernels as qk
from qla_kernels.formats.weights import QuantizedWeight
from qla_kernels.ops import cpu
from qla_kernels.quant import quantize_weight

GEMM_SHAPES = [  # (label, M, K, N)
    ("MiniLM qkv 64x21", 1344, 384, 384), ("MiniLM fc1 64x21", 1344, 384, 1536), ("MiniLM fc2 64x21", 1344, 1536, 384),
    ("BERT-base qkv 32x128", 4096, 768, 768), ("BERT-base fc1 32x128", 4096, 768, 3072),
    ("BERT-base fc2 32x128", 4096, 3072, 768), ("DeiT-S fc1 8x197", 1576, 384, 1536),
    ("issue 2048x768->3072", 2048, 768, 3072),
    ("LLaMA 4096->4096 M=1", 1, 4096, 4096), ("LLaMA 4096->4096 M=4", 4, 4096, 4096),
    ("LLaMA 4096->4096 M=16", 16, 4096, 4096), ("LLaMA 4096->14336 M=1", 1, 4096, 14336),
    ("LLaMA 4096->14336 M=16", 16, 4096, 14336),
]
AVX2_ONLY = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "QLA_CPU_ISA": "avx2"}
QUICK_SHAPES = ("MiniLM fc1 64x21", "issue 2048x768->3072", "LLaMA 4096->4096 M=1")


def cpu_flags() -> List[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
                return [flag for flag in line.split(":", 1)[1].split() if flag in wanted]
    except OSError:
        pass
    return []


def interleaved(variants: Dict[str, Callable[[], object]], runs: int) -> Dict[str, Dict[str, float]]:
    """min and median ms per variant, the variants timed in turn within each run."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"min_ms": min(t), "median_ms": statistics.median(t)} for name, t in times.items()}


def _ao_linear(weight: torch.Tensor, bias: torch.Tensor):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8)


def _gemm_variants(m: int, k: int, n: int, epilogue_costs: bool) -> Dict[str, Callable]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator)
    weight = torch.randn(n, k, generator=generator) * 0.05
    bias = torch.randn(n, generator=generator) * 0.1
    ao = _ao_linear(weight, bias)
    variants = {"fp32 F.linear": lambda: F.linear(x, weight, bias), "torch.ao dynamic int8": lambda: ao(x)}
    packed = {name: cpu.with_panels(quantize_weight(weight, config))
              for name, config in (("W8A8", qk.W8A8()), ("W4A8", qk.W4A8()))}
    residual = torch.randn(m, n, generator=generator)
    t, u = torch.randn(m, 8, generator=generator), torch.randn(n, 8, generator=generator) * 0.1

    def ours(path: str, w: QuantizedWeight, **epilogue):
        def run():
            with cpu.using_isa(path):
                q, scale, _ = qk.ops.quantize_activation(x)
                return qk.ops.fused_linear(q, scale, w, out_dtype=torch.float32, **epilogue)
        return run

    w4a16 = quantize_weight(weight, qk.W4A16(group_size=128)) if m <= cpu.DECODE_MAX_ROWS else None
    for path in _paths():
        for name, w in packed.items():
            variants[f"ours {name} {path} (quantize + GEMM + bias)"] = ours(path, w, bias=bias)
        if w4a16 is not None:
            def decode(path=path):
                with cpu.using_isa(path):
                    return qk.ops.fused_linear(x, None, w4a16, bias=bias, out_dtype=torch.float32)
            variants[f"ours W4A16 g128 {path} (decode kernel + bias)"] = decode
        if epilogue_costs:
            w = packed["W8A8"]
            variants[f"ours W8A8 {path}: GEMM only"] = ours(path, w)
            variants[f"ours W8A8 {path}: + bias + GELU"] = ours(path, w, bias=bias, activation="gelu")
            variants[f"ours W8A8 {path}: + bias + GELU + requant"] = ours(path, w, bias=bias, activation="gelu",
                                                                          requant_bits=8)
            variants[f"ours W8A8 {path}: + residual"] = ours(path, w, residual=residual)
            variants[f"ours W8A8 {path}: + T·Uᵀ r=8"] = ours(path, w, lowrank_t=t, lowrank_u=u)
    return variants


def _paths() -> List[str]:
    """The paths to measure: every one this CPU runs, or the one QLA_CPU_ISA restricts the run to."""
    forced = os.environ.get(cpu.ISA_VARIABLE)
    return [forced] if forced else cpu.supported_isas()


def bench_gemms(runs: int, quick: bool) -> List[dict]:
    rows = []
    for label, m, k, n in GEMM_SHAPES:
        if quick and label not in QUICK_SHAPES:
            continue
        timings = interleaved(_gemm_variants(m, k, n, epilogue_costs=label.startswith("issue")), runs)
        fp32 = timings["fp32 F.linear"]["median_ms"]
        for name, timing in timings.items():
            rows.append({"shape": label, "M": m, "K": k, "N": n, "variant": name, **timing,
                         "speedup_vs_fp32": fp32 / timing["median_ms"]})
        print(f"{label}: " + ", ".join(f"{name} {t['median_ms']:.2f} ms" for name, t in timings.items()), flush=True)
    return rows


def _last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 32 MB where it reports none."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def bench_decode_bandwidth(runs: int) -> dict:
    """W4A16 decode at M = 1 (under no_grad, as a decoder runs) over weight copies rotated so that
    they do not fit in cache (twice the last-level cache in all, at least 128 MB), against this
    machine's copy bandwidth (torch copy, read + write bytes) and read bandwidth (a torch fp32 sum,
    the one stream decode has), each over twice the last-level cache."""
    stream_bytes = max(128 << 20, 2 * _last_level_cache_bytes())
    source, target = torch.ones(stream_bytes // 4), torch.zeros(stream_bytes // 4)  # pages touched: real memory
    copies, reads = [], []
    for _ in range(runs):
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        source.sum()
        reads.append(time.perf_counter() - start)
    copy_gbs = 2 * stream_bytes / statistics.median(copies) / 1e9
    read_gbs = stream_bytes / statistics.median(reads) / 1e9
    del source, target
    rows = []
    for n in (4096, 14336):
        generator = torch.Generator().manual_seed(0)
        weight = quantize_weight(torch.randn(n, 4096, generator=generator) * 0.05, qk.W4A16(group_size=128))
        weights = [dataclasses.replace(weight, data=weight.data.clone(), scale=weight.scale.clone(),
                                       zero=weight.zero.clone())
                   for _ in range(max(2, -(-stream_bytes // (n * 4096 // 2))))]
        weight_bytes = sum(t.numel() * t.element_size() for t in (weights[0].data, weights[0].scale, weights[0].zero))
        x = torch.randn(1, 4096)
        y = torch.empty(1, n)

        def op(w):
            qk.ops.fused_linear(x, None, w, out_dtype=torch.float32)

        def kernel(w):  # the extension's decode kernel alone: the op adds its Python per call
            cpu._MODULE.w4a16_rows(cpu.isa(), x.data_ptr(), 1, 4096, w.data.data_ptr(), w.scale.data_ptr(),
                                   w.zero.data_ptr(), w.k_group, 0, n, y.data_ptr())

        times = {op: [], kernel: []}
        with torch.no_grad():
            for w in weights:
                op(w)
            for _ in range(runs):
                for call, spent in times.items():
                    start = time.perf_counter()
                    for w in weights:
                        call(w)
                    spent.append((time.perf_counter() - start) / len(weights))
        seconds, kernel_seconds = statistics.median(times[op]), statistics.median(times[kernel])
        rows.append({"shape": f"4096->{n} M=1", "copies": len(weights), "ms": seconds * 1e3,
                     "weight_GBps": weight_bytes / seconds / 1e9,
                     "fraction_of_copy_bandwidth": weight_bytes / seconds / 1e9 / copy_gbs,
                     "fraction_of_read_bandwidth": weight_bytes / seconds / 1e9 / read_gbs,
                     "kernel_ms": kernel_seconds * 1e3, "kernel_weight_GBps": weight_bytes / kernel_seconds / 1e9,
                     "kernel_fraction_of_copy_bandwidth": weight_bytes / kernel_seconds / 1e9 / copy_gbs})
        print(f"W4A16 decode 4096->{n} M=1 over {len(weights)} copies: {seconds * 1e3:.2f} ms, "
              f"{weight_bytes / seconds / 1e9:.1f} GB/s of weights (the kernel alone {kernel_seconds * 1e3:.2f} ms, "
              f"{weight_bytes / kernel_seconds / 1e9:.1f} GB/s; {copy_gbs:.1f} GB/s copy, {read_gbs:.1f} GB/s read)",
              flush=True)
        del weights
    return {"stream_bytes": stream_bytes, "copy_GBps": copy_gbs, "read_GBps": read_gbs, "decode": rows}


def bench_minilm(runs: int) -> List[dict]:
    from qla_kernels.apps.sentence_embedding import SENTENCES, load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(list(SENTENCES) * 2, padding=True, return_tensors="pt")

    def pooled(m):
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    # name -> (model, backend, CPU path or None for the default)
    variants = {"fp32 eager": (model, "auto", None),
                "torch.ao dynamic int8": (torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8), "auto", None)}
    for name, config in (("W8A8", qk.W8A8()), ("W4A8", qk.W4A8())):
        quantized = qk.quantize_(copy.deepcopy(model), config)
        fused = copy.deepcopy(quantized)
        reference_form = copy.deepcopy(quantized) if name == "W8A8" else None
        qk.convert_for_runtime(quantized)
        qk.convert_for_runtime(fused, dict(batch))
        variants[f"ours {name} cpu {cpu.isa()} (converted)"] = (quantized, "auto", None)
        variants[f"ours {name} cpu {cpu.isa()} (converted, fused blocks)"] = (fused, "auto", None)
        if reference_form is not None:
            variants["ours W8A8 reference backend"] = (reference_form, "reference", None)
            for path in _paths()[1:]:  # the slower paths this CPU also runs, on the same converted model
                variants[f"ours W8A8 cpu {path} (converted)"] = (quantized, "auto", path)
    for label, with_qwt in (("QLA r=8", False), ("QLA r=8 + QwT", True)):
        variants[f"ours W8A8 + {label} cpu {cpu.isa()} (fused blocks)"] = (_corrected(model, dict(batch), with_qwt),
                                                                           "auto", None)
    fp = pooled(model)
    calls = {name: (lambda m=m, backend=backend, path=path: _under(backend, path, lambda: pooled(m)))
             for name, (m, backend, path) in variants.items()}
    timings = interleaved(calls, runs)
    rows = []
    base = timings["fp32 eager"]["median_ms"]
    for name, timing in timings.items():
        cosine = (calls[name]() * fp).sum(-1)
        rows.append({"model": f"all-MiniLM-L6-v2 batch {tuple(batch['input_ids'].shape)}", "variant": name, **timing,
                     "speedup_vs_fp32": base / timing["median_ms"], "cos_mean": float(cosine.mean()),
                     "cos_min": float(cosine.min())})
        print(f"MiniLM {name}: {timing['median_ms']:.1f} ms ({base / timing['median_ms']:.2f}x fp32), "
              f"cosine {float(cosine.mean()):.5f}", flush=True)
    return rows


def _random_models() -> Dict[str, tuple]:
    """BERT-base (seq 128, batch 8) and DeiT-S (batch 8, 224²) with random weights, built from
    their configs (nothing downloaded): name -> (model, example input as keyword arguments)."""
    import timm
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig()).eval()  # BERT-base's config: 12 layers of 768, 12 heads, GELU
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    generator = torch.Generator().manual_seed(0)
    return {"BERT-base seq 128 batch 8 (random weights)":
                (bert, {"input_ids": torch.randint(1000, 30000, (8, 128), generator=generator),
                        "attention_mask": torch.ones(8, 128, dtype=torch.long)}),
            "DeiT-S batch 8 (random weights)": (deit, {"x": torch.randn(8, 3, 224, 224, generator=generator)})}


def bench_random_models(runs: int) -> List[dict]:
    """fp32 eager, torch.ao dynamic int8 and ours W8A8 / W4A8 (converted with fused blocks), each
    with the cosine of its output to fp32's (last hidden state / logits, flattened per sample)."""
    rows = []
    for label, (model, example) in _random_models().items():
        def output(m):
            with torch.no_grad():
                out = m(**example)
            out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
            return out.reshape(out.shape[0], -1).float()

        variants = {"fp32 eager": model,
                    "torch.ao dynamic int8": torch.ao.quantization.quantize_dynamic(
                        copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)}
        for name, config in (("W8A8", qk.W8A8()), ("W4A8", qk.W4A8())):
            fused = qk.quantize_(copy.deepcopy(model), config)
            qk.convert_for_runtime(fused, dict(example))
            variants[f"ours {name} cpu {cpu.isa()} (converted, fused blocks)"] = fused
        fp = output(model)
        calls = {name: (lambda m=m: output(m)) for name, m in variants.items()}
        timings = interleaved(calls, runs)
        base = timings["fp32 eager"]["median_ms"]
        for name, timing in timings.items():
            cosine = F.cosine_similarity(calls[name](), fp, dim=-1)
            rows.append({"model": label, "variant": name, **timing, "speedup_vs_fp32": base / timing["median_ms"],
                         "cos_mean": float(cosine.mean()), "cos_min": float(cosine.min())})
            print(f"{label} {name}: {timing['median_ms']:.1f} ms ({base / timing['median_ms']:.2f}x fp32), "
                  f"cosine {float(cosine.mean()):.5f}", flush=True)
    return rows


def _corrected(model_fp, batch: dict, with_qwt: bool):
    """`model_fp` at W8A8 with QLA adapters at rank 8 (the zero-initialized up projections
    made small and random: the cost of trained ones) and optionally QwT (fitted on this batch,
    truncated to 0.99 of its energy), lowered and fused for runtime."""
    from qla_kernels.methods import qla, qwt

    model = qk.quantize_(copy.deepcopy(model_fp), qk.W8A8())
    qla.add_adapters(model, rank=8, example=batch)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "qla" in name and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    if with_qwt:
        qwt.calibrate(model_fp, model, [batch], progress=False)
        qwt.truncate(model, energy=0.99)
    qla.fuse(model)
    qk.convert_for_runtime(model, batch)
    return model


def _under(backend: str, path, fn):
    with qk.use_backend(backend), (cpu.using_isa(path) if path else contextlib.nullcontext()):
        return fn()


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in report["end_to_end"]] + [r for r in report["gemm"] if r["shape"].startswith("issue")]
    labels = [f"{r.get('shape') or r['model'].split(' (')[0]}: {r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1))
    ax.barh(range(len(rows)), [r["speedup_vs_fp32"] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("speed-up vs fp32 (median)")
    restricted = " restricted to AVX2" if report["restricted_to"] else ""
    ax.set_title(f"{report['cpu']}{restricted} ({report['threads']} threads, path {report['path']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="three GEMM shapes, no end-to-end")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--avx2-only", action="store_true",
                        help="rerun restricted to AVX2 (MKL, ATen, oneDNN and our path): an AVX2-only CPU's ISA on this "
                             "one; torch.ao's fbgemm picks its own kernels and is not restricted")
    args = parser.parse_args(argv)
    if args.avx2_only and os.environ.get(cpu.ISA_VARIABLE) != "avx2":
        os.environ.update(AVX2_ONLY)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if not qk.backends()["cpu"].available:
        print(qk.backends()["cpu"], file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    restricted = os.environ.get(cpu.ISA_VARIABLE) == "avx2" and os.environ.get("MKL_ENABLE_INSTRUCTIONS") == "AVX2"
    report = {"cpu": cpu.cpu_name(), "flags": cpu_flags(), "threads": args.threads, "path": cpu.describe(),
              "restricted_to": ("AVX2: " + ", ".join(f"{k}={v}" for k, v in AVX2_ONLY.items())
                                + " (torch.ao's fbgemm not restricted)") if restricted else None,
              "paths": cpu.supported_isas(), "torch": torch.__version__, "runs": args.runs,
              "onnxruntime": _onnxruntime_version()}
    report["gemm"] = bench_gemms(args.runs, args.quick)
    report["w4a16_decode_bandwidth"] = None if args.quick else bench_decode_bandwidth(args.runs)
    report["end_to_end"] = [] if args.quick else bench_minilm(args.runs) + bench_random_models(args.runs)
    name = cpu.cpu_name().replace(" ", "_").replace("(R)", "") + ("_avx2_only" if restricted else "")
    out = args.out or Path("benchmarks/results") / f"cpu_{name}.json"
    write(report, out)
    print(f"wrote {out}")
    return 0


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed (not measured)"
    return onnxruntime.__version__


if __name__ == "__main__":
    raise SystemExit(main())
