"""End-to-end latency of whole quantized models against fp16, behind `qla bench` and
benchmarks/bench_e2e.py.

Vision (timm ViT-B/16, DeiT-S, DeiT-T, Swin-T at 224², random weights) and BERT-base (seq 128):
    fp16_eager, fp16_compile        the baselines (torch.compile default mode)
    w8a8, w4a8                      quantize_ → convert_for_runtime (fused chain wherever a template fits)
    w8a8_qwt                        + QwT (calibrated on random inputs, truncated to 99% energy,
                                      lowered into each block's last GEMM)
    w8a8_qla_qwt, w4a8_qla          + QLA adapters (rank 8) lowered onto the GEMMs (methods.qla.fuse)
    w8a8_qla_qwt_modules            the same adapters run as separate PyTorch ops (unfused baseline)
Ours run eagerly and, on CUDA, replayed from a CUDA graph (`_graph` rows). A LLaMA-style decoder
(8B-shaped layers, a few of them) decodes with its KV cache at batch 1 and 16: bf16 vs W4A16, the
latter module by module and with its blocks fused (norms + SwiGLU MLP around the model's attention).

Per row: ms (median), items/s, speedup vs fp16 eager and vs fp16 compiled, peak memory of the
forward (model bytes + what the forward allocates), and for the corrected variants their overhead
over the same model without corrections. On CPU everything shrinks to tiny models on the
reference backend and the report says so: those numbers measure the plumbing, not the kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..methods import qla, qwt
from ..models import convert_for_runtime
from ..models.batches import run_model
from ..nn import quantize_
from ..quant.config import W4A8, W4A16, W8A8

VISION_MODELS = {"vit_b16": "vit_base_patch16_224", "deit_s": "deit_small_patch16_224",
                 "deit_t": "deit_tiny_patch16_224", "swin_t": "swin_tiny_patch4_window7_224"}
VISION_BATCHES = (1, 8, 64)
VARIANTS = ("fp16_eager", "fp16_compile", "w8a8", "w8a8_qwt", "w8a8_qla_qwt", "w8a8_qla_qwt_modules", "w4a8",
            "w4a8_qla")
# Tiny stand-ins for CPU runs: the same architectures, a few layers, small images.
TINY_VISION = {
    "vit_b16": dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4),
    "deit_s": dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4),
    "deit_t": dict(img_size=32, patch_size=8, depth=2),
    "swin_t": dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
}


@dataclasses.dataclass
class Setup:
    device: torch.device
    tiny: bool
    dtype: torch.dtype
    timer: Callable[[Callable[[], Any]], float]  # ms per call

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu (reference backend, tiny models: plumbing only, not kernel speed)"


def cpu_timer(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cuda_timer(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def make_setup(device: Optional[torch.device] = None) -> Setup:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return Setup(device, False, torch.float16, cuda_timer)
    return Setup(device, True, torch.float32, cpu_timer)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def peak_forward_bytes(model: nn.Module, run: Callable[[], Any], device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        run()
    torch.cuda.synchronize()
    return model_bytes(model) + torch.cuda.max_memory_allocated() - before


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Captures fn (autotuning and lazy initialisation done by warm-up calls first); returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph.replay


def prepare(variant: str, fp: nn.Module, example: Any, calibration: List[Any], setup: Setup) -> nn.Module:
    """The model for one variant, on setup's device and dtype, ready to time."""
    if variant.startswith("fp16"):
        model = copy.deepcopy(fp).to(setup.dtype)
        return torch.compile(model) if variant == "fp16_compile" else model
    config = W8A8() if variant.startswith("w8a8") else W4A8()
    model = quantize_(copy.deepcopy(fp), config)
    if "qwt" in variant:
        qwt.calibrate(fp, model, calibration, progress=False)
        qwt.truncate(model, energy=0.99)
    if "qla" in variant:
        qla.add_adapters(model, rank=8, example=example)
    model = model.to(setup.dtype)
    example = _cast(example, setup.dtype)
    if "qla" in variant and not variant.endswith("_modules"):
        qla.fuse(model)
    convert_for_runtime(model, example)  # lowers QwT into the blocks' last GEMMs, fuses, freezes
    return model


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor) and batch.is_floating_point():
        return batch.to(dtype)
    return batch


def time_model(name: str, fp: nn.Module, examples: Dict[int, Any], calibration: List[Any], setup: Setup,
               variants=VARIANTS) -> List[Dict[str, Any]]:
    """One row per variant (and per CUDA-graph replay of ours) and batch size (the keys of
    `examples`); each variant is prepared once, on the smallest example."""
    rows = []
    for variant in variants:
        model = prepare(variant, fp, examples[min(examples)], calibration, setup)
        for batch_size, example in examples.items():
            inputs = _cast(example, setup.dtype)

            def run(model=model, inputs=inputs):
                return run_model(model, inputs)

            with torch.no_grad():
                row = {"model": name, "batch": batch_size, "variant": variant, "ms": setup.timer(run),
                       "peak_bytes": peak_forward_bytes(model, run, setup.device)}
                rows.append(row)
                if setup.device.type == "cuda" and not variant.startswith("fp16"):
                    rows.append({**row, "variant": f"{variant}_graph", "ms": setup.timer(cuda_graph(run))})
        del model
    baseline = {(r["batch"], r["variant"]): r["ms"] for r in rows}
    for row in rows:
        batch = row["batch"]
        row["items_per_s"] = batch / row["ms"] * 1e3
        row["speedup_vs_fp16_eager"] = baseline[batch, "fp16_eager"] / row["ms"]
        if (batch, "fp16_compile") in baseline:
            row["speedup_vs_fp16_compile"] = baseline[batch, "fp16_compile"] / row["ms"]
        uncorrected = row["variant"].replace("_qla", "").replace("_qwt", "").replace("_modules", "")
        if uncorrected != row["variant"] and (batch, uncorrected) in baseline:
            row["correction_overhead"] = row["ms"] / baseline[batch, uncorrected] - 1
    rows.sort(key=lambda r: r["batch"])
    return rows


def vision_model(key: str, setup: Setup) -> nn.Module:
    import timm

    torch.manual_seed(0)
    kwargs = TINY_VISION[key] if setup.tiny else {}
    return timm.create_model(VISION_MODELS[key], pretrained=False, **kwargs).eval().to(setup.device)


def bert_model(setup: Setup) -> nn.Module:
    import transformers

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if setup.tiny else {}
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**sizes)).eval().to(setup.device)


def run_vision_and_text(setup: Setup, models=tuple(VISION_MODELS), batches=VISION_BATCHES, bert: bool = True,
                        variants=VARIANTS) -> List[Dict[str, Any]]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for key in models:
        fp = vision_model(key, setup)
        size = (3, *_image_size(fp))
        calibration = [torch.randn(8, *size, generator=generator).to(setup.device) for _ in range(2)]
        examples = {batch: torch.randn(batch, *size, generator=generator).to(setup.device) for batch in batches}
        rows += time_model(key, fp, examples, calibration, setup, variants)
        del fp
    if bert:
        fp = bert_model(setup)
        batch, length = (2, 16) if setup.tiny else (32, 128)
        vocab = fp.config.vocab_size

        def text(count):
            return {"input_ids": torch.randint(0, vocab, (count, length), generator=generator).to(setup.device),
                    "attention_mask": torch.ones(count, length, dtype=torch.long, device=setup.device)}
        rows += time_model("bert_base", fp, {batch: text(batch)}, [text(8) for _ in range(2)], setup, variants)
    return rows


def _image_size(model: nn.Module):
    size = model.patch_embed.img_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def llama_model(setup: Setup, layers: int) -> nn.Module:
    """A LLaMA-style decoder: 8B-shaped layers (4096 wide, SwiGLU 14336, 32 heads, 8 KV heads)."""
    import transformers

    if setup.tiny:
        sizes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=128)
    else:
        sizes = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     num_hidden_layers=layers, vocab_size=32000)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes)).eval().to(setup.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_ms_per_step(model: nn.Module, batch: int, prompt: int, steps: int, vocab: int, device) -> float:
    """Greedy decoding with the KV cache after a `prompt`-token prefill; ms per decoded token step."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=generator).to(device)
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up steps (autotuning, lazy initialisation)
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3 / steps


def run_decode(setup: Setup, layers: int = 2, batches=(1, 16), prompt: int = 32, steps: int = 32) -> List[Dict[str, Any]]:
    """bf16 (fp32 on CPU) vs W4A16 (group 128; 32 on tiny models), unfused and fused, decoding:
    tokens/s per batch size."""
    fp = llama_model(setup, layers)
    dtype = torch.bfloat16 if setup.device.type == "cuda" else torch.float32
    group = 32 if setup.tiny else 128
    rows = []
    for variant in ("bf16_eager" if dtype == torch.bfloat16 else "fp32_eager", "w4a16", "w4a16_fused"):
        model = copy.deepcopy(fp)
        if variant.startswith("w4a16"):
            model = quantize_(model, W4A16(group_size=group))
        model = model.to(dtype)
        if variant == "w4a16_fused":  # norms and SwiGLU MLP fused around the model's attention
            convert_for_runtime(model, {"input_ids": torch.randint(0, fp.config.vocab_size, (1, 8),
                                                                   device=setup.device)})
        elif variant == "w4a16":
            convert_for_runtime(model)
        for batch in batches:
            ms = decode_ms_per_step(model, batch, prompt, steps, fp.config.vocab_size, setup.device)
            rows.append({"model": f"llama_{fp.config.hidden_size}w_{fp.config.num_hidden_layers}l", "batch": batch,
                         "variant": variant, "ms_per_step": ms, "tokens_per_s": batch / ms * 1e3})
        del model
    baseline = {(r["batch"]): r["ms_per_step"] for r in rows if not r["variant"].startswith("w4a16")}
    for row in rows:
        row["speedup_vs_fp"] = baseline[row["batch"]] / row["ms_per_step"]
    return rows


def op_breakdown(model: nn.Module, run: Callable[[], Any], top: int = 12) -> List[Dict[str, Any]]:
    """Device time per kernel name over 5 forwards (CUDA only): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:120], "ms_per_forward": e.self_device_time_total / 5 / 1e3, "calls_per_forward": e.count / 5,
             "share": e.self_device_time_total / total} for e in events[:top]]


def run(setup: Optional[Setup] = None, quick: bool = False, llama_layers: int = 2,
        models: Optional[Sequence[str]] = None, batches: Optional[Sequence[int]] = None,
        variants: Optional[Sequence[str]] = None, decode_batches: Optional[Sequence[int]] = None,
        bert: Optional[bool] = None, breakdown: bool = True) -> Dict[str, Any]:
    """The whole benchmark on setup's device; `quick`: ViT-B/16 and DeiT-T at batch 1 and 64 only.
    `models`, `batches`, `variants`, `decode_batches`, `bert` and `breakdown` narrow it further
    (scripts/gpu_check.sh quick: ViT-B/16 at batch 64, four variants, decode at batch 1)."""
    setup = setup or make_setup()
    models = tuple(models or (("vit_b16", "deit_t") if quick else VISION_MODELS))
    batches = tuple(batches or ((1, 64) if quick else VISION_BATCHES))
    variants = tuple(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS] + [m for m in models if m not in VISION_MODELS]
    if unknown:
        raise ValueError(f"unknown variants or models {unknown}; variants: {list(VARIANTS)}, models: {list(VISION_MODELS)}")
    decode_batches = tuple(decode_batches or (1, 16))
    if setup.tiny:  # CPU: no inductor compile (minutes of C++ builds for a plumbing check)
        batches, variants = (1, 2), tuple(v for v in variants if v != "fp16_compile")
        decode_batches = tuple(min(batch, 2) for batch in decode_batches)
    report: Dict[str, Any] = {
        "device": setup.label, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "python": platform.python_version(), "dtype": str(setup.dtype),
        "rows": run_vision_and_text(setup, models, batches, bert=not quick if bert is None else bert,
                                    variants=variants),
        "decode": run_decode(setup, llama_layers, batches=decode_batches),
    }
    if setup.device.type == "cuda" and breakdown:
        import triton

        report["triton"] = triton.__version__
        fp = vision_model("vit_b16", setup)
        example = torch.randn(64, 3, 224, 224, device=setup.device)
        calibration = [torch.randn(8, 3, 224, 224, device=setup.device) for _ in range(2)]
        report["breakdown_vit_b16_b64"] = {}
        for variant in ("fp16_eager", "w8a8_qwt"):
            model = prepare(variant, fp, example, calibration, setup)
            report["breakdown_vit_b16_b64"][variant] = op_breakdown(
                model, lambda model=model: model(example.to(setup.dtype)))
    return report


def table(report: Dict[str, Any]) -> str:
    """A markdown table of the report (what the README shows)."""
    lines = [f"Device: {report['device']} ({report['date']}, torch {report['torch']}, {report['dtype']})", "",
             "| model | batch | variant | ms | items/s | vs fp16 eager | vs fp16 compile | correction overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        overhead = f"{100 * r['correction_overhead']:+.1f}%" if "correction_overhead" in r else ""
        compiled = f"{r['speedup_vs_fp16_compile']:.2f}x" if "speedup_vs_fp16_compile" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['items_per_s']:.0f} | "
                     f"{r['speedup_vs_fp16_eager']:.2f}x | {compiled} | {overhead} |")
    lines += ["", "| decoder | batch | variant | ms/step | tokens/s | vs fp |", "|---|---|---|---|---|---|"]
    for r in report["decode"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms_per_step']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['speedup_vs_fp']:.2f}x |")
    return "\n".join(lines)


def plot(report: Dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["batch"]) for r in report["rows"]))
    variants = list(dict.fromkeys(r["variant"] for r in report["rows"] if r["variant"] != "fp16_eager"))
    speedup = {(r["model"], r["batch"], r["variant"]): r["speedup_vs_fp16_eager"] for r in report["rows"]}
    fig, ax = plt.subplots(figsize=(max(10, len(groups) * 1.4), 5))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        ax.bar([j + i * width for j in range(len(groups))], [speedup.get((m, b, variant), 0) for m, b in groups],
               width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 for j in range(len(groups))], [f"{m}\nbatch {b}" for m, b in groups], fontsize=8)
    ax.set_ylabel("speedup vs fp16 eager (higher is better)")
    ax.set_title(f"qla_kernels end to end on {report['device']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(report: Dict[str, Any], folder) -> Path:
    """Writes e2e_<device>_<date>.json and its .png plot into `folder`; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slug = report["device"].split(" (")[0].replace(" ", "_").replace("/", "_")
    path = folder / f"e2e_{slug}_{report['date']}.json"
    path.write_text(json.dumps(report, indent=1))
    plot(report, path.with_suffix(".png"))
    return path
