"""ChatRex instruction samples from synthetic scenes (training and evaluation).

A `Sample` is one question/answer pair about one image with its input boxes (xyxy px of the scene
image, in `<objK>` order). Input boxes are the ground-truth boxes (lightly jittered) mixed with
distractors — UPN proposals when given, else random / partial-object / background boxes — shuffled,
at most `max_boxes`, as in the paper. A distractor never has IoU >= 0.5 with a ground-truth box, so
every object has exactly one correct index and the target index sets are unambiguous.

Answers follow the `chatrex.grounding` grammar. Decisions the seed leaves open:
- detection lists indices ascending, one `<ground>category</ground><objects>…</objects>` per present
  category in the order asked, joined by "\n"; absent categories of a multi-category query are left
  out; a query whose categories are all absent is answered in plain text:
  "There is no blue star in this image." (no spans, so its index set is empty).
- counting: "There are 3 <ground>red circles</ground><objects><obj1><obj4><obj7></objects>." (digits).
- conversation questions carry the seed's "Answer the question in grounded format. " prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from chatrex import prompts as P
from chatrex.data.language import plural, referring_expressions
from chatrex.data.synthetic import CATEGORIES, COLOURS, SHAPES, Scene
from chatrex.grounding import render_span

DETECTION_TASKS = ("detect", "detect_multi", "detect_absent", "refer")
REGION_TASKS = ("region_category", "region_short", "region_brief", "region_sentence")
CAPTION_TASKS = ("caption_brief", "caption_detailed")
ALL_TASKS = DETECTION_TASKS + REGION_TASKS + CAPTION_TASKS + ("count", "conversation")

_REGION_FAMILY = {
    "region_category": (P.REGION_CATEGORY_PROMPTS, "category"),
    "region_short": (P.REGION_SHORT_PHRASE_PROMPTS, "phrase"),
    "region_brief": (P.REGION_BRIEF_PROMPTS, "brief"),
    "region_sentence": (P.REGION_ONE_SENTENCE_PROMPTS, "sentence"),
}
MATCH_IOU = 0.5  # a distractor must stay below this IoU with every ground-truth box


@dataclass
class Sample:
    """One instruction sample. boxes: input boxes xyxy px ([x1, y1, x2, y2] floats) in `<objK>` order.

    meta: "targets" (sorted box indices the answer grounds; [] for none), "objects" (scene object
    indices), "box_attrs" ([colour, shape] indices per box, [-1, -1] for distractors), and per task
    "category"/"categories"/"expression"/"object".
    """

    image: Image.Image = field(repr=False)
    boxes: list[list[float]]
    question: str
    answer: str
    task: str
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ input boxes
def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box (4,) with (M, 4) boxes."""
    if len(others) == 0:
        return np.zeros(0, dtype=np.float32)
    lt, rb = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    union = np.prod(box[2:] - box[:2]) + np.prod(others[:, 2:] - others[:, :2], axis=1) - inter
    return inter / np.maximum(union, 1e-6)


def _clip_box(box: np.ndarray, w: int, h: int) -> np.ndarray | None:
    b = np.array([np.clip(box[0], 0, w), np.clip(box[1], 0, h), np.clip(box[2], 0, w), np.clip(box[3], 0, h)],
                 dtype=np.float32)
    return b if b[2] - b[0] >= 2 and b[3] - b[1] >= 2 else None


def _random_distractor(kind: str, rng: np.random.Generator, gt: np.ndarray, w: int, h: int) -> np.ndarray | None:
    """One xyxy box of `kind` ("random" | "partial" | "background"), or None after a failed try."""
    if kind == "partial" and len(gt):
        x1, y1, x2, y2 = gt[int(rng.integers(len(gt)))]
        bw, bh = x2 - x1, y2 - y1
        if rng.random() < 0.5:  # a slice of the object
            fx, fy = rng.uniform(0.25, 0.6, 2)
            ox, oy = rng.uniform(0, 1 - fx) * bw, rng.uniform(0, 1 - fy) * bh
            box = np.array([x1 + ox, y1 + oy, x1 + ox + fx * bw, y1 + oy + fy * bh])
        else:  # the object's box shifted by more than half its size
            dx, dy = rng.uniform(0.55, 1.0, 2) * np.array([bw, bh]) * rng.choice([-1, 1], 2)
            box = np.array([x1 + dx, y1 + dy, x2 + dx, y2 + dy])
    else:
        bw, bh = rng.uniform(8, min(w, h) * 0.5, 2)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = np.array([x, y, x + bw, y + bh])
    box = _clip_box(box, w, h)
    if box is None or (_iou(box, gt) >= MATCH_IOU).any():
        return None
    if kind == "background" and len(gt):
        lt, rb = np.maximum(box[:2], gt[:, :2]), np.minimum(box[2:], gt[:, 2:])
        if (np.prod(np.clip(rb - lt, 0, None), axis=1) > 0).any():
            return None
    return box


def make_input_boxes(scene: Scene, rng: np.random.Generator, proposals: Any = None, max_boxes: int = 100,
                     max_distractors: int | None = None, jitter: float = 2.0
                     ) -> tuple[list[list[float]], list[int | None]]:
    """Input boxes for one scene: every ground-truth object once (jittered by up to `jitter` px per
    coordinate) + distractors, shuffled.

    proposals: optional (M, 4) xyxy px (e.g. UPN output, best first); those with IoU >= 0.5 against a
    ground-truth box are dropped (the ground truth stands for them), the rest are used in order.
    Without proposals, 0..max_distractors random / partial-object / background boxes are drawn
    (default max_distractors: 3 per object + 4). The total is capped at max_boxes (>= number of objects).
    Returns (boxes, gt_index_of_box): gt_index_of_box[k] is the scene object index of box k or None.
    """
    n = len(scene.objects)
    if max_boxes < n:
        raise ValueError(f"max_boxes={max_boxes} is below the {n} objects of the scene; every object needs a box")
    gt = scene.boxes.astype(np.float32)
    boxes: list[np.ndarray] = []
    for b in gt:
        j = _clip_box(b + rng.uniform(-jitter, jitter, 4), scene.width, scene.height) if jitter > 0 else None
        boxes.append(j if j is not None and _iou(j, b[None])[0] >= 0.7 else b)
    room = max_boxes - n
    limit = room if max_distractors is None and proposals is not None else min(
        room, 3 * n + 4 if max_distractors is None else max_distractors)
    extra: list[np.ndarray] = []
    if proposals is not None:
        props = np.asarray(proposals.tolist() if hasattr(proposals, "tolist") else proposals, dtype=np.float32)
        for p in props.reshape(-1, 4):
            if len(extra) >= limit:
                break
            c = _clip_box(p, scene.width, scene.height)
            if c is not None and not (_iou(c, gt) >= MATCH_IOU).any():
                extra.append(c)
    else:
        want = int(rng.integers(0, limit + 1)) if limit > 0 else 0
        for _ in range(want * 4):
            if len(extra) >= want:
                break
            d = _random_distractor(("random", "partial", "background")[int(rng.integers(3))], rng, gt,
                                   scene.width, scene.height)
            if d is not None:
                extra.append(d)
    owners: list[int | None] = list(range(n)) + [None] * len(extra)
    order = rng.permutation(len(owners))
    allb = boxes + extra
    return [[round(float(v), 2) for v in allb[k]] for k in order], [owners[k] for k in order]


def object_to_box(gt_index_of_box: Sequence[int | None], n_objects: int) -> list[int]:
    """Inverse map: box index of every scene object (ValueError when one is missing)."""
    out = [-1] * n_objects
    for k, obj in enumerate(gt_index_of_box):
        if obj is not None:
            out[obj] = k
    if -1 in out:
        raise ValueError(f"objects {[i for i, k in enumerate(out) if k < 0]} have no input box")
    return out


def box_attributes(scene: Scene, gt_index_of_box: Sequence[int | None]) -> list[list[int]]:
    """[colour index, shape index] of each input box's object ([-1, -1] for a distractor): what the
    symbolic training slots (`chatrex.train.symbolic`) are built from."""
    objs = scene.objects
    return [[-1, -1] if o is None else [COLOURS.index(objs[o].colour), SHAPES.index(objs[o].shape)]
            for o in gt_index_of_box]


# ------------------------------------------------------------------------------------------ task builders
class _Ctx:
    """What every task builder needs: the scene, its input boxes, the object->box map, rng, templates."""

    def __init__(self, scene, boxes, gt_index_of_box, rng, paraphrase):
        self.scene, self.boxes, self.owner, self.rng = scene, boxes, list(gt_index_of_box), rng
        self.box_of = object_to_box(gt_index_of_box, len(scene.objects))
        self.paraphrase = paraphrase

    def template(self, family: Sequence[str]) -> str:
        return family[int(self.rng.integers(len(family)))] if self.paraphrase else family[0]

    def pick(self, items: Sequence):
        return items[int(self.rng.integers(len(items)))]

    def sample(self, task, question, answer, targets, objects, **meta) -> Sample:
        meta.update(targets=sorted(int(t) for t in targets), objects=sorted(int(o) for o in objects),
                    box_attrs=box_attributes(self.scene, self.owner))
        return Sample(self.scene.image, self.boxes, question, answer, task, meta)


def _detect_answer(ctx: _Ctx, categories: Sequence[str]) -> tuple[str, list[int], list[int]]:
    counts = ctx.scene.counts()
    lines, targets, objects = [], [], []
    for cat in categories:
        if cat in counts:
            ix = sorted(ctx.box_of[o] for o in counts[cat])
            lines.append(render_span(cat, ix))
            targets += ix
            objects += counts[cat]
    if not lines:
        return f"There is no {P.join_targets(categories).replace('; ', ' or ')} in this image.", [], []
    return "\n".join(lines), targets, objects


def _absent(ctx: _Ctx, k: int) -> list[str]:
    present = set(ctx.scene.counts())
    pool = [c for c in CATEGORIES if c not in present]
    return [pool[i] for i in ctx.rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


def _task_detect(ctx: _Ctx, task: str) -> Sample | None:
    present = sorted(ctx.scene.counts())
    if task == "detect":
        if not present:
            return None
        cats = [ctx.pick(present)]
    elif task == "detect_absent":
        cats = _absent(ctx, 1)
    else:  # detect_multi: 2-3 categories, present ones plus sometimes an absent one
        if not present:
            return None
        k = min(int(ctx.rng.integers(2, 4)), len(present))
        cats = [present[i] for i in ctx.rng.choice(len(present), size=k, replace=False)]
        if len(cats) < 2 or ctx.rng.random() < 0.3:
            cats.insert(int(ctx.rng.integers(len(cats) + 1)), _absent(ctx, 1)[0])
    answer, targets, objects = _detect_answer(ctx, cats)
    question = P.render(ctx.template(P.GROUNDING_PROMPTS), P.join_targets(cats))
    meta = {"category": cats[0]} if len(cats) == 1 else {"categories": cats}
    return ctx.sample(task, question, answer, targets, objects, **meta)


def _task_refer(ctx: _Ctx, task: str) -> Sample | None:
    exprs = referring_expressions(ctx.scene)
    if not exprs:
        return None
    expr, objs = ctx.pick(exprs)
    ix = sorted(ctx.box_of[o] for o in objs)
    question = P.render(ctx.template(P.GROUNDING_PROMPTS), expr)
    return ctx.sample(task, question, render_span(expr, ix), ix, objs, expression=expr)


def _task_region(ctx: _Ctx, task: str) -> Sample | None:
    if not ctx.scene.objects:
        return None
    obj = ctx.pick(ctx.scene.objects)
    family, attr = _REGION_FAMILY[task]
    k = ctx.box_of[obj.index]
    question = P.render(ctx.template(family), P.object_token(k))
    return ctx.sample(task, question, render_span(getattr(obj, attr), [k]), [k], [obj.index],
                      object=obj.index, category=obj.category)


def _task_caption(ctx: _Ctx, task: str) -> Sample | None:
    detailed = task == "caption_detailed"
    family = P.DETAILED_GROUNDED_CAPTION_PROMPTS if detailed else P.BRIEF_GROUNDED_CAPTION_PROMPTS
    answer = ctx.scene.caption(detailed=detailed, box_index=ctx.box_of)
    n = len(ctx.scene.objects)
    return ctx.sample(task, ctx.template(family), answer, ctx.box_of, range(n))


def _task_count(ctx: _Ctx, task: str) -> Sample | None:
    counts = ctx.scene.counts()
    if not counts:
        return None
    cat = ctx.pick(sorted(counts))
    objs = counts[cat]
    ix = sorted(ctx.box_of[o] for o in objs)
    n = len(objs)
    answer = f"There {'is' if n == 1 else 'are'} {n} {render_span(plural(cat, n), ix)}."
    question = P.render(ctx.template(P.COUNTING_PROMPTS), plural(cat, 2))
    return ctx.sample(task, question, answer, ix, objs, category=cat, count=n)


def _listing(ctx: _Ctx, objs) -> str:
    """"a <ground>small red circle</ground><objects><obj3></objects> near the top left, ... and ..."."""
    items = [f"a {render_span(o.phrase, [ctx.box_of[o.index]])} {_where(o)}" for o in objs]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(o) -> str:
    from chatrex.data.language import where

    return where(o.position_word)


def _task_conversation(ctx: _Ctx, task: str) -> Sample | None:
    """Simple grounded QA: which shapes have a colour / where are the <shape>s / the largest shape."""
    scene = ctx.scene
    if not scene.objects:
        return None
    kind = ctx.pick(("colour", "shape", "largest"))
    if kind == "largest":
        exprs = dict(referring_expressions(scene))
        if "the largest shape" in exprs:
            o = scene.objects[exprs["the largest shape"][0]]
            question = "Which shape is the largest one in the image?"
            answer = f"The largest shape is {_listing(ctx, [o])}."
            return ctx.sample(task, P.conversation_prompt(question), answer, [ctx.box_of[o.index]], [o.index])
        kind = "colour"
    attr, vocab = ("colour", COLOURS) if kind == "colour" else ("shape", SHAPES)
    value = ctx.pick(vocab) if ctx.rng.random() < 0.2 else getattr(ctx.pick(scene.objects), attr)
    objs = [o for o in scene.objects if getattr(o, attr) == value]
    question = f"Which shapes are {value}?" if kind == "colour" else f"Where are the {value}s in this image?"
    noun = f"{value} shape" if kind == "colour" else value
    if not objs:
        answer = f"There is no {noun} in this image."
    else:
        n = len(objs)
        answer = f"There {'is' if n == 1 else 'are'} {n} {plural(noun, n)}: {_listing(ctx, objs)}."
    return ctx.sample(task, P.conversation_prompt(question), answer, [ctx.box_of[o.index] for o in objs],
                      [o.index for o in objs], **{attr: value})


_BUILDERS = {
    **{t: _task_detect for t in ("detect", "detect_multi", "detect_absent")},
    "refer": _task_refer,
    **{t: _task_region for t in REGION_TASKS},
    **{t: _task_caption for t in CAPTION_TASKS},
    "count": _task_count,
    "conversation": _task_conversation,
}


def make_samples(scene: Scene, rng: np.random.Generator, tasks: Sequence[str] = ALL_TASKS, proposals: Any = None,
                 *, max_boxes: int = 100, max_distractors: int | None = None, jitter: float = 2.0,
                 paraphrase: bool = True, boxes: tuple[list, list] | None = None) -> list[Sample]:
    """One sample per task in `tasks` (a task with no valid target in this scene is skipped), all
    sharing one set of input boxes (drawn with `make_input_boxes`, or `boxes=(boxes, gt_index_of_box)`).

    paraphrase=False uses each family's canonical (seed) prompt; True draws a paraphrase with `rng`.
    Deterministic in the rng state.
    """
    unknown = [t for t in tasks if t not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {ALL_TASKS}")
    if boxes is None:
        boxes = make_input_boxes(scene, rng, proposals, max_boxes=max_boxes, max_distractors=max_distractors,
                                 jitter=jitter)
    ctx = _Ctx(scene, boxes[0], boxes[1], rng, paraphrase)
    out = [_BUILDERS[t](ctx, t) for t in tasks]
    return [s for s in out if s is not None]


def detection_sample(scene: Scene, boxes: list[list[float]], gt_index_of_box: Sequence[int | None],
                     categories: str | Sequence[str], task: str = "detect") -> Sample:
    """Canonical-prompt detection/referring sample for given categories (evaluation helper)."""
    ctx = _Ctx(scene, boxes, gt_index_of_box, np.random.default_rng(0), paraphrase=False)
    cats = [c.strip() for c in (categories.split(";") if isinstance(categories, str) else categories)]
    answer, targets, objects = _detect_answer(ctx, cats)
    return ctx.sample(task, P.detection_prompt(cats), answer, targets, objects, categories=cats)


def region_sample(scene: Scene, boxes: list[list[float]], gt_index_of_box: Sequence[int | None],
                  obj_index: int, style: str = "category") -> Sample:
    """Canonical-prompt region caption sample for object `obj_index` ("category"|"short"|"brief"|"sentence")."""
    task = {"category": "region_category", "short": "region_short", "brief": "region_brief",
            "sentence": "region_sentence"}[style]
    ctx = _Ctx(scene, boxes, gt_index_of_box, np.random.default_rng(0), paraphrase=False)
    obj, k = scene.objects[obj_index], ctx.box_of[obj_index]
    answer = render_span(getattr(obj, _REGION_FAMILY[task][1]), [k])
    return ctx.sample(task, P.region_prompt(k, style), answer, [k], [obj_index], object=obj_index,
                      category=obj.category)
