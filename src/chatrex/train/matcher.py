"""Hungarian matching of UPN queries to ground-truth boxes (one-to-one, DETR/DINO style).

The cost of assigning query i to target j is

    w_class * focal_cost(logit_i) + w_bbox * |box_i - gt_j|_1 (cxcywh) - w_giou * GIoU(box_i, gt_j)

with the DINO focal cost ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` for the single
"object" class. Boxes are normalized cxcywh of the image's valid region on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from chatrex.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_cost", "match_cost"]


def focal_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """(Q,) raw logits -> (Q,) classification cost of calling each query an object (lower = better)."""
    prob = logits.float().sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos - neg


def match_cost(logits: Tensor, boxes: Tensor, targets: Tensor, w_class: float = 2.0, w_bbox: float = 5.0,
               w_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """(Q,) logits, (Q, 4) predicted cxcywh, (T, 4) target cxcywh -> (Q, T) assignment cost."""
    boxes, targets = boxes.float(), targets.float()
    cost_class = focal_cost(logits, alpha, gamma)[:, None]
    cost_bbox = torch.cdist(boxes, targets, p=1)
    # Predictions may be degenerate (w or h ~ 0 after sigmoid) but never inverted: w, h >= 0.
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(targets))
    return w_class * cost_class + w_bbox * cost_bbox + w_giou * cost_giou


@dataclass(frozen=True)
class HungarianMatcher:
    """Optimal one-to-one assignment per image (``scipy.optimize.linear_sum_assignment``)."""

    w_class: float = 2.0
    w_bbox: float = 5.0
    w_giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Match a batch.

        logits (B, Q) or (B, Q, 1) raw; boxes (B, Q, 4) cxcywh normalized; targets: B tensors (T_b, 4)
        cxcywh normalized. Returns per image ``(query_idx (n,), target_idx (n,))`` int64 with
        n = min(Q, T_b), sorted by query index. An image without targets gives two empty tensors.
        """
        if logits.dim() == 3:
            logits = logits.squeeze(-1)
        out = []
        for b, tgt in enumerate(targets):
            if tgt.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            cost = match_cost(logits[b], boxes[b], tgt.to(boxes.device), self.w_class, self.w_bbox,
                              self.w_giou, self.alpha, self.gamma)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out
