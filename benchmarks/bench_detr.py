"""DETR on the kernels (CPU): model size, latency and mAP of fp32, W8A8 and fully 4-bit AQ-DETR.

    python benchmarks/bench_detr.py [--runs 9] [--threads 2] [--batches 1,8] [--steps N] [--out ...]

The model is the shipped synthetic-shapes teacher (tests/shapes_detr.py: Conditional DETR,
ResNet backbone, 64×64 images); mAP (pycocotools) and matching rate on its 500 validation images.
- fp32: the teacher, eager.
- torch.ao dynamic int8: `quantize_dynamic` of every nn.Linear (the convolutions stay fp32):
  what a CPU user would pick first.
- W8A8 (ours): every linear and convolution W8A8, static per-tensor activation scales (min-max
  PTQ on 64 training images; the stem too), fp32 attention; converted for runtime.
- W4A4 AQ-DETR (ours): the `lsq_aq_lld` variant (W4A4 linears and convolutions, stem W8A8,
  4-bit q, k, A, v in the quantized attention core) after `--steps` QAT steps, exported and
  converted for runtime.
Sizes are each model's state dict as torch.save writes it (ours before runtime conversion, i.e.
what save_quantized stores): W4A4 linears keep their 4-bit codes in int8 (the int8 tensor cores
read them so), convolutions pack them two per byte. Latency: the variants interleaved run by run, median of --runs, images
from the validation split. Writes JSON and a PNG beside it, labelled with the CPU and ISA path.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qla_kernels as qk  # noqa: E402
from bench_conv import interleaved  # noqa: E402
from qla_kernels.apps.detection import evaluate  # noqa: E402
from qla_kernels.methods import aqdetr, ptq  # noqa: E402
from qla_kernels.nn.quant_conv import quantize_convs_  # noqa: E402
from qla_kernels.ops import cpu  # noqa: E402
from tests import shapes_detr  # noqa: E402


def tensor_bytes(model: torch.nn.Module) -> int:
    """The size of the model's state dict as torch.save writes it (torch.ao's packed weights too)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def w8a8(teacher, calibration, example):
    model = quantize_convs_(qk.quantize_(copy.deepcopy(teacher), qk.W8A8()), qk.W8A8())
    ptq.calibrate(model, [{"pixel_values": calibration[i:i + 16]} for i in range(0, len(calibration), 16)],
                  method="minmax", progress=False)
    size = tensor_bytes(model)
    with torch.no_grad():
        qk.convert_for_runtime(model, {"pixel_values": example})
    return model, size


def w4a4(steps: int, example):
    student, report = shapes_detr.quantization_aware("lsq_aq_lld", seed=0, steps=steps, progress=True)
    model = aqdetr.export(student)
    size = tensor_bytes(model)
    with torch.no_grad():
        qk.convert_for_runtime(model, {"pixel_values": example})
    return model, size, report.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=shapes_detr.QAT_STEPS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not qk.backends()["cpu"].available:
        raise SystemExit(f"the cpu backend is not available: {qk.backends()['cpu']}")
    torch.set_num_threads(args.threads)
    images, _ = shapes_detr.split("train", shapes_detr.QAT_IMAGES)
    val_images, val_targets = shapes_detr.split("val", shapes_detr.VAL_IMAGES)
    teacher = shapes_detr.teacher()
    calibration = images[:shapes_detr.CALIBRATION_IMAGES]
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher), {torch.nn.Linear}, dtype=torch.qint8)
    ours8, size8 = w8a8(teacher, calibration, val_images[:1])
    ours4, size4, qat_seconds = w4a4(args.steps, val_images[:1])
    models = {"fp32": (teacher, tensor_bytes(teacher)), "torch.ao dynamic int8": (dynamic, tensor_bytes(dynamic)),
              "W8A8 (ours)": (ours8, size8), "W4A4 AQ-DETR (ours)": (ours4, size4)}
    rows = []
    for name, (model, size) in models.items():
        metrics = evaluate(model, val_images, val_targets)
        rows.append({"model": name, "bytes": size, **metrics})
        print(f"{name}: {size / 1e6:.2f} MB, mAP {metrics['map']:.3f}, matching rate {metrics['matching_rate']:.3f}")
    latency = {}
    for batch in (int(b) for b in args.batches.split(",")):
        x = val_images[:batch]
        latency[batch] = interleaved({name: (lambda m=model: m(pixel_values=x)) for name, (model, _) in models.items()},
                                     args.runs)
        print(f"batch {batch}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in latency[batch].items()))
    for row in rows:
        row["latency_ms"] = {str(batch): times[row["model"]] for batch, times in latency.items()}
    name = cpu.cpu_name().replace(" ", "_").replace("(R)", "")
    report = {"cpu": cpu.cpu_name(), "isa": cpu.describe(), "threads": args.threads, "torch": torch.__version__,
              "runs": args.runs, "qat_steps": args.steps, "qat_seconds": qat_seconds, "image_size": [64, 64],
              "val_images": shapes_detr.VAL_IMAGES, "rows": rows}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"detr_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [row["model"] for row in rows]
    batches = list(rows[0]["latency_ms"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].barh(names, [row["bytes"] / 1e6 for row in rows])
    axes[0].set_xlabel("state dict, torch.save (MB)")
    axes[1].barh(names, [row["map"] for row in rows])
    axes[1].set_xlabel("val mAP (pycocotools)")
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        axes[2].barh([y + i * width for y in range(len(rows))], [row["latency_ms"][batch] for row in rows],
                     height=width, label=f"batch {batch}")
    axes[2].set_yticks([y + width * (len(batches) - 1) / 2 for y in range(len(rows))], names)
    axes[2].set_xlabel("latency (ms, median)")
    axes[2].legend()
    for axis in axes[1:]:
        axis.set_yticklabels([])
    fig.suptitle(f"synthetic-shapes Conditional DETR — {report['cpu']} ({report['isa']}, "
                 f"{report['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
