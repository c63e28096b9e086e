"""Pure helpers of the web demo: question templates, box text, canvas scaling, answer rendering.

No gradio and no torch here, so every rule of the page is testable with literal values. Boxes are
``xyxy`` in pixels of the ORIGINAL image unless a name says ``canvas``: the page shows images enlarged
by `canvas_scale` (small synthetic scenes would otherwise be thumbnails), and a click at canvas pixel
(u, v) is original pixel (u / scale, v / scale).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from chatrex import prompts
from chatrex.grounding import GroundedAnswer
from chatrex.viz import color_for, draw_answer, draw_proposals

CANVAS_LONG_SIDE = 768  # images are shown at least this long (px), never shrunk below their size
FREE_QUESTION = "Free question"


@dataclass(frozen=True)
class Template:
    """A task template of the Chat tab: `slot` says what fills `[OBJ]` ("regions", "categories" or None)."""

    name: str
    prompt: str
    slot: str | None


# The seed demo's 7 templates (first prompt of each family), in its order.
TEMPLATES: tuple[Template, ...] = (
    Template("Region category", prompts.REGION_CATEGORY, "regions"),
    Template("Region short phrase", prompts.REGION_SHORT_PHRASE, "regions"),
    Template("Region brief description", prompts.REGION_BRIEF, "regions"),
    Template("Region one sentence", prompts.REGION_ONE_SENTENCE, "regions"),
    Template("Grounding (detect categories)", prompts.DETECT, "categories"),
    Template("Brief grounded caption", prompts.BRIEF_GROUNDED_CAPTION, None),
    Template("Detailed grounded caption", prompts.DETAILED_GROUNDED_CAPTION, None),
)
TEMPLATE_NAMES: tuple[str, ...] = (FREE_QUESTION, *(t.name for t in TEMPLATES))
_OBJ_TOKEN = re.compile(r"^<obj(\d+)>$")


def template_by_name(name: str) -> Template | None:
    """The template called `name`; None for the free question."""
    for template in TEMPLATES:
        if template.name == name:
            return template
    if name == FREE_QUESTION:
        return None
    raise ValueError(f"unknown task template {name!r}; choose one of {list(TEMPLATE_NAMES)}")


def region_targets(field: str, n_boxes: int, all_regions: bool) -> list[str]:
    """`<objK>` tokens for a region template: from the field ("<obj1>, <obj2>", "1;2") or every box.

    Raises ValueError (shown on the page) for empty input, unknown items or indices without a box.
    """
    if n_boxes == 0:
        raise ValueError("there are no boxes yet: draw one on the image (two clicks) or pick UPN proposals")
    if all_regions:
        return [prompts.object_token(k) for k in range(n_boxes)]
    items = [s.strip() for s in re.split(r"[,;]", field or "") if s.strip()]
    if not items:
        if n_boxes == 1:
            return [prompts.object_token(0)]
        raise ValueError(f"say which of the {n_boxes} regions to describe (e.g. <obj0>, <obj2>) "
                         "or tick 'All regions'")
    tokens = []
    for item in items:
        match = _OBJ_TOKEN.match(item.replace(" ", ""))
        index = int(match.group(1)) if match else int(item) if item.isdigit() else None
        if index is None:
            raise ValueError(f"{item!r} is not a region; write object ids like <obj0> or 0")
        if index >= n_boxes:
            raise ValueError(f"<obj{index}> does not exist: there are {n_boxes} boxes (<obj0>..<obj{n_boxes - 1}>)")
        tokens.append(prompts.object_token(index))
    return list(dict.fromkeys(tokens))


def build_question(template_name: str, field: str, all_regions: bool, n_boxes: int,
                   free_text: str) -> tuple[str, bool]:
    """(question to send, is_free): the free question wins when typed (as in the seed demo).

    A free question goes through `ChatRex.chat` (grounded conversation prefix added there); a
    template is sent as is. Categories are split on ',' / ';' and joined with '; ' like the seed.
    """
    if free_text and free_text.strip():
        return free_text.strip(), True
    template = template_by_name(template_name)
    if template is None:
        raise ValueError("type a question, or pick a task template")
    if template.slot == "regions":
        return prompts.render(template.prompt, region_targets(field, n_boxes, all_regions)), False
    if template.slot == "categories":
        cats = [s.strip() for s in re.split(r"[,;]", field or "") if s.strip()]
        if not cats:
            raise ValueError("type the categories to detect in 'Object ids or categories' (e.g. red circle, star)")
        return prompts.render(template.prompt, cats), False
    return template.prompt, False


# ----------------------------------------------------------------------------- boxes and canvas
def canvas_scale(size: tuple[int, int], long_side: int = CANVAS_LONG_SIDE) -> float:
    """Display scale for a (W, H) image: enlarge small images to `long_side`, never shrink."""
    return max(1.0, long_side / max(size))


def click_to_image(point: Sequence[float], scale: float, size: tuple[int, int]) -> tuple[float, float]:
    """Canvas pixel (u, v) → original pixel (x, y), clamped to the image."""
    x = min(max(float(point[0]) / scale, 0.0), float(size[0]))
    y = min(max(float(point[1]) / scale, 0.0), float(size[1]))
    return x, y


def corners_to_box(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Two opposite corners (any order) → xyxy box, rounded to 0.1 px."""
    return [round(min(a[0], b[0]), 1), round(min(a[1], b[1]), 1),
            round(max(a[0], b[0]), 1), round(max(a[1], b[1]), 1)]


def format_boxes(boxes: Sequence[Sequence[float]]) -> str:
    """One line per box: ``<objK>: [x1, y1, x2, y2]`` (xyxy px of the original image)."""
    return "\n".join(f"<obj{k}>: [{', '.join(f'{v:.1f}' for v in box)}]" for k, box in enumerate(boxes))


def scaled(image: Image.Image, scale: float) -> Image.Image:
    """`image` enlarged by `scale` (bicubic), RGB."""
    image = image.convert("RGB")
    if scale == 1.0:
        return image.copy()
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def _scale_boxes(boxes: Sequence[Sequence[float]], scale: float) -> list[list[float]]:
    return [[float(v) * scale for v in box] for box in boxes]


def draw_canvas(image: Image.Image, boxes: Sequence[Sequence[float]], scale: float,
                pending: Sequence[float] | None = None, scores: Sequence[float] | None = None) -> Image.Image:
    """The drawing canvas: `image` at `scale` with numbered boxes (K = `<objK>`) and a cross at the
    pending first corner (original px) when a box is half drawn."""
    out = draw_proposals(scaled(image, scale), _scale_boxes(boxes, scale), scores)
    if pending is not None:
        draw = ImageDraw.Draw(out)
        x, y, r = pending[0] * scale, pending[1] * scale, max(6, round(8 * scale / 2))
        for color, width in (((0, 0, 0), 5), ((255, 255, 255), 2)):
            draw.line((x - r, y, x + r, y), fill=color, width=width)
            draw.line((x, y - r, x, y + r), fill=color, width=width)
    return out


def draw_grounded(image: Image.Image, boxes: Sequence[Sequence[float]], answer: GroundedAnswer,
                  scale: float) -> Image.Image:
    """Answer overlay: the boxes of each grounded phrase in the phrase's colour. An answer without
    grounded phrases (e.g. a region category) shows the input boxes, numbered."""
    if answer.spans:
        return draw_answer(scaled(image, scale), _scale_boxes(boxes, scale), answer)
    return draw_proposals(scaled(image, scale), _scale_boxes(boxes, scale))


# ----------------------------------------------------------------------------- answer rendering
def hex_color(label: str) -> str:
    """`viz.color_for(label)` as ``#rrggbb`` (the colour the overlay uses for that phrase)."""
    return "#{:02x}{:02x}{:02x}".format(*color_for(label))


def highlighted(answer: GroundedAnswer) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """(segments, colour map) for `gr.HighlightedText`: plain text with each grounded phrase labelled by
    itself, coloured like its boxes in the overlay."""
    segments: list[tuple[str, str | None]] = []
    cursor = 0
    for span in answer.spans:
        if span.start > cursor:
            segments.append((answer.text[cursor:span.start], None))
        segments.append((answer.text[span.start:span.end], span.phrase))
        cursor = max(cursor, span.end)
    if cursor < len(answer.text):
        segments.append((answer.text[cursor:], None))
    colors = {span.phrase: hex_color(span.phrase) for span in answer.spans}
    return segments, colors


def phrase_rows(answer: GroundedAnswer, boxes: Sequence[Sequence[float]]) -> list[list[str]]:
    """Table rows (phrase, object ids, boxes xyxy px) of the grounded phrases; out-of-range ids are
    listed with '(no box)'."""
    rows = []
    for span in answer.spans:
        ids = ", ".join(f"<obj{k}>" if k < len(boxes) else f"<obj{k}> (no box)" for k in span.indices)
        coords = "; ".join("[" + ", ".join(f"{v:.0f}" for v in boxes[k]) + "]"
                           for k in span.indices if k < len(boxes))
        rows.append([span.phrase, ids, coords])
    return rows


def proposal_rows(boxes: Sequence[Sequence[float]], scores: Sequence[float]) -> list[list[float]]:
    """Table rows (index, score, x1, y1, x2, y2) of UPN proposals, rounded for display."""
    return [[k, round(float(s), 3), *(round(float(v), 1) for v in box)]
            for k, (box, s) in enumerate(zip(boxes, scores))]


__all__ = [
    "CANVAS_LONG_SIDE", "FREE_QUESTION", "TEMPLATES", "TEMPLATE_NAMES", "Template", "build_question",
    "canvas_scale", "click_to_image", "corners_to_box", "draw_canvas", "draw_grounded", "format_boxes",
    "hex_color", "highlighted", "phrase_rows", "proposal_rows", "region_targets", "scaled", "template_by_name",
]
