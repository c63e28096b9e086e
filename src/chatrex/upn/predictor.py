"""UPN predictors: images → proposals.

- :class:`UPNPredictor` (typed API): images → ``list[Proposals]`` (xyxy pixels of each original
  image, clipped, best first). Batch results never depend on batch mates.
- :class:`UPNWrapper` (seed-compatible): ``.inference`` / ``.filter`` with the seed's dict outputs,
  so the seed README's UPN example runs unchanged.

The pure post-processing functions (:func:`postprocess`, :func:`select_proposals`,
:func:`seed_filter_image`) work on tensors and are what the parity tests bind to the fixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from chatrex.images import ImageInput, load_image
from chatrex.ops.boxes import box_cxcywh_to_xyxy, clip_boxes_to_image, nms
from chatrex.types import Proposals
from chatrex.upn.preprocess import DEFAULT_MAX_SIZE, DEFAULT_SHORT, batch_images, preprocess_image, resize_size

PROMPT_TYPES = ("fine_grained_prompt", "coarse_grained_prompt")
_PROMPT_ALIASES = {"fine": "fine_grained_prompt", "coarse": "coarse_grained_prompt"}


def resolve_prompt_type(prompt_type: str) -> str:
    """``"fine"``/``"coarse"`` or the full names → the full name; anything else → ValueError."""
    if isinstance(prompt_type, str):
        full = _PROMPT_ALIASES.get(prompt_type, prompt_type)
        if full in PROMPT_TYPES:
            return full
    raise ValueError(f"unknown UPN prompt_type {prompt_type!r}; use one of {list(PROMPT_TYPES)} "
                     "(or the short forms 'fine' / 'coarse')")


def default_device() -> torch.device:
    """The current accelerator when one is available, else CPU (device-selection helper)."""
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


# ----------------------------------------------------------------------------- pure post-processing
def postprocess(pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                orig_size_hw: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's raw UPN output → (boxes xyxy pixels (Q, 4), scores (Q,)), best first.

    ``pred_logits`` (Q, 1) or (Q,) raw logits; ``pred_boxes`` (Q, 4) normalized cxcywh of the valid
    image; ``orig_size_hw`` the original (h, w). Boxes are scaled but NOT clipped (like the seed).
    The sort is stable (ties keep query order). Inputs are never modified (the seed's are).
    """
    h, w = (float(v) for v in orig_size_hw)
    scores = pred_logits.detach().reshape(-1).float().sigmoid()
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=pred_boxes.device)
    boxes = box_cxcywh_to_xyxy(pred_boxes.detach().float()) * scale  # (Q, 4) px
    order = torch.sort(scores, descending=True, stable=True).indices
    return boxes[order], scores[order]


def select_proposals(boxes: torch.Tensor, scores: torch.Tensor, min_score: float,
                     nms_iou: float) -> torch.Tensor:
    """Indices of the boxes to keep, best first: ``score >= min_score`` then NMS when ``nms_iou > 0``.

    ``boxes`` (N, 4) xyxy, ``scores`` (N,) — usually :func:`postprocess` output. The threshold is
    compared in the scores' dtype (float32), NMS has torchvision semantics (``chatrex.ops.boxes.nms``).
    """
    candidates = torch.nonzero(scores >= min_score).reshape(-1)
    if nms_iou > 0 and candidates.numel() > 0:
        keep = nms(boxes[candidates], scores[candidates], float(nms_iou))
        candidates = candidates[keep]
    return candidates


def seed_filter_image(boxes: torch.Tensor, scores: torch.Tensor, min_score: float,
                      nms_value: float) -> tuple[list[list[int]], list[float]]:
    """The seed ``filter`` for one image: threshold, NMS, int32 truncation, re-sort, 2-decimal scores.

    Returns plain Python ``([[x1, y1, x2, y2] ints], [floats])``; floats are ``round(float32, 2)``
    widened to Python floats (e.g. 0.8600000143051147), as the seed produced. Empty → ``([], [])``.
    """
    keep = select_proposals(boxes, scores, min_score, nms_value)
    kept_boxes = boxes[keep].cpu().numpy().astype(np.float32).astype(np.int32)  # truncation toward 0
    kept_scores = scores[keep].cpu().numpy().astype(np.float32)
    order = np.argsort(-kept_scores, kind="stable")
    return (kept_boxes[order].tolist(),
            [float(np.round(s, 2)) for s in kept_scores[order]])


# ----------------------------------------------------------------------------- typed predictor
class UPNPredictor:
    """Runs a UPN model on images: loading, resizing, batching, post-processing, filtering.

    ``model`` is a ``chatrex.upn.UPN`` (or anything with the same forward contract). The device is
    the model's unless ``device`` is given (then the model is moved there); inputs follow the
    model's parameter dtype.

    Batching: with the default ``batch_size=1`` every image runs alone, so its result is bit-identical
    whatever its batch mates. With ``batch_size > 1`` only images of equal resized size share a
    forward pass (never padded: UPN's Swin sees padding, which would change results by O(1)); their
    results then match the solo run to float rounding (~1e-7), which near-ties in the top-k query
    selection can occasionally turn into a reordered query. Worth it on GPUs, rarely on CPUs.
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, *,
                 short: int = DEFAULT_SHORT, max_size: int | None = DEFAULT_MAX_SIZE,
                 batch_size: int = 1) -> None:
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.short, self.max_size, self.batch_size = short, max_size, max(1, int(batch_size))

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, config: Any = "large", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **kwargs: Any) -> "UPNPredictor":
        """Load weights with ``chatrex.upn.load_upn`` (strict) and wrap them."""
        from chatrex.upn.checkpoint import load_upn

        model = load_upn(checkpoint, config=config, device=device if device is not None else default_device(),
                         dtype=dtype)
        return cls(model, **kwargs)

    def predict(self, images: ImageInput | Sequence[ImageInput], prompt_type: str = "fine_grained_prompt",
                min_score: float = 0.3, nms_iou: float = 0.8, *, return_all: bool = False,
                short: int | None = None, max_size: int | None = None,
                batch_size: int | None = None) -> list[Proposals]:
        """Proposals for one image or a list of images (always returns a list, in input order).

        Each image is a path, ``PIL.Image`` or numpy array (see ``chatrex.images.load_image``).
        Keeps boxes with ``score >= min_score``, then applies NMS at ``nms_iou`` (0 disables it), then
        clips to the image. ``return_all=True`` skips both filters and returns every query, sorted.
        ``short``/``max_size`` override the predictor's resize rule for this call (``None`` keeps
        the predictor's, by default 800 / 1333 like the reference).
        """
        prompt_type = resolve_prompt_type(prompt_type)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        pil_images = [load_image(x) for x in items]
        raw = self.forward_images(pil_images, prompt_type, short=short, max_size=max_size, batch_size=batch_size)
        results = []
        for image, (logits, boxes) in zip(pil_images, raw):
            results.append(self._to_proposals(logits, boxes, image.size, prompt_type, min_score, nms_iou, return_all))
        return results

    def predict_one(self, image: ImageInput, prompt_type: str = "fine_grained_prompt", min_score: float = 0.3,
                    nms_iou: float = 0.8, **kwargs: Any) -> Proposals:
        """:meth:`predict` for a single image, returning its ``Proposals``."""
        return self.predict([image], prompt_type, min_score, nms_iou, **kwargs)[0]

    @torch.inference_mode()
    def forward_images(self, images: Sequence[Any], prompt_type: str, *, short: int | None = None,
                       max_size: int | None = None,
                       batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """RGB PIL images → per image (pred_logits (Q, 1), pred_boxes (Q, 4) cxcywh), float32 on CPU.

        Images are grouped by resized size so no image is ever padded by a batch mate.
        """
        prompt_type = resolve_prompt_type(prompt_type)
        short = self.short if short is None else short
        max_size = self.max_size if max_size is None else max_size
        batch_size = self.batch_size if batch_size is None else max(1, int(batch_size))
        groups: dict[tuple[int, int], list[int]] = {}  # resized (h, w) → image indices
        for i, img in enumerate(images):
            groups.setdefault(resize_size(img.width, img.height, short, max_size), []).append(i)
        outputs: list[Any] = [None] * len(images)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                # Preprocess per chunk: only batch_size normalized images are alive at a time.
                tensors = [preprocess_image(images[i], short, max_size)[0] for i in chunk]
                logits, boxes = self._run(tensors, prompt_type)
                for j, i in enumerate(chunk):
                    outputs[i] = (logits[j], boxes[j])
        return outputs

    def _run(self, tensors: list[torch.Tensor], prompt_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values, pixel_mask = batch_images(tensors)  # same size: the mask is all False
        out = self.model(pixel_values.to(self.device, self.dtype), pixel_mask.to(self.device), prompt_type)
        return out.pred_logits.float().cpu(), out.pred_boxes.float().cpu()

    @staticmethod
    def _to_proposals(logits: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], prompt_type: str,
                      min_score: float, nms_iou: float, return_all: bool) -> Proposals:
        w, h = image_size
        xyxy, scores = postprocess(logits, boxes, (h, w))
        if not return_all:
            keep = select_proposals(xyxy, scores, min_score, nms_iou)
            xyxy, scores = xyxy[keep], scores[keep]
        xyxy = clip_boxes_to_image(xyxy, (h, w))
        return Proposals(boxes=xyxy.tolist(), scores=scores.tolist(), image_size=(w, h), prompt_type=prompt_type)


# ----------------------------------------------------------------------------- seed-compatible wrapper
class UPNWrapper:
    """Seed-compatible UPN wrapper: ``UPNWrapper(ckpt_path)``, ``.inference``, ``.filter``.

    Improvements over the seed: any device (default: the available accelerator, else CPU), images
    converted to RGB with EXIF orientation applied, results independent of batch mates, inputs
    never mutated, ``filter`` keeps every image (an image with no box gives empty lists).
    """

    def __init__(self, ckpt_path: Any, config: Any = "large", device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, *, short: int = DEFAULT_SHORT,
                 max_size: int | None = DEFAULT_MAX_SIZE) -> None:
        self.predictor = UPNPredictor.from_checkpoint(ckpt_path, config=config, device=device, dtype=dtype,
                                                      short=short, max_size=max_size)
        self.model = self.predictor.model

    def inference(self, image: ImageInput | Sequence[ImageInput], prompt_type: str) -> dict[str, Any]:
        """Raw proposals: ``{"original_xyxy_boxes": np.ndarray (B, Q, 4) float32, "scores": Tensor (B, Q, 1)}``.

        Boxes are xyxy pixels of each original image, not clipped, sorted by score (descending).
        Rows beyond an image's own query count (only for extreme aspect ratios) are NaN.
        """
        prompt_type = resolve_prompt_type(prompt_type)
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise ValueError("UPNWrapper.inference needs at least one image")
        pil_images = [load_image(x) for x in items]
        per_image = [postprocess(logits, boxes, (img.height, img.width))
                     for img, (logits, boxes) in zip(pil_images, self.predictor.forward_images(pil_images, prompt_type))]
        # Q is the same for every image except extreme ones with fewer encoder tokens than queries
        # (the model keeps min(S, Q)); pad those rows with NaN, which `filter` always drops.
        q = max(xyxy.shape[0] for xyxy, _ in per_image)
        boxes_all = torch.full((len(per_image), q, 4), float("nan"))
        scores_all = torch.full((len(per_image), q, 1), float("nan"))
        for i, (xyxy, scores) in enumerate(per_image):
            boxes_all[i, : xyxy.shape[0]] = xyxy
            scores_all[i, : scores.shape[0], 0] = scores
        return {"original_xyxy_boxes": boxes_all.numpy(), "scores": scores_all}

    def filter(self, result: dict[str, Any], min_score: float, nms_value: float = 0.8) -> dict[str, list]:
        """Seed ``filter``: per image keep ``score >= min_score``, NMS at ``nms_value`` (if > 0), int boxes.

        Returns ``{"original_xyxy_boxes": [[[x1, y1, x2, y2] ints] per image], "scores": [[floats] per
        image]}`` with every image present, in input order.
        """
        out: dict[str, list] = {"original_xyxy_boxes": [], "scores": []}
        for boxes, scores in zip(result["original_xyxy_boxes"], result["scores"]):
            boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
            scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(-1)
            kept_boxes, kept_scores = seed_filter_image(boxes_t, scores_t, min_score, nms_value)
            out["original_xyxy_boxes"].append(kept_boxes)
            out["scores"].append(kept_scores)
        return out
