"""ChatRex instruction samples: input boxes (every object once, unambiguous distractors), answers
that parse and point at the right boxes, canonical prompts, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from chatrex import prompts as P
from chatrex.data.instructions import (
    ALL_TASKS, detection_sample, make_input_boxes, make_samples, object_to_box, region_sample,
)
from chatrex.data.synthetic import CATEGORIES, sample_scene
from chatrex.grounding import answer_indices, parse_answer, phrase_indices


def _iou(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


@pytest.fixture(scope="module")
def scenes():
    return [sample_scene(500 + i) for i in range(60)]


def test_input_boxes_hold_every_object_once(scenes):
    rng = np.random.default_rng(0)
    shuffled = 0
    for s in scenes:
        boxes, owner = make_input_boxes(s, rng)
        n = len(s.objects)
        assert len(boxes) == len(owner) <= 100 and len(boxes) <= n + 3 * n + 4
        assert sorted(o for o in owner if o is not None) == list(range(n))
        for b, o in zip(boxes, owner):
            assert 0 <= b[0] < b[2] <= s.width and 0 <= b[1] < b[3] <= s.height
            if o is None:  # distractors never match an object
                assert all(_iou(b, g) < 0.5 for g in s.boxes)
            else:  # jittered ground truth stays on its object
                assert _iou(b, s.boxes[o]) >= 0.7
        shuffled += owner[: n] != list(range(n))
        assert [boxes[k] for k in object_to_box(owner, n)] == [boxes[owner.index(i)] for i in range(n)]
    assert shuffled > len(scenes) // 2


def test_input_boxes_from_proposals():
    s = sample_scene(3, min_objects=4)
    rng = np.random.default_rng(1)
    gt = s.boxes
    near = gt + 1.0  # duplicates of objects: dropped
    far = np.array([[0, 0, 5, 5], [1, 1, 9, 9]] * 100, dtype=np.float32)
    boxes, owner = make_input_boxes(s, rng, proposals=np.concatenate([near, far]), max_boxes=50)
    assert len(boxes) == 50 and owner.count(None) == 50 - len(s.objects)
    for b, o in zip(boxes, owner):
        if o is None:
            assert b in ([0, 0, 5, 5], [1, 1, 9, 9])
    with pytest.raises(ValueError, match="max_boxes"):
        make_input_boxes(s, rng, max_boxes=len(s.objects) - 1)
    boxes, owner = make_input_boxes(s, rng, max_distractors=0, jitter=0)
    assert owner.count(None) == 0 and sorted(map(tuple, boxes)) == sorted(map(tuple, gt.tolist()))


def _check_sample(smp, scene):
    parsed = parse_answer(smp.answer, smp.boxes)
    assert not parsed.problems, (smp.task, smp.answer, parsed.problems)
    owner = smp.meta["owner"]
    idx = sorted(answer_indices(parsed))
    assert idx == smp.meta["targets"], (smp.task, smp.answer)
    assert sorted(owner[i] for i in idx) == smp.meta["objects"]
    objs = scene.objects
    if smp.task in ("detect", "detect_multi", "detect_absent"):
        cats = smp.meta.get("categories") or [smp.meta["category"]]
        assert smp.question.count(";") == len(cats) - 1
        for phrase, ix in phrase_indices(parsed).items():
            assert phrase in cats and ix == sorted(ix)
            assert sorted(owner[i] for i in ix) == [o.index for o in objs if o.category == phrase]
        present = [c for c in cats if any(o.category == c for o in objs)]
        assert list(phrase_indices(parsed)) == present
        if not present:
            assert smp.answer.startswith("There is no ") and not parsed.spans
    elif smp.task == "refer":
        expr = smp.meta["expression"]
        assert expr in smp.question and dict(scene.referring_expressions())[expr] == smp.meta["objects"]
    elif smp.task.startswith("region_"):
        (k,) = idx
        assert f"<obj{k}>" in smp.question and len(parsed.spans) == 1
        o = objs[owner[k]]
        attr = {"region_category": "category", "region_short": "phrase", "region_brief": "brief",
                "region_sentence": "sentence"}[smp.task]
        assert parsed.spans[0].phrase == getattr(o, attr)
    elif smp.task == "count":
        n = int(smp.answer.split()[2])
        assert n == len(idx) == smp.meta["count"]
        assert all(objs[owner[i]].category == smp.meta["category"] for i in idx)
    elif smp.task.startswith("caption"):
        assert idx == sorted(object_to_box(owner, len(objs)))
    elif smp.task == "conversation":
        assert smp.question.startswith(P.GROUNDED_CONVERSATION_PREFIX)


def test_every_task_answers_parse_and_point_at_the_right_boxes(scenes):
    rng = np.random.default_rng(0)
    seen = set()
    for s in scenes:
        boxes_owner = make_input_boxes(s, rng)
        for smp in make_samples(s, rng, boxes=boxes_owner):
            smp.meta["owner"] = boxes_owner[1]
            assert smp.boxes == boxes_owner[0] and smp.image is s.image
            _check_sample(smp, s)
            seen.add(smp.task)
    assert seen == set(ALL_TASKS)


def test_samples_are_deterministic_and_canonical_without_paraphrase():
    s = sample_scene(11, min_objects=5)
    a = make_samples(s, np.random.default_rng(4))
    b = make_samples(s, np.random.default_rng(4))
    assert [(x.question, x.answer, x.boxes, x.meta) for x in a] == [(x.question, x.answer, x.boxes, x.meta) for x in b]
    c = make_samples(s, np.random.default_rng(4), tasks=("detect", "region_brief", "caption_brief", "count"),
                     paraphrase=False)
    assert c[0].question == P.detection_prompt(c[0].meta["category"])
    assert c[1].question == P.region_prompt(c[1].meta["targets"][0], "brief")
    assert c[2].question == P.caption_prompt(False)
    assert c[3].question.startswith("How many ")
    with pytest.raises(ValueError, match="unknown tasks"):
        make_samples(s, np.random.default_rng(0), tasks=("dance",))


def test_paraphrases_are_drawn_from_the_families():
    s = sample_scene(12, min_objects=4)
    rng = np.random.default_rng(0)
    questions = {make_samples(s, rng, tasks=("detect",))[0].question.split(" in this image")[0][:12]
                 for _ in range(40)}
    assert len(questions) >= 4


def test_eval_helpers():
    s = sample_scene(21, min_objects=5)
    boxes, owner = make_input_boxes(s, np.random.default_rng(0), max_distractors=5)
    cats = sorted({o.category for o in s.objects})
    smp = detection_sample(s, boxes, owner, cats[0])
    assert smp.question == P.detection_prompt(cats[0])
    assert sorted(owner[i] for i in answer_indices(smp.answer)) == [o.index for o in s.objects if o.category == cats[0]]
    absent = [c for c in CATEGORIES if c not in cats][:2]
    smp = detection_sample(s, boxes, owner, "; ".join(absent))
    assert smp.answer == f"There is no {absent[0]} or {absent[1]} in this image." and smp.meta["targets"] == []
    smp = detection_sample(s, boxes, owner, [absent[0], cats[0]])
    assert list(phrase_indices(smp.answer)) == [cats[0]]
    r = region_sample(s, boxes, owner, 2, style="sentence")
    k = object_to_box(owner, len(s.objects))[2]
    assert r.question == P.region_prompt(k, "sentence") and s.objects[2].sentence in r.answer
