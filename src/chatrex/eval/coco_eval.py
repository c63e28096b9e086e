"""Detection metrics: greedy one-to-one matching at an IoU threshold (recall / precision of filtered
proposals) and class-agnostic or per-category COCO AP via pycocotools.

Boxes are ``xyxy`` pixels of the original image unless a function says otherwise; COCO json boxes
are ``xywh`` and converted only through ``chatrex.ops.boxes``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from chatrex.ops.boxes import box_iou, box_xyxy_to_xywh

__all__ = ["greedy_match", "RecallPrecision", "recall_precision", "coco_ap", "coco_dataset"]


def greedy_match(pred: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor, iou: float = 0.5) -> torch.Tensor:
    """COCO-style matching of one image: predictions in descending score order each take the
    unmatched ground-truth box of highest IoU >= ``iou``.

    pred (N, 4) xyxy, scores (N,), gt (M, 4) xyxy. Returns (N,) int64: the matched gt index, or -1
    (a false positive: no box left, or a duplicate of an already matched one).
    """
    out = torch.full((pred.shape[0],), -1, dtype=torch.int64)
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return out
    ious = box_iou(pred.double(), gt.double())[0]  # (N, M)
    taken = torch.zeros(gt.shape[0], dtype=torch.bool)
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        cand = ious[i].masked_fill(taken, -1.0)
        j = int(torch.argmax(cand))
        if cand[j] >= iou:
            out[i], taken[j] = j, True
    return out


class RecallPrecision:
    """Accumulates matched / predicted / ground-truth counts over images."""

    def __init__(self, iou: float = 0.5) -> None:
        self.iou = iou
        self.tp = self.n_pred = self.n_gt = self.gt_found = 0

    def add(self, pred: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor,
            gt_counted: torch.Tensor | None = None) -> None:
        """Add one image. ``gt_counted`` (M,) bool marks the gt boxes that count for recall (e.g. only
        objects >= min_size px); every gt box may still absorb a prediction (not a false positive)."""
        match = greedy_match(pred, scores, gt, self.iou)
        counted = torch.ones(gt.shape[0], dtype=torch.bool) if gt_counted is None else gt_counted.bool()
        found = torch.zeros(gt.shape[0], dtype=torch.bool)
        found[match[match >= 0]] = True
        self.tp += int((match >= 0).sum())
        self.n_pred += int(pred.shape[0])
        self.n_gt += int(counted.sum())
        self.gt_found += int((found & counted).sum())

    def result(self) -> dict[str, float]:
        """recall (of counted gt), precision (of predictions), and the raw counts."""
        recall = self.gt_found / self.n_gt if self.n_gt else 1.0
        precision = self.tp / self.n_pred if self.n_pred else 1.0
        return {"recall": recall, "precision": precision, "num_gt": self.n_gt, "num_pred": self.n_pred,
                "true_positives": self.tp}


def recall_precision(preds: Sequence[tuple[torch.Tensor, torch.Tensor]], gts: Sequence[torch.Tensor],
                     iou: float = 0.5, counted: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
    """Recall of ground truth and precision of predictions over a set of images (see RecallPrecision).

    preds: per image (boxes (N, 4) xyxy, scores (N,)), already filtered; gts: per image (M, 4) xyxy;
    counted: optional per image (M,) bool of the gt boxes recall counts.
    """
    acc = RecallPrecision(iou)
    for k, ((boxes, scores), gt) in enumerate(zip(preds, gts)):
        acc.add(boxes, scores, gt, None if counted is None else counted[k])
    return acc.result()


def coco_dataset(images: Sequence[Mapping[str, Any]], boxes_xyxy: Sequence[torch.Tensor],
                 category_ids: Sequence[Sequence[int]] | None = None,
                 categories: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """A COCO ground-truth dict from per-image xyxy boxes (class-agnostic: category 1 when no ids)."""
    anns, ann_id = [], 1
    for k, (img, boxes) in enumerate(zip(images, boxes_xyxy)):
        xywh = box_xyxy_to_xywh(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4))
        for j, b in enumerate(xywh.tolist()):
            cat = 1 if category_ids is None else int(category_ids[k][j])
            anns.append({"id": ann_id, "image_id": img["id"], "category_id": cat, "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0})
            ann_id += 1
    cats = list(categories) if categories is not None else [{"id": 1, "name": "object"}]
    return {"images": [dict(i) for i in images], "annotations": anns, "categories": cats}


def coco_ap(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], class_agnostic: bool = True,
            max_dets: int = 100) -> dict[str, float]:
    """COCO bbox AP / AP50 / AP75 / AR@max_dets via pycocotools.

    gt: a COCO dict (images, annotations, categories); detections: ``{"image_id", "bbox" (xywh px),
    "score", "category_id"}`` dicts. ``class_agnostic`` maps every category to 1 on both sides (the
    proposal metric). pycocotools' console output is swallowed. No detections give 0 AP.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    dets = [dict(d) for d in detections]
    if class_agnostic:
        for a in gt["annotations"]:
            a["category_id"] = 1
        for d in dets:
            d["category_id"] = 1
        gt["categories"] = [{"id": 1, "name": "object"}]
    for a in gt["annotations"]:
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
    if not dets or not gt["annotations"]:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, f"AR@{max_dets}": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"info": {}, **gt}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(max(s, 0.0)) for s in np.asarray(ev.stats)]
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2], f"AR@{max_dets}": stats[8]}
