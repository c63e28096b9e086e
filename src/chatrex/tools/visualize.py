"""Seed-compatible drawing helpers (`chatrex.tools.visualize`), thin wrappers over `chatrex.viz`.

Differences from the seed, on purpose: colours are a fixed function of the box index (no global
``np.random``), labels use the bundled DejaVuSans sized for the image, boxes touching the border are
drawn inside the image, and boxes may be lists, numpy arrays or tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from chatrex.viz import auto_font_size, color_for, draw_labeled_box, load_font, visualize_chatrex_output

__all__ = ["plot_boxes_to_image", "visualize_chatrex_output"]


def plot_boxes_to_image(
    image_pil: Image.Image,
    boxes,
    scores=None,
    return_point: bool = False,
    point_width: float = 10.0,
    return_score: bool = True,
) -> tuple[Image.Image, Image.Image]:
    """Draw ``boxes`` (xyxy pixels, (N, 4)) on ``image_pil`` and return ``(image, mask)``.

    Like the seed, it draws on the image passed in (callers pass ``image.copy()``) when that image is
    RGB/RGBA; other modes are converted to a new RGB image first. Box ``k`` gets the colour of
    ``<obj k>`` everywhere in chatrex. ``return_point`` draws a filled dot of radius ``point_width`` at
    each box centre instead of an outline of width ``int(point_width)``; ``return_score`` adds the
    score label ``f"{score:.2f}"`` (outline mode only). ``mask`` is an ``"L"`` image, 255 inside boxes.
    Coordinates are truncated to ints (seed behaviour) and clipped to the image.
    """
    image = image_pil if image_pil.mode in ("RGB", "RGBA") else image_pil.convert("RGB")
    box_list = _as_rows(boxes)
    score_list = None if scores is None else [float(s) for s in _as_flat(scores)]
    if score_list is not None and len(score_list) != len(box_list):
        raise ValueError(f"plot_boxes_to_image: {len(box_list)} boxes but {len(score_list)} scores")
    mask = Image.new("L", image.size, 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    font = load_font(auto_font_size(image.size))
    width = max(1, int(point_width))
    for k, box in enumerate(box_list):
        x0, y0, x1, y1 = _clipped_int_box(box, image.size)
        color = color_for(f"obj{k}")
        if return_point:
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, float(point_width)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            label = f"{score_list[k]:.2f}" if (return_score and score_list is not None) else ""
            draw_labeled_box(draw, (x0, y0, x1, y1), label, color, font, width)
        mask_draw.rectangle((x0, y0, x1, y1), fill=255, outline=255)
    return image, mask


def _clipped_int_box(box: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    # int() truncates like the seed; the last drawable pixel is size - 1, so a box reaching the
    # border (x2 == W) still shows its right/bottom edge.
    w, h = size
    x0, y0, x1, y1 = (int(float(v)) for v in box)
    x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
    y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
    return x0, y0, x1, y1


def _as_rows(boxes) -> list[list[float]]:
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu()
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    rows = [[float(v) for v in b] for b in boxes]
    if any(len(r) != 4 for r in rows):
        raise ValueError("plot_boxes_to_image: boxes must have shape (N, 4), xyxy pixels")
    return rows


def _as_flat(values) -> list[float]:
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        values = values.tolist()
    flat: list[float] = []
    for v in values:
        flat.extend(_as_flat(v) if isinstance(v, (list, tuple)) else [v])
    return flat
