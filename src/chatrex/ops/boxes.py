"""Box maths: format conversions, areas, IoU / GIoU, NMS, clipping and scaling.

The only place in chatrex where box formats are converted. Formats, all (..., 4):
``xyxy`` = (x1, y1, x2, y2); ``cxcywh`` = (center x, center y, width, height); ``xywh`` =
(x1, y1, width, height). Functions work in any units; callers say which (pixels or normalized).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "batched_nms",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xyxy_to_xywh",
    "clip_boxes_to_image",
    "denormalize_boxes",
    "generalized_box_iou",
    "nms",
    "normalize_boxes",
    "remove_small_boxes",
    "scale_boxes",
]

# Rows of the pairwise IoU matrix computed at once in NMS (bounds the float temporaries).
_NMS_ROW_CHUNK = 2048


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh, computed as w = x2-x1, cx = x1 + w/2 (the ChatRex float order)."""
    x1, y1, x2, y2 = b.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1 + w / 2, y1 + h / 2, w, h], dim=-1)


def box_xywh_to_xyxy(b: Tensor) -> Tensor:
    """(..., 4) xywh (top-left corner + size) -> (..., 4) xyxy."""
    x, y, w, h = b.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_xyxy_to_xywh(b: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) xywh (top-left corner + size)."""
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def box_area(b: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area (x2-x1)*(y2-y1); not clamped, so inverted boxes are negative."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _intersection(b1: Tensor, b2: Tensor) -> Tensor:
    """(N, 4), (M, 4) xyxy -> (N, M) intersection areas (0 when disjoint)."""
    lt = torch.maximum(b1[:, None, :2], b2[None, :, :2])
    rb = torch.minimum(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (iou (N, M), union (N, M))."""
    inter = _intersection(b1, b2)
    union = box_area(b1)[:, None] + box_area(b2)[None, :] - inter
    return inter / union, union


def generalized_box_iou(b1: Tensor, b2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M) in [-1, 1].

    Boxes must not be inverted (x2 >= x1, y2 >= y1); otherwise ValueError.
    """
    for name, b in (("b1", b1), ("b2", b2)):
        if not bool((b[:, 2:] >= b[:, :2]).all()):
            raise ValueError(f"{name} holds inverted boxes (x2 < x1 or y2 < y1); GIoU needs valid xyxy boxes")
    iou, union = box_iou(b1, b2)
    lt = torch.minimum(b1[:, None, :2], b2[None, :, :2])
    rb = torch.maximum(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def _suppression_matrix(boxes: Tensor, iou_threshold: float, groups: Tensor | None) -> Tensor:
    """(n, 4) boxes already in visiting order -> (n, n) bool: IoU(i, j) > threshold (and same group).

    IoU in float32 (float64 boxes stay float64) exactly as torchvision: area = (x2-x1)(y2-y1),
    iou = inter / (area_i + area_j - inter); the comparison is made in float64 against the Python float.
    """
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()
    area = box_area(boxes)
    rows = []
    for i0 in range(0, boxes.shape[0], _NMS_ROW_CHUNK):
        chunk = boxes[i0 : i0 + _NMS_ROW_CHUNK]
        inter = _intersection(chunk, boxes)
        iou = inter / (area[i0 : i0 + _NMS_ROW_CHUNK, None] + area[None, :] - inter)
        sup = iou.double() > iou_threshold  # NaN (0/0) never suppresses
        if groups is not None:
            sup &= groups[i0 : i0 + _NMS_ROW_CHUNK, None] == groups[None, :]
        rows.append(sup)
    return torch.cat(rows)


def _greedy_keep(suppress: Tensor) -> list[int]:
    """Greedy pass over an (n, n) bool matrix in row order -> positions kept."""
    sup = suppress.cpu().numpy()
    removed = np.zeros(sup.shape[0], dtype=bool)
    keep = []
    for i in range(sup.shape[0]):
        if not removed[i]:
            keep.append(i)
            removed[i + 1 :] |= sup[i, i + 1 :]
    return keep


def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float, groups: Tensor | None) -> Tensor:
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"expected boxes (n, 4) and scores (n,), got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # ties: lower index first
    groups = None if groups is None else groups[order]
    keep = _greedy_keep(_suppression_matrix(boxes[order], float(iou_threshold), groups))
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression with torchvision.ops.nms semantics, exactly.

    boxes (n, 4) xyxy, scores (n,). Boxes are visited by descending score (stable: equal scores keep
    index order); a box is dropped when a kept box has IoU > iou_threshold with it (float32 IoU compared
    in float64; 0/0 never suppresses). Returns int64 (k,) indices of kept boxes, by descending score.
    """
    return _nms(boxes, scores, iou_threshold, None)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per category ``idxs`` (n,) int; equal to running `nms` on each category.

    Returns int64 (k,) indices of kept boxes over all categories, by descending score (stable).
    Unlike torchvision's coordinate-offset trick, IoUs are never computed on shifted coordinates.
    """
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must be (n,) like scores, got {tuple(idxs.shape)}")
    return _nms(boxes, scores, iou_threshold, idxs)


def clip_boxes_to_image(boxes: Tensor, size_hw: tuple[int, int] | tuple[float, float]) -> Tensor:
    """Clamp (..., 4) xyxy boxes to an image of size (height, width): x to [0, W], y to [0, H]."""
    h, w = size_hw
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], dim=-1)


def scale_boxes(boxes: Tensor, scale_x: float | Tensor, scale_y: float | Tensor) -> Tensor:
    """Multiply x coordinates by scale_x and y coordinates by scale_y.

    boxes (..., 4) in xyxy, cxcywh or xywh (every format has x, y, x, y units). Scales are floats or
    tensors broadcastable to boxes.shape[:-1] (e.g. per-image widths of shape (B, 1) for (B, Q, 4)).
    """
    a, b, c, d = boxes.unbind(-1)
    return torch.stack([a * scale_x, b * scale_y, c * scale_x, d * scale_y], dim=-1)


def normalize_boxes(boxes: Tensor, size_hw: tuple[float, float]) -> Tensor:
    """Pixels -> normalized: divide x coordinates by width and y coordinates by height (any format)."""
    h, w = size_hw
    a, b, c, d = boxes.unbind(-1)
    return torch.stack([a / w, b / h, c / w, d / h], dim=-1)


def denormalize_boxes(boxes: Tensor, size_hw: tuple[float, float]) -> Tensor:
    """Normalized -> pixels: multiply x coordinates by width and y coordinates by height (any format)."""
    h, w = size_hw
    return scale_boxes(boxes, w, h)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64) of (n, 4) xyxy boxes whose width and height are both >= min_size."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((w >= min_size) & (h >= min_size)).flatten()
