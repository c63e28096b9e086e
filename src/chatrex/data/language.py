"""Language of the shapes world: object descriptions, grounded captions, referring expressions.

Pure functions over `Scene` / `SceneObject` (no drawing). Captions are written in the answer grammar
of `chatrex.grounding` with `<objK>` indices given by a caller-chosen box order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from chatrex.grounding import render_span

if TYPE_CHECKING:
    from chatrex.data.synthetic import Scene, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "texture": "lightly textured",
                    "stripes": "striped", "two_tone": "two-tone", "noise": "noisy"}
SIZE_RATIO = 1.3  # "the largest X" only when it is >= 1.3x the area of the runner-up
POS_MARGIN = 10.0  # px: "the leftmost X" only when the runner-up is >= 10 px further right
REL_BAND = 8.0  # px: no relation expression when another candidate sits within 8 px of the boundary


def size_word(size_px: float) -> str:
    from chatrex.data.synthetic import SIZE_MEDIUM_MAX, SIZE_SMALL_MAX

    return "small" if size_px < SIZE_SMALL_MAX else "medium" if size_px < SIZE_MEDIUM_MAX else "large"


def position_word(cx: float, cy: float, width: int, height: int) -> str:
    """3x3 grid on the box centre: "top left", "top", "top right", "left", "center", ..., "bottom right"."""
    col = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else ""
    row = "top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else ""
    return " ".join(p for p in (row, col) if p) or "center"


def where(position: str) -> str:
    return "in the center" if position == "center" else f"near the {position}"


def plural(category: str, n: int) -> str:
    return category if n == 1 else category + "s"


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def count_phrase(category: str, n: int) -> str:
    """"a red circle", "two red circles", "12 red circles"."""
    if n == 1:
        return f"{article(category)} {category}"
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {plural(category, n)}"


def describe_object(index: int, shape: str, colour: str, box, width: int, height: int) -> "SceneObject":
    """Build the SceneObject (words included) for a drawn shape with xyxy px `box`."""
    from chatrex.data.synthetic import SceneObject

    x1, y1, x2, y2 = (float(v) for v in box)
    size = max(x2 - x1, y2 - y1)
    sw, pos = size_word(size), position_word((x1 + x2) / 2, (y1 + y2) / 2, width, height)
    category = f"{colour} {shape}"
    phrase = f"{sw} {category}"
    return SceneObject(
        shape=shape, colour=colour, box=(x1, y1, x2, y2), size_px=size, size_word=sw, position_word=pos,
        category=category, phrase=phrase, brief=f"a {phrase} {where(pos)}",
        sentence=f"A {phrase} sits {where(pos)} of the image.", index=index,
    )


def reading_order(objects: Sequence["SceneObject"], height: int) -> list["SceneObject"]:
    """Top band to bottom band (thirds of the image), left to right inside a band."""
    return sorted(objects, key=lambda o: (min(int(3 * o.center[1] / max(height, 1)), 2), o.center[0], o.index))


# ------------------------------------------------------------------------------------------ captions
def grounded_caption(scene: "Scene", detailed: bool = False, box_index: Sequence[int] | None = None) -> str:
    """Brief: one sentence naming every category with its count; detailed: one sentence per object.

    `box_index[i]` is the input-box index of object i (identity when None). Indices inside one span
    are ascending. An empty scene gives a plain sentence without spans.
    """
    idx = list(range(len(scene.objects))) if box_index is None else [int(i) for i in box_index]
    if len(idx) != len(scene.objects):
        raise ValueError(f"box_index has {len(idx)} entries for {len(scene.objects)} objects")
    bg = f"{BACKGROUND_WORDS.get(scene.background, scene.background)} background"
    if not scene.objects:
        return f"An empty {bg}."
    ordered = reading_order(scene.objects, scene.height)
    if not detailed:
        groups: dict[str, list[int]] = {}
        for o in ordered:
            groups.setdefault(o.category, []).append(idx[o.index])
        spans = [render_span(count_phrase(cat, len(ix)), sorted(ix)) for cat, ix in groups.items()]
        listed = spans[0] if len(spans) == 1 else ", ".join(spans[:-1]) + " and " + spans[-1]
        return f"A {bg} with {listed}."
    n = len(ordered)
    parts = [f"The image shows {count_phrase('shape', n) if n > 1 else 'one shape'} on a {bg}."]
    for o in ordered:
        parts.append(f"A {render_span(o.phrase, [idx[o.index]])} is {where(o.position_word)}.")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ referring
def _unique_extreme(objs, key: Callable, margin: float, ratio: bool = False):
    """The object with the largest key if it beats the runner-up by `margin` (or by x`margin` if ratio)."""
    if len(objs) < 2:
        return None
    ranked = sorted(objs, key=key, reverse=True)
    a, b = key(ranked[0]), key(ranked[1])
    ok = a >= b * margin if ratio else a - b >= margin
    return ranked[0] if ok else None


_EXTREMES = {
    "leftmost": lambda o: -o.center[0],
    "rightmost": lambda o: o.center[0],
    "topmost": lambda o: -o.center[1],
    "bottommost": lambda o: o.center[1],
}


def _relation(o: "SceneObject", anchor: "SceneObject", rel: str) -> float:
    """Signed distance (px) past the anchor's edge in direction `rel` (> 0: the relation holds)."""
    cx, cy = o.center
    x1, y1, x2, y2 = anchor.box
    return {"below": cy - y2, "above": y1 - cy, "to the left of": x1 - cx, "to the right of": cx - x2}[rel]


def _group_expressions(objs, noun: str, out: list) -> None:
    """Size and position superlatives within one group (all shapes of a kind / of a colour / all)."""
    if len(objs) < 2:
        return
    for word, sign in (("largest", 1), ("smallest", -1)):
        best = _unique_extreme(objs, lambda o: o.area ** sign, SIZE_RATIO, ratio=True)
        if best is not None:
            out.append((f"the {word} {noun}", [best.index]))
    for word, key in _EXTREMES.items():
        best = _unique_extreme(objs, key, POS_MARGIN)
        if best is not None:
            out.append((f"the {word} {noun}", [best.index]))


def referring_expressions(scene: "Scene") -> list[tuple[str, list[int]]]:
    """Unambiguous expressions, each naming exactly one object: (expression, [object index]).

    Families: unique attribute ("the blue shape", "the star", "the red circle"); superlatives within a
    shape, a colour or all shapes ("the largest circle", "the leftmost blue shape"); relations to a
    unique anchor shape ("the star below the square"), kept only when exactly one candidate satisfies
    the relation and no other candidate sits within REL_BAND px of the boundary.
    """
    objs = list(scene.objects)
    out: list[tuple[str, list[int]]] = []
    by_shape: dict[str, list] = {}
    by_colour: dict[str, list] = {}
    by_cat: dict[str, list] = {}
    for o in objs:
        by_shape.setdefault(o.shape, []).append(o)
        by_colour.setdefault(o.colour, []).append(o)
        by_cat.setdefault(o.category, []).append(o)
    for groups, fmt in ((by_cat, "the {}"), (by_colour, "the {} shape"), (by_shape, "the {}")):
        for key, members in sorted(groups.items()):
            if len(members) == 1:
                out.append((fmt.format(key), [members[0].index]))
    for shape, members in sorted(by_shape.items()):
        _group_expressions(members, shape, out)
    for colour, members in sorted(by_colour.items()):
        _group_expressions(members, f"{colour} shape", out)
    _group_expressions(objs, "shape", out)
    for anchor_shape, anchors in sorted(by_shape.items()):
        if len(anchors) != 1:
            continue
        anchor = anchors[0]
        for shape, members in sorted(by_shape.items()):
            if shape == anchor_shape:
                continue
            for rel in ("below", "above", "to the left of", "to the right of"):
                d = np.array([_relation(o, anchor, rel) for o in members])
                hits = d > 0
                if hits.sum() == 1 and not (np.abs(d) < REL_BAND).any():
                    out.append((f"the {shape} {rel} the {anchor_shape}", [members[int(np.argmax(hits))].index]))
    seen, unique = set(), []
    for expr, ix in out:  # one entry per expression text (an expression must name one set)
        if expr not in seen:
            seen.add(expr)
            unique.append((expr, ix))
    return unique
