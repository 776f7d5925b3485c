"""Quantized convolutions on the `cpu` backend against the baselines a CPU user would pick.

    python benchmarks/bench_conv.py [--quick] [--runs 7] [--threads 2] [--batches 1,8] [--out benchmarks/results/conv_<cpu>.json]

- Layers: every distinct convolution shape of ResNet-50 at 224² (batch 8; --quick: four of them):
  fp32 F.conv2d (oneDNN, channels last) against our W8A8 layer converted for runtime, with
  static and with dynamic (per output window) activation scales; the layer's own activation
  quantization and window gather included.
- End to end, torchvision ResNet-50 (random weights, random images) per batch: fp32 eager NCHW,
  fp32 eager channels last, `torch.ao` static int8 (FX graph mode, x86 / fbgemm), ours W8A8
  (static min-max PTQ on two batches; dynamic) and W4A4 static, converted for runtime (BatchNorms
  and activations folded, residual blocks fused), each with its SQNR against fp32.
Variants are interleaved run by run (so drift hits all alike); the median of --runs. Writes JSON
and a PNG beside it, labelled with the CPU, its flags and the kernels' instruction-set path.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import qla_kernels as qk
from qla_kernels.methods import ptq
from qla_kernels.nn.quant_conv import QuantConv2d, quantize_convs_
from qla_kernels.ops import cpu

# (label, batch-8 input [N, C, H, W], out channels, kernel, stride, padding)
LAYERS = [
    ("stem 7x7/2 3->64", (8, 3, 224, 224), 64, 7, 2, 3),
    ("layer1 1x1 64->64", (8, 64, 56, 56), 64, 1, 1, 0),
    ("layer1 3x3 64->64", (8, 64, 56, 56), 64, 3, 1, 1),
    ("layer1 1x1 64->256", (8, 64, 56, 56), 256, 1, 1, 0),
    ("layer1 1x1 256->64", (8, 256, 56, 56), 64, 1, 1, 0),
    ("layer2 3x3/2 128->128", (8, 128, 56, 56), 128, 3, 2, 1),
    ("layer2 3x3 128->128", (8, 128, 28, 28), 128, 3, 1, 1),
    ("layer2 1x1 512->128", (8, 512, 28, 28), 128, 1, 1, 0),
    ("layer3 3x3 256->256", (8, 256, 14, 14), 256, 3, 1, 1),
    ("layer3 1x1 1024->256", (8, 1024, 14, 14), 256, 1, 1, 0),
    ("layer4 3x3 512->512", (8, 512, 7, 7), 512, 3, 1, 1),
    ("layer4 1x1 512->2048", (8, 512, 7, 7), 2048, 1, 1, 0),
]
QUICK_LAYERS = ("layer1 3x3 64->64", "layer1 1x1 256->64", "layer3 3x3 256->256", "layer4 1x1 512->2048")


def interleaved(variants: Dict[str, Callable[[], object]], runs: int) -> Dict[str, float]:
    """Median ms per variant, the variants timed in turn `runs` times after one warm-up each."""
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()
        for _ in range(runs):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    reference, value = reference.double(), value.double()
    return float(10 * torch.log10(reference.square().mean() / (reference - value).square().mean().clamp_min(1e-30)))


def bench_layers(runs: int, quick: bool):
    rows = []
    for label, shape, out_channels, kernel, stride, padding in LAYERS:
        if quick and label not in QUICK_LAYERS:
            continue
        conv = torch.nn.Conv2d(shape[1], out_channels, kernel, stride, padding, bias=False).eval()
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        static = QuantConv2d.from_float(conv, qk.W8A8())
        static.set_static_activation(float(x.abs().max()) / 127)
        dynamic = QuantConv2d.from_float(conv, qk.W8A8())
        static.freeze(), dynamic.freeze()
        times = interleaved({
            "fp32 oneDNN (channels last)": lambda: F.conv2d(x, weight, None, stride, padding),
            "ours W8A8 static": lambda: static(x),
            "ours W8A8 dynamic": lambda: dynamic(x),
        }, runs)
        rows.append({"layer": label, "input": list(shape), "out_channels": out_channels, "ms": times,
                     "speedup_static": times["fp32 oneDNN (channels last)"] / times["ours W8A8 static"],
                     "speedup_dynamic": times["fp32 oneDNN (channels last)"] / times["ours W8A8 dynamic"]})
        print(f"{label:26s} " + "  ".join(f"{k} {v:7.2f}" for k, v in times.items()), flush=True)
    return rows


def torch_ao_static(model: torch.nn.Module, calibration) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calibration[0],))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared)


def ours(fp: torch.nn.Module, config, calibration, example, static: bool) -> torch.nn.Module:
    model = quantize_convs_(copy.deepcopy(fp), config)
    if static:
        ptq.calibrate(model, calibration, method="minmax", progress=False)
    with torch.no_grad():
        qk.convert_for_runtime(model, example)
    return model


def bench_end_to_end(batches, runs: int):
    import torchvision

    torch.manual_seed(0)
    fp = torchvision.models.resnet50().eval()
    fp_channels_last = copy.deepcopy(fp).to(memory_format=torch.channels_last)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        calibration = [torch.randn(2, 3, 224, 224) for _ in range(2)]
        models = {"ours W8A8 static": ours(fp, qk.W8A8(), calibration, x[:1], True),
                  "ours W8A8 dynamic": ours(fp, qk.W8A8(), calibration, x[:1], False),
                  "ours W4A4 static": ours(fp, qk.W4A4(), calibration, x[:1], True)}
        baselines = {}
        try:
            baselines["torch.ao static int8 (x86)"] = torch_ao_static(fp, calibration)
        except Exception as error:  # noqa: BLE001  (reported, not hidden)
            print(f"torch.ao static int8 did not run: {type(error).__name__}: {error}")
        x_last = x.contiguous(memory_format=torch.channels_last)
        variants = {"fp32 eager (NCHW)": lambda: fp(x), "fp32 eager (channels last)": lambda: fp_channels_last(x_last)}
        variants.update({name: (lambda m=m: m(x)) for name, m in baselines.items()})
        variants.update({name: (lambda m=m: m(x)) for name, m in models.items()})
        times = interleaved(variants, runs)
        with torch.no_grad():
            reference = fp(x)
            quality = {name: sqnr_db(reference, m(x)) for name, m in {**baselines, **models}.items()}
        base = times["fp32 eager (channels last)"]
        rows.append({"batch": batch, "ms": times, "speedup_vs_fp32_channels_last": {k: base / v for k, v in times.items()},
                     "speedup_vs_fp32_nchw": {k: times["fp32 eager (NCHW)"] / v for k, v in times.items()},
                     "sqnr_db_vs_fp32": quality})
        print(f"ResNet-50 batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()), flush=True)
    return rows


def plot(report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    layers = report["layers"]
    names = [row["layer"] for row in layers]
    axes[0].barh(names, [row["speedup_static"] for row in layers], label="W8A8 static")
    axes[0].barh(names, [row["speedup_dynamic"] for row in layers], alpha=0.6, label="W8A8 dynamic")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("speed-up vs fp32 oneDNN channels last (batch 8)")
    axes[0].legend()
    for row in report["end_to_end"]:
        labels = list(row["speedup_vs_fp32_channels_last"])
        axes[1].barh([f"b{row['batch']} {label}" for label in labels], list(row["speedup_vs_fp32_channels_last"].values()))
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("ResNet-50 speed-up vs fp32 eager channels last")
    fig.suptitle(f"{report['cpu']} ({report['isa']}, {report['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not qk.backends()["cpu"].available:
        raise SystemExit(f"the cpu backend is not available: {qk.backends()['cpu']}")
    torch.set_num_threads(args.threads)
    report = {"cpu": cpu.cpu_name(), "isa": cpu.describe(), "threads": args.threads, "torch": torch.__version__,
              "runs": args.runs, "layers": bench_layers(args.runs, args.quick),
              "end_to_end": bench_end_to_end([int(b) for b in args.batches.split(",")] if not args.quick else [1],
                                             args.runs)}
    name = cpu.cpu_name().replace(" ", "_").replace("(R)", "")
    out = Path(args.out or Path(__file__).parent / "results" / f"conv_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
