"""Drawing proposals and grounded answers on images (PIL only).

Colours are a pure function of the label text (CRC32, never Python's salted `hash`), so the same
phrase has the same colour in every run and process. Fonts are the bundled DejaVuSans, loaded through
`importlib.resources`; the default size scales with the image so labels stay legible from thumbnails
to 4K photos. Every function returns a new image and leaves its input untouched.
Boxes are xyxy in pixels of the image being drawn on.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from io import BytesIO
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # imported lazily at runtime: grounding is only needed for raw answer strings
    from chatrex.grounding import GroundedAnswer

Color = tuple[int, int, int]
_GOLDEN_RATIO = 0.618033988749895


def color_for(key: str | int) -> Color:
    """Deterministic, well-separated RGB colour for a label (same key → same colour, any process)."""
    h = zlib.crc32(str(key).encode("utf-8"))
    hue = ((h & 0xFFFF) / 0xFFFF + _GOLDEN_RATIO * ((h >> 16) & 0xFF)) % 1.0
    sat = 0.65 + 0.3 * (((h >> 24) & 0xF) / 15)  # 0.65..0.95: saturated, never grey
    val = 0.75 + 0.2 * (((h >> 28) & 0xF) / 15)  # 0.75..0.95: bright, readable on photos
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=1)
def _font_bytes() -> bytes:
    return resources.files("chatrex").joinpath("assets", "DejaVuSans.ttf").read_bytes()


@lru_cache(maxsize=32)
def load_font(size: int) -> ImageFont.FreeTypeFont:
    """The bundled DejaVuSans at `size` px (cached per size)."""
    return ImageFont.truetype(BytesIO(_font_bytes()), size=max(1, int(size)))


def auto_font_size(image_size: tuple[int, int]) -> int:
    """Label font size for a (W, H) image: ~2.5 % of the short side, at least 10 px."""
    return max(10, round(min(image_size) * 0.025))


def auto_line_width(image_size: tuple[int, int]) -> int:
    """Box outline width for a (W, H) image: ~0.4 % of the short side, at least 2 px."""
    return max(2, round(min(image_size) * 0.004))


def _text_color(fill: Color) -> Color:
    # Black on light fills, white on dark ones (ITU-R BT.601 luma).
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_labeled_box(
    draw: ImageDraw.ImageDraw,
    box: Sequence[float],
    label: str,
    color: Color,
    font: ImageFont.FreeTypeFont,
    width: int,
) -> None:
    """Outline `box` (xyxy px) and put `label` on a filled tag above it.

    When the tag would be clipped by the top edge it moves inside the box; it is shifted left when it
    would run past the right edge.
    """
    img_w, img_h = draw.im.size
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
    if not label:
        return
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = max(1, font.size // 5)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    tx = min(max(0.0, x1), max(0.0, img_w - tag_w))
    ty = y1 - tag_h
    if ty < 0:  # clipped at the top: draw the tag inside the box instead
        ty = max(0.0, y1)
    ty = min(ty, max(0.0, img_h - tag_h))
    draw.rectangle((tx, ty, tx + tag_w, ty + tag_h), fill=color)
    draw.text((tx + pad - left, ty + pad - top), label, fill=_text_color(color), font=font)


def draw_groups(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    groups: Sequence[tuple[str, Sequence[int]]],
    *,
    font_size: int | None = None,
    line_width: int | None = None,
) -> tuple[Image.Image, list[int]]:
    """Draw each (label, box indices) group in the label's colour.

    Returns (new RGB image, indices that were skipped because no such box exists). Out-of-range
    indices are drawn nowhere.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = load_font(font_size or auto_font_size(out.size))
    width = line_width or auto_line_width(out.size)
    skipped: list[int] = []
    for label, indices in groups:
        color = color_for(label)
        for k in indices:
            if not 0 <= k < len(boxes):
                skipped.append(k)
                continue
            draw_labeled_box(draw, boxes[k], label, color, font, width)
    return out, skipped


def draw_proposals(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float] | None = None,
    *,
    font_size: int | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """Draw input boxes labelled with their `<objK>` index K (and score when given).

    Box K's colour depends only on K, so it is the same with or without scores.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = load_font(font_size or auto_font_size(out.size))
    width = line_width or auto_line_width(out.size)
    for k, box in enumerate(_as_box_list(boxes)):
        label = f"{k}" if scores is None else f"{k}: {float(scores[k]):.2f}"
        draw_labeled_box(draw, box, label, color_for(f"obj{k}"), font, width)
    return out


def answer_groups(answer: GroundedAnswer | str) -> list[tuple[str, list[int]]]:
    """Grounded spans as (phrase, indices), one group per distinct phrase in order of first use.

    A phrase grounded twice collects the indices of both mentions (duplicates removed).
    """
    if isinstance(answer, str):
        from chatrex.grounding import parse_answer

        answer = parse_answer(answer)
    merged: dict[str, list[int]] = {}
    for span in answer.spans:
        bucket = merged.setdefault(span.phrase, [])
        bucket.extend(i for i in span.indices if i not in bucket)
    return list(merged.items())


def draw_answer(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    answer: GroundedAnswer | str,
    *,
    font_size: int | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """Draw the boxes a grounded answer refers to, one colour per phrase, labelled with the phrase.

    `answer` is a parsed `GroundedAnswer` or the raw model text. Indices with no box are skipped.
    """
    out, _ = draw_groups(image, boxes, answer_groups(answer), font_size=font_size, line_width=line_width)
    return out


def visualize_chatrex_output(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    prediction: str,
    font_size: int = 15,
    draw_width: int = 6,
) -> Image.Image:
    """Seed-compatible: draw `prediction`'s grounded phrases on a copy of `image` (boxes xyxy px).

    Unlike the seed, colours are stable across runs, the font is bundled, spaced tags parse, and a
    phrase repeated with new boxes keeps them. Out-of-range indices are still drawn nowhere.
    """
    return draw_answer(image, _as_box_list(boxes), prediction, font_size=font_size, line_width=draw_width)


def _as_box_list(boxes) -> list[list[float]]:
    # Accepts lists, numpy arrays and tensors of shape (N, 4).
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    return [[float(v) for v in b] for b in boxes]
