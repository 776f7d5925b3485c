"""AQ-DETR's variants on the synthetic-shapes teacher, over several seeds: the table of the note.

    python benchmarks/aqdetr_variants.py [--seeds 0 1 2] [--steps N] [--threads 2] [--out ...]

Per seed (quantizer initialisation is deterministic; the seed draws the auxiliary queries'
initial embeddings and the QAT batches), each variant of tests/shapes_detr.variants() is trained
for --steps from the shipped teacher and evaluated on the 500 validation images: mAP@[.5:.95],
mAP@.5 (pycocotools) and the matching rate (methods: apps/detection.matching_rate), with the
teacher's and the untrained W4A4 student's (PTQ initialisation) for scale. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qla_kernels.apps.detection import evaluate  # noqa: E402
from qla_kernels.methods import aqdetr  # noqa: E402
from qla_kernels.ops import cpu  # noqa: E402
from tests import shapes_detr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=shapes_detr.QAT_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aqdetr_variants.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    val_images, val_targets = shapes_detr.split("val", shapes_detr.VAL_IMAGES)
    train_images, _ = shapes_detr.split("train", shapes_detr.QAT_IMAGES)
    teacher = shapes_detr.teacher()
    rows = [{"variant": "fp32 teacher", "seed": None, **evaluate(teacher, val_images, val_targets)}]
    untrained = aqdetr.prepare(teacher, aqdetr.AQDETRConfig(), train_images[:shapes_detr.CALIBRATION_IMAGES],
                               progress=False)
    rows.append({"variant": "W4A4 PTQ init (no QAT)", "seed": None, **evaluate(untrained, val_images, val_targets)})
    for seed in args.seeds:
        for variant in shapes_detr.variants():
            student, report = shapes_detr.quantization_aware(variant, seed, args.steps)
            row = {"variant": variant, "seed": seed, "seconds": report.seconds,
                   **evaluate(student, val_images, val_targets)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for variant in shapes_detr.variants():
        runs = [row for row in rows if row["variant"] == variant]
        summary[variant] = {key: {"mean": statistics.mean(r[key] for r in runs), "min": min(r[key] for r in runs),
                                  "max": max(r[key] for r in runs)} for key in ("map", "map_50", "matching_rate")}
    report = {"cpu": cpu.cpu_name(), "threads": args.threads, "torch": torch.__version__, "steps": args.steps,
              "batch_size": shapes_detr.QAT_BATCH, "seeds": args.seeds, "rows": rows, "summary": summary}
    Path(args.out).write_text(json.dumps(report, indent=2))
    for variant, stats in summary.items():
        print(variant, {key: round(value["mean"], 3) for key, value in stats.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
