"""The answer grammar: parse model text into grounded spans, and render spans back into text.

Grammar (chatrex_reference.md §7)::

    answer   := ( free_text | grounded )*
    grounded := "<ground>" phrase "</ground>" "<objects>" "<objK>"+ "</objects>"

`parse_answer` never raises: whatever the model wrote, it returns a `GroundedAnswer` whose `problems`
list says what did not fit the grammar. It also accepts the paper's `<g>…</g><o>…</o>` shorthand,
whitespace/newlines between the tags, and the spaced form slow tokenizers produce
(`<ground> dog </ground> <objects> <obj1> </objects>`). Pure functions: no torch, no tokenizer.

Unlike the seed's `visualize_chatrex_output`, every grounded span is returned (a repeated phrase gives
one span per occurrence) and spans may hold newlines.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from chatrex.constants import GROUND_END, GROUND_START, OBJECTS_END, OBJECTS_START, object_token

# One pass over the text finds every tag-like token. Group names pick the token kind.
_TOKEN = re.compile(
    r"<(?P<close>/?)(?P<tag>ground|g|objects|o)>"  # grammar tags and the paper's shorthand
    r"|<obj(?P<idx>\d{1,9})>"  # an object index (more digits fall through to "unknown")
    r"|(?P<special><\|[^<>|\s]{1,40}\|>|</?(?:s|unk|pad)>)"  # tokenizer specials (EOS, ChatML markers)
    r"|(?P<unknown></?[A-Za-z][\w\-.:]{0,40}/?>)"  # anything else that looks like a tag
)
_GROUND = {"ground", "g"}
_LIST_SEPARATORS = set(" \t\r\n\f\v,;")  # ignored between <objK> tokens


@dataclass(frozen=True)
class GroundedSpan:
    """One grounded phrase.

    phrase: the phrase, stripped. indices: box indices in the order written, duplicates removed.
    start / end: character offsets of `phrase` in `GroundedAnswer.text` (text[start:end] == phrase).
    boxes: the boxes of the in-range indices when boxes were given to `parse_answer`, else None.
    """

    phrase: str
    indices: list[int]
    start: int
    end: int
    boxes: list[list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GroundedAnswer:
    """A parsed answer: `raw` input, `text` with the grammar tags removed (free `<objK>` mentions kept as
    written), `spans` in order of appearance, and `problems` (grammar issues, as data)."""

    raw: str
    text: str
    spans: list[GroundedSpan]
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"raw": self.raw, "text": self.text, "spans": [s.to_dict() for s in self.spans], "problems": list(self.problems)}


class _Parser:
    """Single left-to-right pass; states: out (free text), ground (phrase), after (</ground> seen), objects."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.size = 0  # len("".join(self.out))
        self.space_pending = False  # the phrase ended in whitespace: keep one space before glued text
        self.state = "out"
        self.parts: list[str] = []  # raw phrase pieces while in "ground"
        self.open_at = 0
        self.span: dict[str, Any] | None = None  # the span being built after </ground>
        self.between = ""  # whitespace between </ground> and <objects>
        self.implicit = False  # the objects list started without <objects>
        self.spans: list[dict[str, Any]] = []
        self.mentions: list[tuple[int, int]] = []  # free <objK> mentions: (index, raw offset)
        self.problems: list[str] = []

    # ---------------------------------------------------------------- text output
    def emit(self, piece: str) -> None:
        if not piece:
            return
        if self.space_pending and not piece[0].isspace() and self.size and not self.out[-1][-1:].isspace():
            self.out.append(" ")
            self.size += 1
        self.space_pending = False
        self.out.append(piece)
        self.size += len(piece)

    def last_char_is_space(self) -> bool:
        return not self.out or self.out[-1][-1:].isspace()

    # ---------------------------------------------------------------- driving
    def run(self, text: str) -> None:
        pos = 0
        for match in _TOKEN.finditer(text):
            if match.start() > pos:
                self.feed("text", text[pos : match.start()], pos, None)
            kind, index = _classify(match)
            self.feed(kind, match.group(0), match.start(), index)
            pos = match.end()
        if pos < len(text):
            self.feed("text", text[pos:], pos, None)
        self.feed("end", "", len(text), None)

    def feed(self, kind: str, raw: str, at: int, index: int | None) -> None:
        handler = getattr(self, f"in_{self.state}")
        if handler(kind, raw, at, index):  # True = the token was not consumed: hand it to the new state
            self.feed(kind, raw, at, index)

    # ---------------------------------------------------------------- states
    def in_out(self, kind: str, raw: str, at: int, index: int | None) -> bool:
        if kind == "text":
            self.emit(raw)
        elif kind == "obj":
            self.mentions.append((index, at))
            self.emit(raw)  # a free mention stays as written
        elif kind == "g_open":
            self.state, self.parts, self.open_at = "ground", [], at
        elif kind == "o_open":
            self.problems.append(f"{raw} at char {at} has no <ground>phrase</ground> before it; its indices are ignored")
            self.state, self.span, self.implicit = "objects", None, False
        elif kind in ("g_close", "o_close"):
            self.problems.append(f"stray {raw} at char {at} (nothing open to close)")
        elif kind == "special":
            self.problems.append(f"tokenizer special token {raw} at char {at} removed")
        elif kind == "unknown":
            self.problems.append(f"unknown tag {raw} at char {at} kept as text")
            self.emit(raw)
        return False

    def in_ground(self, kind: str, raw: str, at: int, index: int | None) -> bool:
        if kind in ("text", "obj"):
            self.parts.append(raw)  # an <objK> inside a phrase is part of the phrase
        elif kind == "g_close":
            self.close_phrase()
            self.state, self.between = "after", ""
        elif kind == "o_open":
            self.problems.append(f"<objects> at char {at} before </ground> (the <ground> at char {self.open_at} was not closed)")
            self.close_phrase()
            self.state, self.implicit = "objects", False
        elif kind in ("g_open", "end"):
            what = "a nested <ground> at char %d" % at if kind == "g_open" else "the end of the text"
            self.problems.append(f"unclosed <ground> at char {self.open_at} (reached {what}); its text is kept as plain text")
            self.state = "out"
            self.emit("".join(self.parts))
            return kind == "g_open"
        elif kind == "o_close":
            self.problems.append(f"stray {raw} at char {at} inside <ground> (no <objects> open)")
        elif kind == "special":
            self.problems.append(f"tokenizer special token {raw} at char {at} removed")
        else:  # unknown tag
            self.problems.append(f"unknown tag {raw} at char {at} kept as text")
            self.parts.append(raw)
        return False

    def in_after(self, kind: str, raw: str, at: int, index: int | None) -> bool:
        if kind == "text" and raw.isspace():
            self.between += raw  # allowed between </ground> and <objects>
            return False
        if kind == "o_open":
            self.state, self.implicit = "objects", False
            return False
        if kind == "obj":
            self.problems.append(f"<obj{index}> at char {at} follows </ground> without <objects>")
            self.state, self.implicit = "objects", True
            return True
        phrase = self.span["phrase"] if self.span else ""
        self.problems.append(f"<ground>{phrase}</ground> has no <objects> list after it (char {at})")
        self.finish_span()
        self.emit(self.between)
        return kind != "end"

    def in_objects(self, kind: str, raw: str, at: int, index: int | None) -> bool:
        if kind == "obj":
            if self.span is not None and index not in self.span["indices"]:
                self.span["indices"].append(index)
        elif kind == "o_close":
            self.finish_span()
        elif kind == "text" and set(raw) <= _LIST_SEPARATORS:
            pass  # whitespace or commas between indices
        elif kind in ("o_open", "g_close", "special", "unknown"):
            self.problems.append(f"unexpected {raw} at char {at} inside an object list; ignored")
        else:  # real text, a new <ground>, or the end: the list was never closed
            if not self.implicit:
                self.problems.append(f"unclosed <objects> (closed at char {at} by {'the end of the text' if kind == 'end' else repr(raw[:20])})")
            self.finish_span()
            return kind != "end"
        return False

    # ---------------------------------------------------------------- spans
    def close_phrase(self) -> None:
        raw = "".join(self.parts)
        phrase = raw.strip()
        if raw[:1].isspace() and not self.last_char_is_space():
            self.emit(" ")  # "A<ground> dog" -> "A dog"
        self.emit(phrase)
        start = self.size - len(phrase)
        self.space_pending = raw[-1:].isspace()
        if not phrase:
            self.problems.append(f"empty phrase in the <ground> at char {self.open_at}")
        self.span = {"phrase": phrase, "indices": [], "start": start, "end": start + len(phrase), "at": self.open_at}

    def finish_span(self) -> None:
        self.state = "out"
        span, self.span = self.span, None
        if span is None:
            return
        if not span["indices"]:
            self.problems.append(f"no object indices for {span['phrase']!r} (the <ground> at char {span['at']})")
        self.spans.append(span)


def _classify(match: re.Match) -> tuple[str, int | None]:
    if match.group("tag"):
        name = "g" if match.group("tag") in _GROUND else "o"
        return f"{name}_{'close' if match.group('close') else 'open'}", None
    if match.group("idx") is not None:
        return "obj", int(match.group("idx"))
    return ("special" if match.group("special") else "unknown"), None


def _box_list(boxes: Any, problems: list[str]) -> list[list[float]] | None:
    if boxes is None:
        return None
    try:
        rows = boxes.tolist() if hasattr(boxes, "tolist") else list(boxes)
        return [[float(v) for v in row] for row in rows]
    except (TypeError, ValueError) as err:
        problems.append(f"boxes could not be read as a list of [x1, y1, x2, y2] ({err}); spans carry no boxes")
        return None


def _as_text(text: Any) -> str:
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    return text if isinstance(text, str) else str(text)


def parse_answer(text: str, boxes: Sequence[Sequence[float]] | Any = None) -> GroundedAnswer:
    """Parse a model answer into grounded spans. Never raises.

    Args:
        text: the decoded answer (None is read as ""; bytes are decoded as UTF-8).
        boxes: optional input boxes (N, 4) (lists, numpy or tensor): spans then carry the boxes of their
            in-range indices, and out-of-range indices are reported in `problems`.

    Returns:
        `GroundedAnswer(raw, text, spans, problems)`: `text` has every grammar tag removed, free `<objK>`
        mentions kept as written, outer whitespace stripped; `text[span.start:span.end] == span.phrase`.
    """
    raw = _as_text(text)
    parser = _Parser()
    try:
        parser.run(raw)
    except Exception as err:  # a parser bug must not take down an app: report it as data
        return GroundedAnswer(raw, raw.strip(), [], [f"internal parser error ({type(err).__name__}: {err}); text returned as is"])
    return _build(raw, parser, _box_list(boxes, parser.problems))


def _build(raw: str, parser: _Parser, boxes: list[list[float]] | None) -> GroundedAnswer:
    full = "".join(parser.out)
    text = full.strip()
    lead = len(full) - len(full.lstrip())
    problems = parser.problems
    spans = []
    for s in parser.spans:
        start = min(max(s["start"] - lead, 0), len(text))
        end = max(min(s["end"] - lead, len(text)), start)
        kept = None
        if boxes is not None:
            outside = [i for i in s["indices"] if i >= len(boxes)]
            if outside:
                problems.append(f"{s['phrase']!r} names {['<obj%d>' % i for i in outside]} but only {len(boxes)} boxes were given")
            kept = [list(boxes[i]) for i in s["indices"] if i < len(boxes)]
        spans.append(GroundedSpan(s["phrase"], list(s["indices"]), start, end, kept))
    if boxes is not None:
        for index, at in parser.mentions:
            if index >= len(boxes):
                problems.append(f"free mention <obj{index}> at char {at} is out of range ({len(boxes)} boxes)")
    return GroundedAnswer(raw, text, spans, problems)


# ---------------------------------------------------------------------------------------------- rendering
def render_span(phrase: str, indices: Iterable[int]) -> str:
    """`<ground>phrase</ground><objects><objI>…</objects>`; indices must be in 0..99 (ValueError otherwise)."""
    tokens = "".join(object_token(int(i)) for i in indices)
    return f"{GROUND_START}{phrase}{GROUND_END}{OBJECTS_START}{tokens}{OBJECTS_END}"


def _span_fields(item: Any) -> tuple[str, list[int], int | None, int | None]:
    if isinstance(item, GroundedSpan):
        return item.phrase, list(item.indices), item.start, item.end
    if isinstance(item, dict):
        return str(item["phrase"]), list(item["indices"]), item.get("start"), item.get("end")
    phrase, indices, *offsets = item
    start, end = (offsets + [None, None])[:2]
    return str(phrase), list(indices), start, end


def render_answer(spans: Iterable[Any], text: str | None = None, sep: str = "\n") -> str:
    """Build answer text in the grammar (for training targets and tests).

    Args:
        spans: `GroundedSpan`s, dicts with phrase/indices(/start/end), or (phrase, indices[, start, end]) tuples.
        text: None -> the spans rendered one after another, joined by `sep` (the detection answer form,
            e.g. "<ground>person</ground><objects><obj0></objects>\\n<ground>pigeon</ground>…"). Otherwise the
            free text the spans sit in: each span's `text[start:end]` (which must equal its phrase) is wrapped
            in tags, so `render_answer(a.spans, a.text)` rebuilds a compact answer from `parse_answer`.
    Raises:
        ValueError for an index outside 0..99, or spans that do not fit `text` (missing/overlapping offsets).
    """
    items = [_span_fields(item) for item in spans]
    if text is None:
        return sep.join(render_span(phrase, indices) for phrase, indices, _, _ in items)
    pieces, cursor = [], 0
    for phrase, indices, start, end in sorted(items, key=lambda it: (it[2] is None, it[2] or 0)):
        if start is None or end is None or start < cursor or text[start:end] != phrase:
            raise ValueError(f"span {phrase!r} ({start}, {end}) does not match the text at those offsets or overlaps the previous span")
        pieces += [text[cursor:start], render_span(phrase, indices)]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------- helpers
def _parsed(answer: GroundedAnswer | str) -> GroundedAnswer:
    return answer if isinstance(answer, GroundedAnswer) else parse_answer(answer)


def answer_indices(answer: GroundedAnswer | str, include_mentions: bool = False) -> set[int]:
    """Every box index the answer grounds (free `<objK>` mentions too when `include_mentions`)."""
    parsed = _parsed(answer)
    found = {i for span in parsed.spans for i in span.indices}
    if include_mentions:
        # Spans are removed from `text`; whatever <objK> remains there is a free mention.
        found |= {int(m.group("idx")) for m in _TOKEN.finditer(parsed.text) if m.group("idx") is not None}
    return found


def phrase_indices(answer: GroundedAnswer | str) -> dict[str, list[int]]:
    """Phrase -> indices, merging repeated phrases in order of first use (duplicates removed)."""
    merged: dict[str, list[int]] = {}
    for span in _parsed(answer).spans:
        bucket = merged.setdefault(span.phrase, [])
        bucket.extend(i for i in span.indices if i not in bucket)
    return merged


__all__ = [
    "GroundedAnswer",
    "GroundedSpan",
    "answer_indices",
    "parse_answer",
    "phrase_indices",
    "render_answer",
    "render_span",
]
