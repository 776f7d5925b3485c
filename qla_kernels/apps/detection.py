"""Evaluating set-prediction detectors (DETR and its kin): COCO mAP through pycocotools, and the
matching rate that AQ-DETR's "matching collapse" is about.

Both take per-class probabilities [images, queries, classes] (`class_probabilities` makes them
from DETR's softmax logits with a trailing no-object class, or from the sigmoid logits of
Conditional / Deformable DETR), boxes as normalized cx, cy, w, h, and targets in DETR's label
format (`class_labels`, `boxes`), so they serve any model of that interface.
"""

from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence, Tuple

import torch


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of normalized cx, cy, w, h boxes: [n, 4] × [m, 4] → [n, m]."""
    a, b = _xyxy(a.float()), _xyxy(b.float())
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(dim=-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(dim=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-12)


def class_probabilities(logits: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[images, queries, num_labels] probabilities: softmax without the no-object column when the
    logits have num_labels + 1 columns (DETR), sigmoid when they have num_labels (focal-loss
    models: Conditional, Deformable DETR)."""
    if logits.shape[-1] == num_labels + 1:
        return logits.float().softmax(-1)[..., :-1]
    if logits.shape[-1] == num_labels:
        return logits.float().sigmoid()
    raise ValueError(f"logits have {logits.shape[-1]} classes; expected num_labels={num_labels} (sigmoid) or "
                     f"{num_labels + 1} (softmax with no-object)")


def _check(probabilities: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]]) -> None:
    if probabilities.dim() != 3 or boxes.shape != (*probabilities.shape[:2], 4):
        raise ValueError(f"probabilities must be [images, queries, classes] and boxes [images, queries, 4], got "
                         f"{tuple(probabilities.shape)} and {tuple(boxes.shape)}")
    if len(targets) != probabilities.shape[0]:
        raise ValueError(f"{len(targets)} targets for {probabilities.shape[0]} images")
    for index, target in enumerate(targets):
        if "class_labels" not in target or "boxes" not in target:
            raise ValueError(f"target {index} needs 'class_labels' and 'boxes'")
        labels = target["class_labels"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= probabilities.shape[-1]):
            raise ValueError(f"target {index} has a class label outside [0, {probabilities.shape[-1]})")


def mean_average_precision(probabilities: torch.Tensor, boxes: torch.Tensor,
                           targets: Sequence[Dict[str, torch.Tensor]], image_size: Tuple[int, int],
                           one_label_per_query: bool = True, max_detections: int = 100) -> Dict[str, float]:
    """COCO mAP@[.5:.95], mAP@.5 and mAP@.75 of set-prediction outputs, computed by pycocotools.

    With `one_label_per_query` every query is one detection scored by its most likely class
    (DETR's evaluation); without, every (query, class) pair is a candidate and the
    `max_detections` best are kept (Conditional / Deformable DETR's). `image_size` is (height,
    width) in pixels: COCO's area ranges are in pixels."""
    _check(probabilities, boxes, targets)
    if max_detections < 1:
        raise ValueError(f"max_detections must be ≥ 1, got {max_detections}")
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:  # pragma: no cover - a declared dependency of the detection extra
        raise ImportError("mean_average_precision needs pycocotools: pip install pycocotools") from error
    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)

    def xywh(normalized: torch.Tensor) -> torch.Tensor:
        corners = _xyxy(normalized.float()) * scale
        return torch.cat((corners[:, :2], corners[:, 2:] - corners[:, :2]), dim=1)

    classes = probabilities.shape[-1]
    annotations, detections = [], []
    for image, target in enumerate(targets):
        for label, box in zip(target["class_labels"].tolist(), xywh(target["boxes"]).tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": label, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
        if one_label_per_query:
            scores, labels = probabilities[image].float().max(dim=-1)
            queries = torch.arange(scores.numel())
        else:
            flat = probabilities[image].float().flatten()
            scores, index = flat.topk(min(max_detections, flat.numel()))
            queries, labels = index // classes, index % classes
        image_boxes = xywh(boxes[image][queries])
        for score, label, box in zip(scores.tolist(), labels.tolist(), image_boxes.tolist()):
            detections.append({"image_id": image, "category_id": label, "bbox": box, "score": score})
    if not detections:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": [{"id": i, "height": height, "width": width} for i in range(len(targets))],
                         "annotations": annotations, "categories": [{"id": c} for c in range(classes)]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": float(evaluation.stats[0]), "map_50": float(evaluation.stats[1]),
            "map_75": float(evaluation.stats[2])}


@torch.no_grad()
def hungarian_matches(probabilities: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]],
                      class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0
                      ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (query indices, target indices) of DETR's one-to-one Hungarian matching (the
    costs of DETR's HungarianMatcher: −p(class), L1 of the boxes, −GIoU)."""
    _check(probabilities, boxes, targets)
    from scipy.optimize import linear_sum_assignment

    matches = []
    for image, target in enumerate(targets):
        labels, truth = target["class_labels"], target["boxes"].float()
        if labels.numel() == 0:
            empty = torch.empty(0, dtype=torch.long)
            matches.append((empty, empty))
            continue
        predicted = boxes[image].float()
        cost = (bbox_cost * torch.cdist(predicted, truth, p=1) - class_cost * probabilities[image].float()[:, labels]
                - giou_cost * _generalized_iou(predicted, truth))
        queries, objects = linear_sum_assignment(cost.cpu().numpy())
        matches.append((torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(objects, dtype=torch.long)))
    return matches


def _generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    iou = box_iou(a, b)
    a, b = _xyxy(a), _xyxy(b)
    enclosing = (torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2]))
    enclosing = enclosing.clamp_min(0).prod(dim=-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(dim=-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(dim=-1)
    inter = iou * (area_a[:, None] + area_b[None, :]) / (1 + iou)
    union = area_a[:, None] + area_b[None, :] - inter
    return iou - (enclosing - union) / enclosing.clamp_min(1e-12)


def matching_rate(probabilities: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]],
                  iou_threshold: float = 0.5) -> float:
    """The fraction of ground-truth objects whose Hungarian-matched prediction is a detection:
    its box overlaps the object by IoU ≥ `iou_threshold` and its most likely class is the
    object's.

    One-to-one matching always pairs every object with some query, so the count of pairs says
    nothing; what collapses under quantization (AQ-DETR's "matching collapse") is how many of
    those pairs are real detections that the loss can reinforce."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    hits = objects = 0
    for image, (queries, matched) in enumerate(hungarian_matches(probabilities, boxes, targets)):
        target = targets[image]
        objects += int(target["class_labels"].numel())
        if queries.numel() == 0:
            continue
        overlap = box_iou(boxes[image][queries], target["boxes"][matched]).diagonal()
        predicted = probabilities[image][queries].argmax(dim=-1)
        hits += int(((overlap >= iou_threshold) & (predicted == target["class_labels"][matched])).sum())
    return hits / max(objects, 1)


@torch.no_grad()
@torch.no_grad()
def _outputs(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    logits, boxes = [], []
    for start in range(0, images.shape[0], batch_size):
        output = model(pixel_values=images[start:start + batch_size])
        logits.append(output.logits.float())
        boxes.append(output.pred_boxes.float())
    return torch.cat(logits), torch.cat(boxes)


def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-class probabilities, boxes) of a DETR-style model (`pixel_values` → `.logits`,
    `.pred_boxes`; `model.config.num_labels` classes) on `images`, in batches."""
    logits, boxes = _outputs(model, images, batch_size)
    return class_probabilities(logits, model.config.num_labels), boxes


def evaluate(model: torch.nn.Module, images: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]],
             batch_size: int = 64) -> Dict[str, float]:
    """mAP (pycocotools), mAP@.5, mAP@.75 and matching rate of `model` on `images` with `targets`,
    scored as the model family is (one label per query for softmax models, the best
    (query, class) pairs for sigmoid ones)."""
    logits, boxes = _outputs(model, images, batch_size)
    num_labels = model.config.num_labels
    probabilities = class_probabilities(logits, num_labels)
    one_label_per_query = logits.shape[-1] == num_labels + 1
    metrics = mean_average_precision(probabilities, boxes, targets, tuple(images.shape[-2:]), one_label_per_query)
    metrics["matching_rate"] = matching_rate(probabilities, boxes, targets)
    return metrics
