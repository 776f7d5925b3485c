"""Host (Python) overhead of the runtime path: what a call costs before any arithmetic matters.

    python benchmarks/bench_host.py [--calls 2000] [--repeats 7]

Measures, on the reference backend on CPU with one thread, in the calibration form and converted
(`convert_for_runtime`: frozen plans):
- a QuantLinear call at M = 1, K = N = 64 (W8A8, dynamic activations), where the GEMM itself is
  a few microseconds, so the time is the host path: validation, backend resolution, per-call
  operand work;
- the Python frames from `QuantLinear.forward` down to the fused linear's reference body;
- a fused ViT-tiny block (`fuse_blocks`) at batch 1 (197 tokens), for scale.
Prints medians of `--repeats` runs of `--calls` calls each, and the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

import qla_kernels as qk
from qla_kernels.ops import reference


def _per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(min(calls, 100)):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def frames_to_kernel(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Python frames between layer.forward and reference.fused_linear (both excluded)."""
    depth = {"now": 0, "start": None, "found": None}
    target = reference.fused_linear.__code__
    forward = type(layer).forward.__code__

    def profile(frame, event, arg):
        if event == "call":
            depth["now"] += 1
            if frame.f_code is forward and depth["start"] is None:
                depth["start"] = depth["now"]
            if frame.f_code is target and depth["found"] is None and depth["start"] is not None:
                depth["found"] = depth["now"] - depth["start"] - 1
        elif event == "return":
            depth["now"] -= 1

    sys.setprofile(profile)
    try:
        layer(x)
    finally:
        sys.setprofile(None)
    return depth["found"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = qk.QuantLinear.from_float(torch.nn.Linear(64, 64), qk.W8A8())
    x = torch.randn(1, 64)
    lines = []
    with torch.no_grad(), qk.use_backend("reference"):
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
        qk.quantize_(model, qk.W8A8())
        image = torch.randn(1, 3, 224, 224)
        qk.fuse_blocks(model, image)
        block = model.blocks[0]
        tokens = model._pos_embed(model.patch_embed(image))
        for form in ("calibration form", "converted"):
            if form == "converted":
                qk.convert_for_runtime(torch.nn.Sequential(layer))
                qk.convert_for_runtime(model)
            linear_us = _per_call_us(lambda: layer(x), args.calls, args.repeats)
            frames = frames_to_kernel(layer, x)
            block_us = _per_call_us(lambda: block(tokens), max(args.calls // 20, 10), args.repeats)
            lines.append(f"{form}: QuantLinear W8A8 M=1 K=N=64 {linear_us:.1f} us per call, {frames} Python frames "
                         f"from forward to the op body; fused ViT-tiny block ({type(block).__name__}), batch 1: "
                         f"{block_us:.0f} us per call")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, reference backend")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
