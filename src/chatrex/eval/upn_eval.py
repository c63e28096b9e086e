"""UPN proposal evaluation on a COCO-format set: `chatrex eval upn --checkpoint … --ann FILE --images DIR`.

Metrics (class-agnostic, boxes xyxy pixels of the original image):
- ``recall``: fraction of ground-truth objects (optionally only those whose larger box side is
  >= ``min_size`` px) matched at IoU >= 0.5 by the FILTERED proposals (score >= min_score, then NMS);
- ``precision``: fraction of filtered proposals that match a distinct ground-truth object (COCO-style
  greedy one-to-one, so duplicates count as false positives; any gt box, small ones included, may
  absorb a proposal);
- ``AP`` / ``AP50`` / ``AP75`` / ``AR@100``: pycocotools on the top-100 proposals after the same NMS
  but without the score threshold (UPN output is always NMS'd; near-copies would count as FPs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from chatrex.eval.coco_eval import RecallPrecision, coco_ap, coco_dataset
from chatrex.ops.boxes import box_xywh_to_xyxy, box_xyxy_to_xywh, clip_boxes_to_image

__all__ = ["evaluate_upn", "evaluate_items", "operating_points", "choose_threshold", "load_predictor", "main"]


def _proposals(predictor, images: Sequence[Any], prompt_type: str) -> list[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    """Every query of every image: (boxes (Q, 4) xyxy px unclipped, scores (Q,)), best first."""
    from chatrex.upn.predictor import postprocess

    raw = predictor.forward_images(list(images), prompt_type)
    return [postprocess(logits, boxes, (img.height, img.width)) for img, (logits, boxes) in zip(images, raw)]


def _counted(gt: torch.Tensor, min_size: float | None) -> torch.Tensor:
    """(M,) bool: the ground-truth boxes (M, 4) xyxy whose larger side is >= ``min_size`` (all when None)."""
    if min_size is None:
        return torch.ones(len(gt), dtype=torch.bool)
    return (gt[:, 2:] - gt[:, :2]).amax(1) >= min_size


def evaluate_items(predictor, items: Iterable[tuple[Any, torch.Tensor]], prompt_type: str = "fine",  # noqa: ANN001
                   min_score: float = 0.3, nms: float = 0.8, min_size: float | None = None,
                   iou: float = 0.5, max_dets: int = 100) -> dict[str, Any]:
    """Evaluate a ``UPNPredictor`` on ``(RGB PIL image, gt boxes (M, 4) xyxy px)`` pairs.

    Returns ``{"recall", "precision", "num_gt", "num_pred", "true_positives", "AP", "AP50", "AP75",
    "AR@100", "images", "prompt_type", "min_score", "nms", "min_size"}``. ``min_size`` restricts the
    recall (and AP) ground truth to objects whose larger side is >= ``min_size`` px.
    """
    from chatrex.upn.predictor import resolve_prompt_type, select_proposals

    prompt_type = resolve_prompt_type(prompt_type)
    acc = RecallPrecision(iou)
    coco_images, gt_boxes, detections = [], [], []
    for k, (image, gt) in enumerate(items):
        gt = torch.as_tensor(gt, dtype=torch.float32).reshape(-1, 4)
        (boxes, scores), = _proposals(predictor, [image], prompt_type)
        keep = select_proposals(boxes, scores, min_score, nms)
        kept = clip_boxes_to_image(boxes[keep], (image.height, image.width))
        counted = _counted(gt, min_size)
        acc.add(kept, scores[keep], gt, counted)
        coco_images.append({"id": k + 1, "width": image.width, "height": image.height})
        gt_boxes.append(gt[counted])
        ranked = select_proposals(boxes, scores, 0.0, nms)[:max_dets]  # NMS'd, no score threshold
        top = clip_boxes_to_image(boxes[ranked], (image.height, image.width))
        for b, s in zip(box_xyxy_to_xywh(top).tolist(), scores[ranked].tolist()):
            detections.append({"image_id": k + 1, "bbox": b, "score": s, "category_id": 1})
    result: dict[str, Any] = acc.result()
    result.update(coco_ap(coco_dataset(coco_images, gt_boxes), detections, max_dets=max_dets))
    result.update({"images": len(coco_images), "prompt_type": prompt_type, "min_score": min_score,
                   "nms": nms, "min_size": min_size})
    return result


@torch.no_grad()
def operating_points(predictor, items: Iterable[tuple[Any, torch.Tensor]], prompt_type: str = "fine",  # noqa: ANN001
                     min_size: float | None = None, thresholds: Sequence[float] = (0.1, 0.2, 0.3),
                     nms: float = 0.8, iou: float = 0.5) -> list[dict[str, float]]:
    """Recall and precision (as :func:`evaluate_items` counts them) at every score threshold, one pass.

    Returns ``[{"threshold", "recall", "precision", "num_pred"}, ...]`` in the order of ``thresholds``.
    """
    from chatrex.upn.predictor import resolve_prompt_type, select_proposals

    prompt_type = resolve_prompt_type(prompt_type)
    accs = [RecallPrecision(iou) for _ in thresholds]
    for image, gt in items:
        gt = torch.as_tensor(gt, dtype=torch.float32).reshape(-1, 4)
        (boxes, scores), = _proposals(predictor, [image], prompt_type)
        counted = _counted(gt, min_size)
        for acc, t in zip(accs, thresholds):
            keep = select_proposals(boxes, scores, float(t), nms)
            acc.add(clip_boxes_to_image(boxes[keep], (image.height, image.width)), scores[keep], gt, counted)
    out = []
    for acc, t in zip(accs, thresholds):
        res = acc.result()
        out.append({"threshold": float(t), "recall": float(res["recall"]), "precision": float(res["precision"]),
                    "num_pred": int(res["num_pred"])})
    return out


def choose_threshold(points: Sequence[dict[str, float]], min_precision: float) -> dict[str, float]:
    """The lowest threshold whose precision >= ``min_precision`` (the highest recall there); if none
    reaches it, the threshold with the best F1. Thresholds that keep no proposal are never chosen."""
    points = [p for p in points if p.get("num_pred", 1) > 0] or list(points)
    ok = [p for p in points if p["precision"] >= min_precision]
    if ok:
        return min(ok, key=lambda p: p["threshold"])
    return max(points, key=lambda p: 2 * p["recall"] * p["precision"] / max(p["recall"] + p["precision"], 1e-9))


def read_coco(coco_json: str | Path, images_dir: str | Path | None = None) -> list[tuple[Path, torch.Tensor]]:
    """(image path, gt boxes (M, 4) xyxy px) per image of a COCO file (crowd boxes ignored).

    ``images_dir`` None → ``info.image_dir`` (relative to the json's folder, as our synthetic export
    writes it) or else the json's folder.
    """
    data = json.loads(Path(coco_json).read_text())
    if images_dir is None:
        images_dir = Path(coco_json).parent / str(data.get("info", {}).get("image_dir", "."))
    boxes: dict[int, list[list[float]]] = {img["id"]: [] for img in data["images"]}
    for ann in data.get("annotations", []):
        if not ann.get("iscrowd", 0):
            boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    out = []
    for img in data["images"]:
        xywh = torch.tensor(boxes[img["id"]], dtype=torch.float32).reshape(-1, 4)
        out.append((Path(images_dir) / img["file_name"], box_xywh_to_xyxy(xywh)))
    return out


def evaluate_upn(predictor, coco_json: str | Path, images_dir: str | Path | None = None, prompt_type: str = "fine",  # noqa: ANN001
                 min_score: float = 0.3, nms: float = 0.8, min_size: float | None = None) -> dict[str, Any]:
    """Evaluate ``predictor`` (a ``UPNPredictor``) on a COCO-format annotation file + image folder.

    Categories are ignored (proposals are class-agnostic). See :func:`evaluate_items` for the keys.
    """
    from chatrex.images import load_image

    pairs = read_coco(coco_json, images_dir)
    items = ((load_image(path), gt) for path, gt in pairs)
    return evaluate_items(predictor, items, prompt_type, min_score, nms, min_size)


def load_predictor(checkpoint: str | Path | None = None, config: str | Path | None = None,
                   device: str | None = None):  # noqa: ANN201 - UPNPredictor
    """A UPNPredictor from weights + a ``upn.json``-style config (UPN config and resize sizes).

    ``checkpoint`` None → the shipped tiny UPN. ``config`` may be a preset name ("tiny", "large") with
    the default 800/1333 resize, or a json file; None → ``<checkpoint stem>.json`` when it exists.
    """
    from chatrex.upn.checkpoint import load_upn
    from chatrex.upn.config import UPNConfig
    from chatrex.upn.predictor import UPNPredictor

    if checkpoint is None:
        from chatrex import embedded
        from chatrex.errors import MissingWeightsError

        predictor = embedded.upn_predictor(device=device)
        if predictor is None:
            raise MissingWeightsError("this build ships no embedded UPN; pass --checkpoint (and --config)")
        return predictor
    if config is None and Path(checkpoint).with_suffix(".json").is_file():
        config = Path(checkpoint).with_suffix(".json")
    sizes: dict[str, Any] = {}
    if config is not None and str(config).endswith(".json"):
        meta = json.loads(Path(config).read_text())
        upn_cfg = UPNConfig.from_dict(meta["config"])
        sizes = {k: meta[k] for k in ("short", "max_size") if k in meta}
    else:
        upn_cfg = UPNConfig.from_name(config or "large")
    model = load_upn(checkpoint, config=upn_cfg, device=device)
    return UPNPredictor(model, **sizes)


def _table(result: dict[str, Any]) -> str:
    keys = ["recall", "precision", "AP", "AP50", "AP75", "AR@100", "num_gt", "num_pred", "images"]
    rows = [f"{k:>10} {result[k]:.4f}" if isinstance(result[k], float) else f"{k:>10} {result[k]}"
            for k in keys if k in result]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``chatrex eval upn [--checkpoint W] [--config JSON|PRESET] --ann FILE --images DIR [--prompt fine|coarse]
    [--min-size PX] [--min-score S] [--nms T] [--out JSON]``."""
    p = argparse.ArgumentParser(prog="chatrex eval upn", description="Evaluate UPN proposals on a COCO-format set.")
    p.add_argument("--checkpoint", help="UPN weights (.safetensors/.pth); default: the shipped tiny UPN")
    p.add_argument("--config", help="upn.json written by the trainer, or a preset name (default: next to weights)")
    p.add_argument("--ann", required=True, help="COCO-format annotation json")
    p.add_argument("--images", help="folder holding the images (default: the json's info.image_dir or its folder)")
    p.add_argument("--prompt", default="fine", choices=["fine", "coarse"])
    p.add_argument("--min-size", type=float, default=None, help="count only objects >= PX (larger side) for recall")
    p.add_argument("--min-score", type=float, default=0.3)
    p.add_argument("--nms", type=float, default=0.8)
    p.add_argument("--device", default=None)
    p.add_argument("--out", help="write the metrics as JSON here")
    args = p.parse_args(argv)
    predictor = load_predictor(args.checkpoint, args.config, args.device)
    result = evaluate_upn(predictor, args.ann, args.images, args.prompt, args.min_score, args.nms, args.min_size)
    print(f"UPN {args.prompt} prompt on {args.ann} (score >= {args.min_score}, NMS {args.nms}, "
          f"min size {args.min_size}):")
    print(_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
