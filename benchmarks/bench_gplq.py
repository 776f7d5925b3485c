"""GPLQ cost: stage-1 time and training memory against fp32 training of the same model.

    python benchmarks/bench_gplq.py [--model vit_small_patch16_224] [--images 256] [--batch 32] [--img-size 224]

Runs on the available device with random weights and images (cost only, not accuracy):
fp32 training (AdamW on every parameter, cross-entropy: the baseline the GPLQ paper compares
memory with), GPLQ stage 1 with trained and with frozen fp32 weights, and stage 2 (weight PTQ +
QwT), all W4A4 over the same batches. Memory: on CUDA the allocator's peak during the run; on
CPU an accounting of the same quantities, labelled as such: bytes resident in models + gradients
+ optimizer state + the largest set of tensors one step's autograd graph saved. Writes
benchmarks/results/gplq_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn

import qla_kernels as qk
from qla_kernels.methods import gplq


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def model_bytes(model: nn.Module) -> int:
    return _bytes(list(model.parameters()) + list(model.buffers()))


class TrainingMemory:
    """CPU accounting of a training run: per optimizer step, the storages its autograd graph saved
    (parameters and views of them excluded: they are resident anyway) and the optimizer's gradients and state."""

    def __init__(self, resident_bytes: int):
        self.resident_bytes = resident_bytes
        self.step_saved: Dict[int, int] = {}
        self.peak_saved = 0
        self.peak_optimizer = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if not isinstance(tensor, nn.Parameter) and not isinstance(tensor._base, nn.Parameter):
            self.step_saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    def _after_step(self, optimizer, args, kwargs):
        self.peak_saved = max(self.peak_saved, sum(self.step_saved.values()))
        self.step_saved.clear()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        self.peak_optimizer = max(self.peak_optimizer, _bytes([p.grad for p in params]) + _bytes(state))

    @contextlib.contextmanager
    def track(self):
        handle = register_optimizer_step_post_hook(self._after_step)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            handle.remove()

    def total(self) -> int:
        return self.resident_bytes + self.peak_optimizer + self.peak_saved


def measure(run: Callable[[], object], resident_bytes: int, device: torch.device) -> dict:
    """Seconds and peak memory (bytes) of `run`, counting `resident_bytes` of models it needs that
    were allocated before it (on CUDA, everything else allocated before the run is left out)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start,
                "peak_bytes": torch.cuda.max_memory_allocated() - before + resident_bytes,
                "memory_kind": "cuda allocator peak"}
    tracker = TrainingMemory(resident_bytes)
    start = time.perf_counter()
    with tracker.track():
        run()
    return {"seconds": time.perf_counter() - start, "peak_bytes": tracker.total(),
            "saved_activation_bytes": tracker.peak_saved, "optimizer_bytes": tracker.peak_optimizer,
            "resident_bytes": tracker.resident_bytes, "memory_kind": "cpu accounting (models + grads + state + saved)"}


def fp32_training(model: nn.Module, batches, labels, lr: float = 1e-5) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.eval()  # as GPLQ's stage 1: no dropout
    for x, y in zip(batches, labels):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run(model: nn.Module, batches, labels, config=qk.W4A4()) -> dict:
    """fp32 training, GPLQ stage 1 (weights trained / frozen) and stage 2 of `model` over `batches`."""
    device = batches[0].device
    one_model = model_bytes(model)
    result = {"config": str(config), "parameters": sum(p.numel() for p in model.parameters())}
    result["fp32_training"] = measure(functools.partial(fp32_training, copy.deepcopy(model), batches, labels),
                                      one_model, device)
    students = {}
    for name, train_weights in (("gplq_stage1", True), ("gplq_stage1_frozen_weights", False)):
        def stage1(train_weights=train_weights, name=name):
            students[name] = gplq.activation_qat(model, config, batches, train_weights=train_weights, progress=False)
        result[name] = measure(stage1, one_model, device)  # the teacher; the student is created inside
        if device.type != "cuda":
            result[name]["peak_bytes"] += one_model  # the accounting cannot see the student's allocation
    student, report = students.pop("gplq_stage1")
    students.clear()
    result["stage1_steps"] = report.steps
    result["gplq_stage2"] = measure(lambda: gplq.weight_ptq(student, model, config, batches, progress=False),
                                    2 * one_model, device)
    baseline = result["fp32_training"]["peak_bytes"]
    for name in ("gplq_stage1", "gplq_stage1_frozen_weights"):
        result[f"{name}_memory_vs_fp32_training"] = result[name]["peak_bytes"] / baseline
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    import timm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).to(device).eval()
    count = max(1, args.images // args.batch)
    batches = [torch.randn(args.batch, 3, args.img_size, args.img_size, device=device) for _ in range(count)]
    labels = [torch.randint(0, model.num_classes, (args.batch,), device=device) for _ in range(count)]
    result = run(model, batches, labels)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result.update({"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "model": args.model, "images": count * args.batch, "batch": args.batch, "img_size": args.img_size})
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gplq_{name.replace(' ', '_')}_{result['date']}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
