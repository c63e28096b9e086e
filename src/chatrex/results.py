"""Typed pipeline results and the pure functions that build them from the model's answer text.

Box format everywhere: ``xyxy`` in pixels of the ORIGINAL image. Box ``k`` of `InputBoxes` is the
region the model calls ``<objk>``. Results hold plain Python data (lists, floats, strings) plus the
parsed `GroundedAnswer`; `to_dict()` gives JSON-ready data. Answers that name a box index the model
was never given are reported in ``warnings`` and produce no detection and no drawing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatrex.grounding import GroundedAnswer
    from chatrex.types import Proposals

USER_BOXES = "user"
NO_BOXES = "none"


@dataclass(frozen=True)
class InputBoxes:
    """The boxes given to the model, in `<objK>` order.

    Attributes:
        boxes: ``[x1, y1, x2, y2]`` xyxy pixels of the original image; box k is ``<objk>``.
        scores: proposal score per box (1.0 for user boxes).
        source: "user", "none", or the UPN prompt type that produced them.
    """

    boxes: list[list[float]]
    scores: list[float]
    source: str

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"InputBoxes: {len(self.boxes)} boxes but {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.boxes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "box_format": "xyxy",
            "boxes": [
                {"index": k, "box": [float(v) for v in b], "score": float(s)}
                for k, (b, s) in enumerate(zip(self.boxes, self.scores))
            ],
        }


@dataclass(frozen=True)
class Timing:
    """Seconds spent per stage of one call; `cache_hit` means the image features were reused."""

    proposals_s: float = 0.0
    vision_s: float = 0.0
    generate_s: float = 0.0
    total_s: float = 0.0
    cache_hit: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Detection:
    """One (category, box) pair the model selected. `box` is xyxy pixels of the original image."""

    category: str
    box: list[float]
    score: float
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "box": [float(v) for v in self.box],
                "score": float(self.score), "index": int(self.index)}


@dataclass(frozen=True)
class GroundedPhrase:
    """A phrase of the answer and the input boxes it points to (out-of-range indices removed)."""

    phrase: str
    indices: list[int]
    boxes: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"phrase": self.phrase, "indices": list(self.indices), "boxes": [list(b) for b in self.boxes]}


@dataclass(frozen=True)
class ChatRexResult:
    """One model answer about one image.

    Attributes:
        task: "detect" | "refer" | "caption_image" | "chat" | "ask".
        question: the question sent (before the chat template).
        raw: the model's decoded text (special tokens kept).
        answer: `parse_answer(raw, boxes)`.
        boxes: the input boxes, in `<objK>` order.
        image_size: (w, h) of the original image.
        timing: per-stage seconds.
        warnings: problems found while building the result (e.g. indices with no box).
    """

    task: str
    question: str
    raw: str
    answer: GroundedAnswer
    boxes: InputBoxes
    image_size: tuple[int, int]
    timing: Timing
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The answer with all grounding tags removed."""
        return self.answer.text

    @property
    def problems(self) -> list[str]:
        """Parser problems of the answer plus the result-building warnings, without duplicates."""
        return list(dict.fromkeys([*self.answer.problems, *self.warnings]))

    @property
    def phrases(self) -> list[GroundedPhrase]:
        """Grounded phrases of the answer with their (in-range) boxes."""
        return grounded_phrases(self.answer, self.boxes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data."""
        return {
            "task": self.task,
            "question": self.question,
            "raw": self.raw,
            "text": self.text,
            "phrases": [p.to_dict() for p in self.phrases],
            "problems": self.problems,
            "input_boxes": self.boxes.to_dict(),
            "image_size": list(self.image_size),
            "timing": self.timing.to_dict(),
        }


@dataclass(frozen=True)
class DetectionResult(ChatRexResult):
    """`ChatRex.detect` / `refer` output: the requested categories and one `Detection` per selected box."""

    categories: list[str] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    proposals: Proposals | None = None

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["categories"] = list(self.categories)
        data["detections"] = [d.to_dict() for d in self.detections]
        return data

    def to_coco(self, image_id: int | str, category_map: Mapping[str, int] | None = None) -> list[dict]:
        """COCO results entries: ``image_id, category_id, bbox [x, y, w, h], score``.

        `category_map` maps category name → COCO id; by default the requested categories numbered
        from 1 in the order given. A detection whose category is not in the map raises ValueError.
        """
        cmap = dict(category_map) if category_map is not None else default_category_map(self.categories)
        out = []
        for det in self.detections:
            if det.category not in cmap:
                raise ValueError(f"category {det.category!r} is not in the COCO category map {sorted(cmap)}; add it")
            x1, y1, x2, y2 = det.box
            out.append({"image_id": image_id, "category_id": int(cmap[det.category]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(det.score)})
        return out

    def to_supervision(self) -> dict[str, Any]:
        """A supervision-style detections dict: ``xyxy`` (N, 4), ``confidence`` (N,), ``class_name`` (N,),
        ``class_id`` (N,) (position of the category in `categories`), all numpy arrays."""
        import numpy as np

        names = [d.category for d in self.detections]
        return {
            "xyxy": np.asarray([d.box for d in self.detections], dtype=np.float32).reshape(-1, 4),
            "confidence": np.asarray([d.score for d in self.detections], dtype=np.float32),
            "class_name": np.asarray(names, dtype=str),
            "class_id": np.asarray([self.categories.index(n) for n in names], dtype=np.int64),
        }


@dataclass(frozen=True)
class RegionCaption:
    """The caption of one input box: `index` (its `<objK>`), `box` (xyxy px), `caption`, and the answer."""

    index: int
    box: list[float]
    caption: str
    raw: str
    answer: GroundedAnswer

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "box": list(self.box), "caption": self.caption, "raw": self.raw,
                "problems": list(self.answer.problems)}


@dataclass(frozen=True)
class RegionCaptionResult:
    """`ChatRex.caption_region` output: one `RegionCaption` per box (same order as the input boxes)."""

    style: str
    regions: list[RegionCaption]
    boxes: InputBoxes
    image_size: tuple[int, int]
    timing: Timing
    questions: list[str] = field(default_factory=list)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.regions]

    @property
    def raw(self) -> list[str]:
        return [r.raw for r in self.regions]

    @property
    def problems(self) -> list[str]:
        return [f"<obj{r.index}>: {p}" for r in self.regions for p in r.answer.problems]

    def to_dict(self) -> dict[str, Any]:
        return {"task": "caption_region", "style": self.style, "questions": list(self.questions),
                "regions": [r.to_dict() for r in self.regions], "problems": self.problems,
                "input_boxes": self.boxes.to_dict(), "image_size": list(self.image_size),
                "timing": self.timing.to_dict()}


@dataclass(frozen=True)
class ChatResult(ChatRexResult):
    """`ChatRex.chat` output; `history` includes this turn, pass it back for the next question."""

    history: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["history"] = [list(t) for t in self.history]
        return data


# --- pure builders: answer → result parts ---------------------------------------------------------

def default_category_map(categories: Sequence[str]) -> dict[str, int]:
    """COCO ids 1..K for the categories in the order given."""
    return {name: i + 1 for i, name in enumerate(dict.fromkeys(categories))}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".,;:!?\"'").casefold())


def _singular(text: str) -> str:
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if text.endswith(suffix) and len(text) > len(suffix) + 1:
            return text[: -len(suffix)] + repl
    return text


def match_category(phrase: str, categories: Sequence[str]) -> str | None:
    """The requested category a grounded phrase answers, or None.

    Tries, in order: case/space/punctuation-insensitive equality, equality after naive singularising,
    the only category when just one was asked. Never guesses between several categories.
    """
    p = _norm(phrase)
    for cat in categories:
        if _norm(cat) == p:
            return cat
    for cat in categories:
        if _singular(_norm(cat)) == _singular(p):
            return cat
    if len(categories) == 1:
        return categories[0]
    return None


def _split_indices(indices: Iterable[int], n: int) -> tuple[list[int], list[int]]:
    inside = [int(k) for k in indices if 0 <= int(k) < n]
    outside = [int(k) for k in indices if not 0 <= int(k) < n]
    return inside, outside


def out_of_range_warning(phrase: str, indices: Sequence[int], n: int) -> str:
    tags = "".join(f"<obj{k}>" for k in indices)
    return f"answer grounds {phrase!r} to {tags} but only {n} input boxes exist (<obj0>..<obj{n - 1}>); ignored"


def grounded_phrases(answer: GroundedAnswer, boxes: InputBoxes) -> list[GroundedPhrase]:
    """One `GroundedPhrase` per span of `answer`, keeping only indices that name an input box."""
    out = []
    for span in answer.spans:
        inside, _ = _split_indices(span.indices, len(boxes))
        out.append(GroundedPhrase(span.phrase, inside, [list(boxes.boxes[k]) for k in inside]))
    return out


def index_warnings(answer: GroundedAnswer, n_boxes: int) -> list[str]:
    """A warning per span that names box indices ≥ `n_boxes` (those are dropped everywhere).

    Spans parsed with boxes (`span.boxes` not None) are skipped: `parse_answer` already put the same
    finding into `answer.problems`.
    """
    warnings = []
    for span in answer.spans:
        _, outside = _split_indices(span.indices, n_boxes)
        if outside and span.boxes is None:
            warnings.append(out_of_range_warning(span.phrase, outside, n_boxes))
    return warnings


def build_detections(
    answer: GroundedAnswer, categories: Sequence[str], boxes: InputBoxes
) -> tuple[list[Detection], list[str]]:
    """Turn a detection answer into `Detection`s (one per selected (category, box)) and warnings.

    Each span's phrase is matched to a requested category (`match_category`); unmatched phrases and
    out-of-range indices are reported as warnings, never as detections. A box selected twice for the
    same category is reported once. Detections are in answer order.
    """
    detections: list[Detection] = []
    warnings = index_warnings(answer, len(boxes))
    seen: set[tuple[str, int]] = set()
    for span in answer.spans:
        category = match_category(span.phrase, categories)
        if category is None:
            warnings.append(f"answer phrase {span.phrase!r} matches none of the requested categories "
                            f"{list(categories)}; its boxes are not reported as detections")
            continue
        inside, _ = _split_indices(span.indices, len(boxes))
        for k in inside:
            if (category, k) in seen:
                continue
            seen.add((category, k))
            detections.append(Detection(category, [float(v) for v in boxes.boxes[k]], float(boxes.scores[k]), k))
    return detections, warnings


def region_caption_text(answer: GroundedAnswer, index: int) -> str:
    """The caption of box `index` in a region-caption answer.

    The model answers ``<ground>caption</ground><objects><objK></objects>``: the phrase of the span
    naming `index` wins, then the first span's phrase, then the plain answer text.
    """
    for span in answer.spans:
        if index in span.indices:
            return span.phrase
    if answer.spans:
        return answer.spans[0].phrase
    return answer.text.strip()
