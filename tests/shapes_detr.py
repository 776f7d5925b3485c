"""A synthetic detection set and a small Hugging Face DETR trained on it: the fixture of the
detection tests and benchmarks (no dataset can be downloaded at run time).

Images are 64×64 RGB: a smooth random texture (low-resolution noise upsampled, plus stripes of a
random frequency and angle) with one to four objects of three classes (ellipse, rectangle,
triangle) at random positions, sizes (10 to 26 pixels), aspect ratios and colours; later objects
occlude earlier ones, and two objects overlap by at most IoU 0.3, so every box stays findable. The
boxes are the tight boxes of the drawn masks. The split is deterministic in its seed.

The teacher is `DetrForObjectDetection` with Hugging Face's own ResNet backbone
(`use_timm_backbone=False`: DetrFrozenBatchNorm2d everywhere) cut to two stages (stride 8, so an
8×8 feature map), d_model 64, two encoder and two decoder layers, 10 queries, auxiliary decoding
losses on. Reproduce the shipped weights with

    python -m tests.shapes_detr        (writes tests/data/shapes_detr.safetensors, prints its mAP)
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA / "shapes_detr.safetensors"
CLASSES = ("ellipse", "rectangle", "triangle")
SIZE = 64
MAX_OBJECTS = 4
MEAN, STD = 0.5, 0.25


def _background(generator: torch.Generator) -> torch.Tensor:
    noise = torch.rand(3, 6, 6, generator=generator)
    texture = F.interpolate(noise[None], size=(SIZE, SIZE), mode="bicubic", align_corners=False)[0]
    angle, frequency = (torch.rand(2, generator=generator) * torch.tensor([math.pi, 0.5]) + torch.tensor([0.0, 0.2]))
    ys, xs = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    stripes = 0.1 * torch.sin(frequency * (xs * torch.cos(angle) + ys * torch.sin(angle)))
    return (0.25 + 0.5 * texture + stripes).clamp(0, 1)


def _mask(kind: int, cx: float, cy: float, w: float, h: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIZE).float() + 0.5, torch.arange(SIZE).float() + 0.5, indexing="ij")
    u, v = (xs - cx) / (w / 2), (ys - cy) / (h / 2)
    if kind == 0:
        return u.square() + v.square() <= 1
    if kind == 1:
        return (u.abs() <= 1) & (v.abs() <= 1)
    return (v <= 1) & (v >= -1) & (u.abs() <= (v + 1) / 2)  # apex up, base at the bottom


def _box_iou(a: Tuple[float, ...], b: Tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def render(count: int, seed: int) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]]]:
    """`count` images (normalized, [count, 3, 64, 64]) and their targets in DETR's label format
    (class_labels, boxes as normalized cx, cy, w, h)."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = torch.empty(count, 3, SIZE, SIZE), []

    def uniform(lo, hi):
        return float(lo + (hi - lo) * torch.rand((), generator=generator))

    for index in range(count):
        image = _background(generator)
        placed: List[Tuple[float, ...]] = []
        labels, boxes = [], []
        for _ in range(int(torch.randint(1, MAX_OBJECTS + 1, (), generator=generator))):
            for _attempt in range(20):
                kind = int(torch.randint(len(CLASSES), (), generator=generator))
                w = uniform(10, 26)
                h = w * uniform(0.7, 1.4)
                cx, cy = uniform(w / 2, SIZE - w / 2), uniform(h / 2, SIZE - h / 2)
                mask = _mask(kind, cx, cy, w, h)
                if not mask.any():
                    continue
                rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
                box = (float(cols.min()), float(rows.min()), float(cols.max()) + 1, float(rows.max()) + 1)
                if all(_box_iou(box, other) <= 0.3 for other in placed):
                    break
            else:
                continue
            colour = torch.rand(3, generator=generator)
            colour = torch.where(torch.rand(3, generator=generator) < 0.5, colour * 0.3, 0.7 + 0.3 * colour)
            image[:, mask] = colour[:, None]
            placed.append(box)
            labels.append(kind)
            x0, y0, x1, y1 = box
            boxes.append([(x0 + x1) / 2 / SIZE, (y0 + y1) / 2 / SIZE, (x1 - x0) / SIZE, (y1 - y0) / SIZE])
        images[index] = (image - MEAN) / STD
        targets.append({"class_labels": torch.tensor(labels, dtype=torch.long),
                        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)})
    return images, targets


TRAIN_SEED, VAL_SEED = 0, 1


@functools.lru_cache(maxsize=None)
def split(name: str, count: int) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]]]:
    """The named split ("train" or "val") of `count` images: the same on every machine."""
    return render(count, {"train": TRAIN_SEED, "val": VAL_SEED}[name])


def config(kind: str = "conditional"):
    import transformers

    backbone = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                         layer_type="basic", out_features=["stage2"])
    if kind == "detr":
        make = functools.partial(transformers.DetrConfig, use_timm_backbone=False)
    else:
        make = transformers.ConditionalDetrConfig
    return make(
        use_pretrained_backbone=False, backbone_config=backbone,
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10, num_labels=len(CLASSES), auxiliary_loss=True,
        dropout=0.0, attention_dropout=0.0, id2label=dict(enumerate(CLASSES)),
        label2id={name: i for i, name in enumerate(CLASSES)})


def architecture(kind: str = "conditional"):
    import transformers

    classes = {"detr": transformers.DetrForObjectDetection,
               "conditional": transformers.ConditionalDetrForObjectDetection}
    model = classes[kind](config(kind))
    model.requires_grad_(True)  # DETR freezes its stem for pretrained backbones; this one trains from scratch
    return model


TRAIN_IMAGES, VAL_IMAGES = 8000, 500
STEPS, BATCH, LR = 20000, 32, 2e-4


def train(seed: int = 0, steps: int = STEPS, log_every: int = 2000) -> torch.nn.Module:
    """The recipe behind the shipped teacher: AdamW (lr 2e-4, weight decay 1e-4), 500 warm-up
    steps then cosine decay, gradient norm clipped at 0.1 (DETR's), batches of 32 drawn from 8000
    training images; DETR's own Hungarian loss with auxiliary decoding losses."""
    from qla_kernels.apps.detection import evaluate

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, targets = split("train", TRAIN_IMAGES)
    val_images, val_targets = split("val", VAL_IMAGES)
    model = architecture()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    warmup = 500
    def factor(step):
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start = time.time()
    for step in range(steps):
        model.train()
        index = torch.randint(TRAIN_IMAGES, (BATCH,), generator=generator)
        output = model(pixel_values=images[index], labels=[targets[i] for i in index.tolist()])
        optimizer.zero_grad()
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            metrics = evaluate(model, val_images, val_targets)
            print(f"step {step + 1}: loss {output.loss.item():.3f}, val mAP {metrics['map']:.3f} "
                  f"(@.5 {metrics['map_50']:.3f}), matching rate {metrics['matching_rate']:.3f}, "
                  f"{time.time() - start:.0f} s", flush=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def teacher() -> torch.nn.Module:
    """The shipped teacher (random-weight architecture with the trained weights loaded), eval mode."""
    from safetensors.torch import load_file

    model = architecture()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


def main() -> None:
    from safetensors.torch import save_file

    model = train()
    DATA.mkdir(exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(WEIGHTS))
    print(f"-> {WEIGHTS}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()


# AQ-DETR on the teacher: W4A4 everywhere (stem W8A8), 4-bit attention. n_A = 3× the object
# queries (the paper's 300 beside 100), the ground truth replicated K = 3 times (up to 12 targets
# for 30 auxiliary queries).
def variants():
    from qla_kernels.methods.aqdetr import AQDETRConfig

    return {"lsq": AQDETRConfig(),
            "lsq_aq": AQDETRConfig(auxiliary_queries=30, replicas=3),
            "lsq_aq_lld": AQDETRConfig(auxiliary_queries=30, replicas=3, distillation=1.0)}


# 150 steps of 16 from the first 2000 training images: ~15 s per variant on 2 cores, the budget
# of the several-seed table. CI trains 50 (~8 s each): over seeds 0-2 every variant there is at
# least 0.13 above the untrained student in mAP and matching rate (results/aqdetr_variants_50steps.json).
QAT_STEPS, QAT_BATCH, QAT_IMAGES, CALIBRATION_IMAGES = 150, 16, 2000, 64
CI_QAT_STEPS = 50


def quantization_aware(variant: str, seed: int, steps: int = QAT_STEPS, progress: bool = False):
    """(student, report): `variant` of `variants()` trained from the shipped teacher for `steps`."""
    from qla_kernels.methods import aqdetr

    torch.manual_seed(seed)
    images, targets = split("train", QAT_IMAGES)
    student = aqdetr.prepare(teacher(), variants()[variant], images[:CALIBRATION_IMAGES], progress=progress)
    report = aqdetr.train(student, images, targets, steps, batch_size=QAT_BATCH, seed=seed, progress=progress)
    return student, report
