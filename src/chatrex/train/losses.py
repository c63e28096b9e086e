"""UPN training losses: sigmoid focal loss on the single "object" logit, L1 + GIoU on matched boxes,
applied to every decoder layer and to the two-stage encoder proposals (DINO-style deep supervision).

Boxes everywhere here are cxcywh normalized to each image's valid (unpadded) region, the UPN output
format. Normalization follows DETR: every term is summed over the batch and divided by the number of
target boxes in the batch (at least 1), so images without targets still teach "no object".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from chatrex.ops.boxes import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from chatrex.train.matcher import HungarianMatcher

__all__ = ["LossWeights", "sigmoid_focal_loss", "set_loss", "upn_loss", "encoder_proposals",
           "dense_encoder_loss", "one_to_many_assign"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (DINO defaults) and of the encoder-proposal set."""

    focal: float = 1.0
    l1: float = 5.0
    giou: float = 2.0
    encoder: float = 1.0
    dense_k: int = 0  # > 0: one-to-many dense loss over ALL encoder tokens, k tokens per target
    dec_k: int = 1  # > 1: one-to-many decoder matching (Hungarian on targets repeated k times)
    # > 0: unmatched decoder queries whose box has IoU > nms_ignore with a matched query's box are left
    # out of the focal loss: the predictor's NMS removes such near-copies, so the model need not.
    nms_ignore: float = 0.0
    # True: a matched query's score target is the IoU of its box with its target (quality focal loss,
    # Li et al. 2020 "Generalized Focal Loss"), so the score ranks boxes by localisation, not only by
    # "is an object"; badly placed near-copies then score low. False: 0/1 targets (DINO).
    iou_target: bool = False
    alpha: float = 0.25
    gamma: float = 2.0


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017) of raw ``logits`` against 0/1 ``targets`` (same shape).

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``; ``alpha < 0`` disables the alpha weighting. Soft targets
    in (0, 1] (IoU scores) use the quality-focal form ``alpha_t |t - p|^gamma BCE(p, t)`` (alpha_t = alpha
    where t > 0), which equals the binary one when t is 0 or 1.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = ce * (targets - prob).abs() ** gamma  # = (1 - p_t)^gamma for 0/1 targets
    if alpha >= 0:
        positive = (targets > 0).to(loss.dtype)
        loss = (alpha * positive + (1 - alpha) * (1 - positive)) * loss
    return loss


def set_loss(logits: Tensor, boxes: Tensor, targets: list[Tensor], indices: list[tuple[Tensor, Tensor]],
             num_boxes: float, weights: LossWeights) -> dict[str, Tensor]:
    """Focal / L1 / GIoU for one set of predictions given a matching.

    logits (B, Q) raw; boxes (B, Q, 4) cxcywh; targets B × (T_b, 4) cxcywh; indices per image
    (query_idx, target_idx). Returns unweighted ``{"focal", "l1", "giou"}`` scalars (already divided by
    ``num_boxes``).
    """
    logits, boxes = logits.float(), boxes.float()
    labels = torch.zeros_like(logits)
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
    query_idx = torch.cat([q for q, _ in indices])
    src = boxes[batch_idx, query_idx]  # (N, 4)
    tgt = (torch.cat([t[j] for t, (_, j) in zip(targets, indices)]) if indices else src[:0]).to(src)
    pairs = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)
    if weights.iou_target and query_idx.numel() > 0:
        iou = torch.diag(box_iou(*pairs)[0]).detach()
        labels[batch_idx, query_idx] = iou.clamp(min=0.01)  # > 0 keeps alpha_t = alpha for a matched query
    else:
        labels[batch_idx, query_idx] = 1.0
    focal = sigmoid_focal_loss(logits, labels, weights.alpha, weights.gamma)
    if weights.nms_ignore > 0:
        focal = focal * _nms_keep_weights(boxes.detach(), indices, weights.nms_ignore)
    focal = focal.sum() / num_boxes
    if query_idx.numel() == 0:
        zero = boxes.sum() * 0.0  # keeps the graph connected
        return {"focal": focal, "l1": zero, "giou": zero}
    l1 = (src - tgt).abs().sum() / num_boxes
    giou = torch.diag(generalized_box_iou(*pairs))
    return {"focal": focal, "l1": l1, "giou": (1 - giou).sum() / num_boxes}


def _nms_keep_weights(boxes: Tensor, indices: list[tuple[Tensor, Tensor]], iou: float) -> Tensor:
    """(B, Q) 1.0, or 0.0 for unmatched queries with box IoU > ``iou`` to a matched query's box."""
    from chatrex.ops.boxes import box_iou

    keep = torch.ones(boxes.shape[:2], dtype=boxes.dtype, device=boxes.device)
    for b, (q, _) in enumerate(indices):
        if q.numel() == 0:
            continue
        xyxy = box_cxcywh_to_xyxy(boxes[b])
        near = (box_iou(xyxy, xyxy[q])[0] > iou).any(1)  # (Q,)
        near[q] = False
        keep[b, near] = 0.0
    return keep


def encoder_proposals(output) -> tuple[Tensor, Tensor]:  # noqa: ANN001 - a UPNOutput with intermediates
    """The two-stage proposals behind the K queries: (logits (B, K), boxes (B, K, 4) cxcywh).

    Logits are the selection scores of the chosen tokens; boxes are ``sigmoid(enc_coords)`` of those
    tokens, NOT detached (the decoder gets a detached copy as its initial reference).
    """
    idx = output.topk_indices
    logits = torch.gather(output.enc_topk_logits, 1, idx)
    coords = output.encoding.enc_coords
    boxes = torch.gather(coords, 1, idx[..., None].expand(-1, -1, coords.shape[-1])).sigmoid()
    return logits, boxes


def upn_loss(output, targets: list[Tensor], matcher: HungarianMatcher,  # noqa: ANN001 - UPNOutput
             weights: LossWeights = LossWeights()) -> tuple[Tensor, dict[str, float]]:
    """Total loss of one prompt's ``UPN.decode(..., return_intermediates=True)`` output.

    Every decoder layer and the encoder proposals are matched to ``targets`` (B × (T_b, 4) cxcywh
    normalized) independently and contribute ``focal·w_f + l1·w_l1 + giou·w_g`` (the encoder set
    times ``weights.encoder``). Returns (loss scalar, float breakdown for logging).
    """
    num_boxes = max(float(sum(t.shape[0] for t in targets)), 1.0)
    sets = [(output.per_layer_logits[t].squeeze(-1), output.per_layer_boxes[t], 1.0, f"dec{t}")
            for t in range(output.per_layer_logits.shape[0])]
    total = output.per_layer_boxes.new_zeros(())
    logs: dict[str, float] = {}
    if weights.dense_k > 0:
        enc_part = dense_encoder_loss(output, targets, matcher, weights)
        total = total + weights.encoder * enc_part
        logs["enc"] = float(enc_part.detach())
    else:
        enc_logits, enc_boxes = encoder_proposals(output)
        sets.append((enc_logits, enc_boxes, weights.encoder, "enc"))
    for logits, boxes, scale, name in sets:
        # One-to-many (H-DETR style): every target k times, so Hungarian gives it k distinct queries.
        k = weights.dec_k if name != "enc" else 1
        tgts = [t.repeat(k, 1) for t in targets] if k > 1 else targets
        indices = matcher(logits.detach(), boxes.detach(), tgts)
        terms = set_loss(logits, boxes, tgts, indices, num_boxes * k, weights)
        part = weights.focal * terms["focal"] + weights.l1 * terms["l1"] + weights.giou * terms["giou"]
        total = total + scale * part
        logs[name] = float(part.detach())
    last = f"dec{output.per_layer_logits.shape[0] - 1}"
    logs["last"] = logs[last]
    return total, logs


@torch.no_grad()
def one_to_many_assign(logits: Tensor, boxes: Tensor, valid: Tensor, targets: Tensor,
                       matcher: HungarianMatcher, k: int) -> tuple[Tensor, Tensor]:
    """Each target takes its ``k`` cheapest valid tokens (matching cost); a token wanted by several
    targets goes to the cheapest. logits (S,), boxes (S, 4) cxcywh, valid (S,) bool, targets (T, 4).
    Returns (token_idx (n,), target_idx (n,))."""
    cand = torch.nonzero(valid).squeeze(1)
    if targets.numel() == 0 or cand.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64, device=logits.device)
        return empty, empty
    from chatrex.train.matcher import match_cost

    cost = match_cost(logits[cand], boxes[cand], targets, matcher.w_class, matcher.w_bbox, matcher.w_giou,
                      matcher.alpha, matcher.gamma)  # (S_valid, T)
    kk = min(k, cand.numel())
    chosen = torch.topk(cost, kk, dim=0, largest=False).indices  # (kk, T)
    mask = torch.zeros_like(cost, dtype=torch.bool)
    mask.scatter_(0, chosen, True)
    cost = cost.masked_fill(~mask, float("inf"))
    best_cost, best_t = cost.min(1)
    rows = torch.nonzero(torch.isfinite(best_cost)).squeeze(1)
    return cand[rows], best_t[rows]


def dense_encoder_loss(output, targets: list[Tensor], matcher: HungarianMatcher,  # noqa: ANN001 - UPNOutput
                       weights: LossWeights) -> Tensor:
    """One-to-many loss on EVERY encoder token (a dense detector's signal, not only the top-K).

    Focal loss over all tokens (positives: ``one_to_many_assign`` with ``weights.dense_k``) plus L1 and
    GIoU of the positives' boxes ``sigmoid(enc_coords)``, all normalized by the number of positives.
    Tokens whose anchor is invalid (padding / border, +inf coords) are negatives and never positives.
    """
    logits = output.enc_topk_logits.float()  # (B, S) selection score of every token
    coords = output.encoding.enc_coords  # (B, S, 4) logit space
    valid = torch.isfinite(output.encoding.proposals).all(-1) & ~output.encoding.mask_flatten
    boxes = coords.float().sigmoid()
    labels = torch.zeros_like(logits)
    srcs, tgts = [], []
    for b, tgt in enumerate(targets):
        tok, t_idx = one_to_many_assign(logits[b].detach(), boxes[b].detach(), valid[b], tgt.to(boxes), matcher,
                                        weights.dense_k)
        labels[b, tok] = 1.0
        srcs.append(boxes[b, tok])
        tgts.append(tgt.to(boxes)[t_idx])
    num_pos = max(float(labels.sum()), 1.0)
    focal = sigmoid_focal_loss(logits, labels, weights.alpha, weights.gamma).sum() / num_pos
    src, tgt = torch.cat(srcs), torch.cat(tgts)
    if src.shape[0] == 0:
        return weights.focal * focal
    l1 = (src - tgt).abs().sum() / num_pos
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    return weights.focal * focal + weights.l1 * l1 + weights.giou * (1 - giou).sum() / num_pos
