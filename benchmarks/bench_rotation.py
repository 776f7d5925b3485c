"""The online Hadamard rotation's cost on the CPU backend, against the layer it feeds.

    python benchmarks/bench_rotation.py [--runs 101]
    python benchmarks/bench_rotation.py --device cuda [--runs 21]

With --device cuda: the Triton pre-kernel at fp16 on real call shapes (MiniLM and BERT-base
batches, ViT-B/16 at batch 64, LLaMA-3-8B decode and prefill; LayerNorm → 4 bits, and bare
re-quantization of an fp32 GEMM output), without and with rotation (the rotating pre-kernel),
each timing the median over `--runs` CUDA-event samples of 20 calls, variants in turn; and the
W4A4 QuantLinear without and with rotate at those shapes. Writes rotation_gpu_<device>.json.

Per shape (MiniLM's qkv / fc1 / fc2 at 64×21 tokens, LLaMA-style decode 4096→4096 at M = 1 and
4096→14336 at M = 16): `quant.hadamard.rotate` (the reference's three torch products),
`ops.hadamard_rotate` on the cpu kernel as a separate pass, and a converted W4A4 QuantLinear
without and with rotate="hadamard" (whose pre-kernel rotates each row as it quantizes it): the
rotation's cost is the difference of the two layers. Then the rotation of fc2's input where the
fused MLP does it, in fc1's epilogue: fc1 + GELU re-quantized to 4 bits without and with
`requant_rotate`. Last, the real all-MiniLM-L6-v2 end to end (the 64 demo sentences in one padded
batch), converted with fused blocks, at W4A4 without and with rotation; and a random-weight LLaMA-style decoder (width 1024, MLP 3072 =
12·256, 4 layers) on 4 × 64 tokens at W4A4: without rotation, rotating every linear's input
online, and with the rotation folded into the residual stream (methods.rotation: only o_proj's
and down_proj's inputs rotate online). The variants of each comparison are timed in turn within
each run (bench_cpu.interleaved); each timing is the median of `--runs`. Writes
benchmarks/results/rotation_<cpu>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops import cpu as cpu_kernels
from qla_kernels.quant.hadamard import rotate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import interleaved  # noqa: E402

SHAPES = ((1344, 384, 1152), (1344, 384, 1536), (1344, 1536, 384), (1, 4096, 4096), (16, 4096, 14336))
EPILOGUE_SHAPES = ((1344, 384, 1536), (16, 4096, 14336))  # fc1 → fc2's rotated input: MiniLM, LLaMA-style


def medians(variants, runs: int) -> dict:
    """Median ms per variant, the variants timed in turn within each run (drift hits all alike)."""
    return {name: timing["median_ms"] for name, timing in interleaved(variants, runs).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=101)  # a 1 ms layer on a shared machine varies by ±30%
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return gpu_costs(args.runs, Path(args.out))
    if not qk.backends()["cpu"].available:
        raise ValueError(f"the cpu backend is not built here: {qk.backends()['cpu'].reason}")
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for m, k, n in SHAPES:
            x = torch.randn(m, k)
            linear = torch.nn.Linear(k, n)
            plain, rotating = (qk.QuantLinear.from_float(linear, config) for config in (qk.W4A4(), qk.W4A4(rotate="hadamard")))
            plain.freeze(), rotating.freeze()
            row = {"m": m, "k": k, "n": n,
                   **medians({"rotate_torch_ms": lambda: rotate(x), "rotate_kernel_ms": lambda: ops.hadamard_rotate(x)},
                             args.runs),
                   **medians({"layer_ms": lambda: plain(x), "rotating_layer_ms": lambda: rotating(x)}, args.runs)}
            row["kernel_vs_layer"] = row["rotate_kernel_ms"] / row["layer_ms"]
            row["rotation_in_layer"] = row["rotating_layer_ms"] / row["layer_ms"] - 1
            rows.append(row)
            print(f"{m}×{k}→{n}: rotation torch {row['rotate_torch_ms']:.3f} ms, kernel alone "
                  f"{row['rotate_kernel_ms']:.3f} ms; W4A4 layer {row['layer_ms']:.3f} ms, rotating "
                  f"{row['rotating_layer_ms']:.3f} ms: +{100 * row['rotation_in_layer']:.1f}%")
        epilogue_rows = []
        for m, k, n in EPILOGUE_SHAPES:
            x = torch.randn(m, k)
            fc1 = qk.QuantLinear.from_float(torch.nn.Linear(k, n), qk.W4A4())
            fc1.freeze()
            codes, scale, _ = ops.quantize_activation(x, 4)
            plan = fc1.runtime_plan

            def requantized(rotate):
                return lambda: plan.fused(codes, scale, None, out_dtype=torch.float32, activation="gelu",
                                          requant_bits=4, requant_rotate=rotate)
            row = {"m": m, "k": k, "n": n, **medians({"requant_ms": requantized(False),
                                                      "requant_rotate_ms": requantized(True)}, args.runs)}
            row["rotation_in_epilogue"] = row["requant_rotate_ms"] / row["requant_ms"] - 1
            epilogue_rows.append(row)
            print(f"{m}×{k}→{n} + GELU → 4 bits: {row['requant_ms']:.3f} ms, rotating the output first "
                  f"{row['requant_rotate_ms']:.3f} ms: +{100 * row['rotation_in_epilogue']:.1f}%")
    report = {"cpu": cpu_kernels.cpu_name(), "path": cpu_kernels.describe(), "threads": torch.get_num_threads(),
              "runs": args.runs, "rows": rows, "epilogue_rows": epilogue_rows, "minilm": minilm_end_to_end(args.runs),
              "decoder": decoder_online_and_folded(args.runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rotation_{cpu_kernels.cpu_name().replace(' ', '_').replace('(R)', '')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def minilm_end_to_end(runs: int) -> dict:
    """The whole model's time with and without rotation (fused blocks, dynamic per-token W4A4)."""
    from qla_kernels.apps.sentence_embedding import SENTENCES, load_minilm

    model, tokenizer = load_minilm()
    batch = dict(tokenizer(list(SENTENCES) * 2, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def pooled(m):
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    variants = {"fp32 eager": model}
    for name, config in (("W4A4", qk.W4A4()), ("W4A4 rotate=hadamard", qk.W4A4(rotate="hadamard"))):
        quantized = qk.quantize_(copy.deepcopy(model), config)
        report = qk.convert_for_runtime(quantized, batch)
        if report.fusion.skipped:
            raise RuntimeError(f"{name}: blocks not fused: {report.fusion.skipped}")
        variants[name] = quantized
    timings = interleaved({name: (lambda m=m: pooled(m)) for name, m in variants.items()}, runs)
    fp = pooled(model)
    result = {"batch": list(batch["input_ids"].shape)}
    for name, timing in timings.items():
        result[name] = {**timing, "cos_mean": float((pooled(variants[name]) * fp).sum(-1).mean())}
        print(f"MiniLM {name}: {timing['median_ms']:.1f} ms, cosine {result[name]['cos_mean']:.4f}")
    result["rotation_end_to_end"] = (timings["W4A4 rotate=hadamard"]["median_ms"] / timings["W4A4"]["median_ms"] - 1)
    print(f"rotation end to end: +{100 * result['rotation_end_to_end']:.1f}%")
    return result


def decoder_online_and_folded(runs: int) -> dict:
    """A LLaMA-style decoder's forward with no rotation, every rotation online, and the stream's folded."""
    import transformers

    from qla_kernels.methods.rotation import fold_rotation

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                                      num_key_value_heads=4, intermediate_size=3072, vocab_size=1000)
    fp = transformers.AutoModelForCausalLM.from_config(config).eval()
    batch = {"input_ids": torch.randint(1, 1000, (4, 64))}
    plain = qk.quantize_(copy.deepcopy(fp), qk.W4A4())
    online = qk.quantize_(copy.deepcopy(fp), qk.W4A4(rotate="hadamard"))
    folded = copy.deepcopy(fp)
    report = fold_rotation(folded, batch)
    qk.quantize_(folded, qk.W4A4(rotate="hadamard"), filter_fn=lambda module, name: name in report.online)
    qk.quantize_(folded, qk.W4A4())
    variants = {"W4A4": plain, "W4A4 every input rotated online": online,
                "W4A4 stream rotation folded, o_proj / down_proj online": folded}
    for name, model in variants.items():
        fusion = qk.convert_for_runtime(model, batch).fusion
        if fusion.skipped:
            raise RuntimeError(f"{name}: blocks not fused: {fusion.skipped}")

    def logits(model):
        with torch.no_grad():
            return model(**batch, use_cache=False).logits

    timings = interleaved({name: (lambda m=m: logits(m)) for name, m in variants.items()}, runs)
    reference = logits(fp).flatten()
    result = {"batch": list(batch["input_ids"].shape), "width": 1024, "layers": 4}
    for name, timing in timings.items():
        cosine = float(F.cosine_similarity(logits(variants[name]).flatten(), reference, 0))
        result[name] = {**timing, "cos_vs_fp32": cosine}
        print(f"decoder {name}: {timing['median_ms']:.1f} ms (logits cosine {cosine:.4f}, random weights)")
    return result



# (rows, K, N): MiniLM qkv and fc2 at 64×21 tokens, BERT-base fc1 and fc2 at 8×128, ViT-B/16 fc1 and
# fc2 at batch 64, LLaMA-3-8B q/k/v at decode (1, 16) and prefill (2048)
GPU_SHAPES = ((1344, 384, 1152), (1344, 1536, 384), (1024, 768, 3072), (1024, 3072, 768), (12608, 768, 3072),
              (12608, 3072, 768), (1, 4096, 4096), (16, 4096, 4096), (2048, 4096, 4096))


def _cuda_medians(variants, runs: int, calls: int = 20) -> dict:
    """Median ms per call of each variant: CUDA-event samples of `calls` calls, variants in turn."""
    for fn in variants.values():
        fn()
    samples = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / calls)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def gpu_costs(runs: int, out: Path) -> int:
    """The rotating Triton pre-kernel against the plain one, and a rotating W4A4 layer against the
    plain one, at GPU_SHAPES in fp16."""
    if not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA device")
    from qla_kernels.ops.triton.launch import rotation_of

    rows = []
    torch.manual_seed(0)
    with torch.no_grad(), qk.use_backend("triton"):
        for m, k, n in GPU_SHAPES:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            y = x.float()
            weight, bias = torch.ones(k, device="cuda"), torch.zeros(k, device="cuda")
            linear = torch.nn.Linear(k, n)
            plain, rotating = (qk.QuantLinear.from_float(linear, config).to("cuda").half()
                               for config in (qk.W4A4(), qk.W4A4(rotate="hadamard")))
            plain.freeze(), rotating.freeze()

            def pre_kernel(rotate):
                return lambda: ops.quantize_activation(x, 4, norm_kind="layernorm", norm_weight=weight,
                                                       norm_bias=bias, rotate=rotate)

            def requantize(rotate):
                return lambda: ops.quantize_activation(y, 4, rotate=rotate)
            row = {"m": m, "k": k, "n": n, "kernel_rotates": rotation_of(k) is not None,
                   **_cuda_medians({"layernorm_quantize_ms": pre_kernel(False),
                                    "layernorm_rotate_quantize_ms": pre_kernel(True)}, runs),
                   **_cuda_medians({"requantize_ms": requantize(False), "rotate_requantize_ms": requantize(True)},
                                   runs),
                   **_cuda_medians({"layer_ms": lambda: plain(x), "rotating_layer_ms": lambda: rotating(x)}, runs)}
            row["rotation_in_pre_kernel"] = row["layernorm_rotate_quantize_ms"] / row["layernorm_quantize_ms"] - 1
            row["rotation_in_requantize"] = row["rotate_requantize_ms"] / row["requantize_ms"] - 1
            row["rotation_in_layer"] = row["rotating_layer_ms"] / row["layer_ms"] - 1
            rows.append(row)
            print(f"{m}×{k}→{n}: LayerNorm → 4 bits {row['layernorm_quantize_ms'] * 1e3:.1f} µs, rotating "
                  f"{row['layernorm_rotate_quantize_ms'] * 1e3:.1f} µs (+{100 * row['rotation_in_pre_kernel']:.0f}%); "
                  f"re-quantize +{100 * row['rotation_in_requantize']:.0f}%; W4A4 layer {row['layer_ms'] * 1e3:.1f} "
                  f"µs, rotating +{100 * row['rotation_in_layer']:.0f}%")
    name = torch.cuda.get_device_name()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rotation_gpu_{name.replace(' ', '_')}.json"
    path.write_text(json.dumps({"device": name, "runs": runs, "dtype": "float16", "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
