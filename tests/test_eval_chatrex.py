"""ChatRex evaluation: metric functions on literal answers, the evaluation loops on scripted answers /
a fake pipeline, and the SHIPPED tiny model on held-out scenes of both renderers (the issue's bars)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chatrex.eval import chatrex_eval as E
from chatrex.grounding import render_span

torch.set_num_threads(1)
SHIPPED = Path(str(resources.files("chatrex").joinpath("assets", "tiny_chatrex")))
SHIPPED_UPN = Path(str(resources.files("chatrex").joinpath("assets", "tiny_upn.safetensors")))


# ---------------------------------------------------------------------------------------------- literal answers
def test_answer_parsing_on_literal_strings():
    assert E.answered_indices("<ground>red circle</ground><objects><obj1><obj4></objects>") == {1, 4}
    assert E.answered_indices("There is no blue star in this image.") == set()
    two = "<ground>red circle</ground><objects><obj2></objects>\n<ground>blue star</ground><objects><obj0></objects>"
    assert E.answered_indices(two) == {0, 2}
    assert E.answer_phrase("<ground>red circle</ground><objects><obj2></objects>") == "red circle"
    assert E.answer_phrase("a green hexagon") == "a green hexagon"
    assert E.normalize_phrase("  A Red   circle. ") == "red circle"
    assert E.normalize_phrase("the star") == "star"


def test_referring_match_is_one_to_one_at_iou_half():
    t = [[0, 0, 10, 10]]
    assert E.referring_correct([[0, 0, 10, 10]], t)
    assert E.referring_correct([[0, 0, 10, 7]], t)  # IoU 0.7
    assert not E.referring_correct([[0, 0, 10, 4]], t)  # IoU 0.4
    assert not E.referring_correct([], t)
    assert not E.referring_correct([[0, 0, 10, 10], [20, 20, 30, 30]], t)  # an extra box
    two = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert E.referring_correct(two[::-1], two)
    assert not E.referring_correct([[0, 0, 10, 10], [1, 1, 10, 10]], two)  # both on the same target


def test_judge_each_kind():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], np.float64)
    detect = E._Query("detect", "q", {0, 2})
    assert E._judge(detect, render_span("red circle", [0, 2]), boxes)
    assert not E._judge(detect, render_span("red circle", [0]), boxes)
    absent = E._Query("absent", "q", set())
    assert E._judge(absent, "There is no red circle in this image.", boxes)
    assert not E._judge(absent, render_span("red circle", [1]), boxes)
    region = E._Query("region", "q", "blue star")
    assert E._judge(region, render_span("blue star", [1]), boxes)
    assert not E._judge(region, render_span("blue circle", [1]), boxes)
    refer = E._Query("refer", "q", [[21.0, 21.0, 40.0, 40.0]])
    assert E._judge(refer, render_span("the largest shape", [1]), boxes)
    assert not E._judge(refer, render_span("the largest shape", [0]), boxes)
    assert not E._judge(refer, render_span("the largest shape", [7]), boxes)  # out of range index


# ---------------------------------------------------------------------------------------------- loops
def _oracle(item, boxes, queries, wrong=False):
    """Correct (or deliberately wrong) answers for `queries`, from the ground truth."""
    out = []
    for q in queries:
        if q.kind in ("detect", "absent"):
            ix = sorted(q.target) if not wrong else [len(boxes)]
            out.append(render_span("x", ix) if ix else "There is none.")
        elif q.kind == "region":
            out.append(render_span(q.target if not wrong else "nothing", [0]))
        else:
            k = int(np.argmax(E.box_iou(np.asarray(q.target), boxes)[0]))
            out.append(render_span("x", [k if not wrong else (k + 1) % len(boxes)]))
    return out


@pytest.mark.parametrize("wrong", [False, True])
def test_evaluate_chatrex_counts_and_scores(monkeypatch, wrong):
    items = E.heldout_scenes(3, seed=5)
    state = {}

    def fake_build(item, owner, rng, absent, refer):
        queries = real_build(item, owner, rng, absent, refer)
        state["queries"] = queries
        return queries

    def fake_answer(model, processor, image, boxes, questions, *args):
        state["boxes"] = boxes
        return _oracle(None, boxes, state["queries"], wrong)

    real_build = E.build_queries
    monkeypatch.setattr(E, "build_queries", fake_build)
    monkeypatch.setattr(E, "answer_questions", fake_answer)
    records = []
    scores = E.evaluate_chatrex(SimpleNamespace(eval=lambda: None), None, items, distractors=2,
                                records=records, refer_per_image=2)
    n_obj = sum(len(i.categories) for i in items)
    assert scores["n_region"] == n_obj and scores["n_images"] == 3
    assert scores["n_detect"] == sum(len(set(i.categories)) for i in items) + 3
    assert len(records) == scores["n_detect"] + scores["n_region"] + scores["n_refer"]
    want = 0.0 if wrong else 1.0
    for key in ("detect_exact", "region_category_acc", "refer_acc50"):
        assert scores[key] == want, (key, scores)
    assert len(state["boxes"]) == len(items[-1].categories) + 2  # GT + 2 distractors


class _FakePipeline:
    """detect() returns the ground-truth boxes of the asked category (score 0.9) plus one junk box."""

    def __init__(self, items, junk=False):
        self.by_image = {id(i.image): i for i in items}
        self.junk = junk

    def detect(self, image, categories):
        item = self.by_image[id(image)]
        dets = [SimpleNamespace(box=list(b), score=0.9) for b, c in zip(item.boxes, item.categories) if c == categories[0]]
        if self.junk:
            dets = [SimpleNamespace(box=[0.0, 0.0, 3.0, 3.0], score=0.95)] + [SimpleNamespace(box=d.box, score=0.1) for d in dets]
        return SimpleNamespace(detections=dets)


def test_pipeline_ap_on_a_fake_pipeline(tmp_path):
    items = E.heldout_scenes(4, seed=9)
    gt = E.items_to_coco(items)
    perfect = E.pipeline_ap(_FakePipeline(items), items, gt)
    assert perfect["AP50"] == pytest.approx(1.0) and perfect["AP"] == pytest.approx(1.0)
    worse = E.pipeline_ap(_FakePipeline(items, junk=True), items, gt)
    assert worse["AP50"] < 1.0
    # The file-based entry point reads a COCO json + image folder.
    for item, img in zip(items, gt["images"]):
        item.image.save(tmp_path / img["file_name"])
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    data, loaded = E.load_coco(tmp_path / "ann.json", tmp_path)
    assert [sorted(i.categories) for i in loaded] == [sorted(i.categories) for i in items]
    np.testing.assert_allclose(np.concatenate([i.boxes for i in loaded]), np.concatenate([i.boxes for i in items]),
                               atol=1e-3)


# ---------------------------------------------------------------------------------------------- shipped model
@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"no shipped tiny ChatRex at {SHIPPED}")
    from chatrex.model.loading import load_chatrex

    return load_chatrex(SHIPPED, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("renderer", ["default", "alt"])
def test_shipped_model_meets_the_bars_with_gt_boxes(shipped, renderer):
    model, processor = shipped
    items = E.heldout_scenes(20, seed=123, renderer=renderer)
    scores = E.evaluate_chatrex(model, processor, items, distractors=0)
    assert scores["detect_exact"] >= 0.95, scores
    assert scores["region_category_acc"] >= 0.95, scores
    assert scores["refer_acc50"] >= 0.9, scores


def test_shipped_pipeline_detection_by_retrieval(shipped):
    if not SHIPPED_UPN.is_file():
        pytest.skip(f"no shipped tiny UPN at {SHIPPED_UPN}")
    from chatrex.pipeline import ChatRex

    pipe = ChatRex.from_pretrained(dtype=torch.float32, device="cpu")
    items = E.heldout_scenes(15, seed=321)
    scores = E.pipeline_ap(pipe, items, E.items_to_coco(items))
    assert scores["AP50"] >= 0.85, scores
