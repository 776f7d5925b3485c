"""QwT calibration time: ViT-B/16 (random weights are fine for timing) on 512 images, batch 32.

    python benchmarks/bench_qwt.py [--model vit_base_patch16_224] [--images 512] [--batch 32]

Times qk.quantize_ (W4A8) + qk.methods.qwt.calibrate end to end on the available device (GPU
when present; on CPU use a small model, e.g. --model vit_tiny_patch16_224 --images 64) and writes
benchmarks/results/qwt_<device>_<date>.json. The QwT paper reports "under 2 minutes".
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import qla_kernels as qk
from qla_kernels.methods import qwt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    import timm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    batches = [torch.randn(args.batch, 3, 224, 224, device=device) for _ in range(args.images // args.batch)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    quantized = qk.quantize_(copy.deepcopy(model), qk.W4A8())
    quantize_s = time.perf_counter() - start
    reports = qwt.calibrate(model, quantized, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "model": args.model,
        "images": len(batches) * args.batch, "batch": args.batch, "quantize_s": quantize_s, "total_s": total_s,
        "blocks_kept": sum(r.enabled for r in reports), "blocks": len(reports),
    }
    print(json.dumps(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"qwt_{name.replace(' ', '_')}_{result['date']}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
