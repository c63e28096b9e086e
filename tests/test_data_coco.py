"""COCO export of synthetic scenes: pycocotools loads it, boxes/categories/refs match the scenes,
files are deterministic, and the alternative renderer draws visibly different images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from chatrex.data.coco import load_coco, scenes_to_coco, write_synthetic_coco
from chatrex.data.synthetic import CATEGORIES, sample_scene, scene_stream

pycocotools = pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    return write_synthetic_coco(out, 12, seed=5), list(scene_stream(5, 12, split="test"))


def test_pycocotools_loads_the_file(exported):
    from pycocotools.coco import COCO

    path, scenes = exported
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == list(range(1, 13))
    assert len(coco.getAnnIds()) == sum(len(s.objects) for s in scenes)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CATEGORIES
    assert coco.getCatIds() == list(range(1, 41))


def test_annotations_match_the_scenes(exported):
    path, scenes = exported
    data = load_coco(path)
    for image_id, scene in zip(data.image_ids, scenes):
        info = data.images[image_id]
        assert (info["width"], info["height"], info["seed"]) == (scene.width, scene.height, scene.seed)
        assert np.allclose(data.boxes_xyxy(image_id), scene.boxes)
        assert data.categories_of(image_id) == scene.categories
        for a, o in zip(data.anns_by_image[image_id], scene.objects):
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h) and w > 0 and h > 0
            assert (a["phrase"], a["brief"], a["sentence"]) == (o.phrase, o.brief, o.sentence)
        # the PNG is the scene's image, pixel for pixel
        assert np.array_equal(np.asarray(data.load_image(image_id)), np.asarray(scene.image))


def test_refs_and_captions(exported):
    path, scenes = exported
    data = load_coco(path)
    ann_by_id = {a["id"]: a for a in data.data["annotations"]}
    assert data.refs
    for ref in data.refs:
        anns = [ann_by_id[i] for i in ref["ann_ids"]]
        assert all(a["image_id"] == ref["image_id"] for a in anns)
        scene = scenes[ref["image_id"] - 1]
        assert dict(scene.referring_expressions())[ref["expression"]] == [a["object_index"] for a in anns]
    caps = {c["image_id"]: c for c in data.data["captions"]}
    assert caps[1]["brief"] == scenes[0].caption() and caps[1]["detailed"] == scenes[0].caption(True)


def test_cocoeval_on_ground_truth_gives_ap_one(exported):
    from pycocotools.cocoeval import COCOeval

    path, _ = exported
    gt = load_coco(path).to_pycocotools()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt.dataset["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)


def test_export_is_deterministic(tmp_path, exported):
    path, _ = exported
    again = write_synthetic_coco(tmp_path / "again", 12, seed=5)
    assert json.loads(again.read_text())["annotations"] == json.loads(path.read_text())["annotations"]
    a = np.asarray(Image.open(again.parent / "images" / "000003.png"))
    b = np.asarray(Image.open(path.parent / "images" / "000003.png"))
    assert np.array_equal(a, b)


def test_load_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_synthetic_coco"):
        load_coco(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_coco(bad)
    with pytest.raises(ValueError, match="category"):
        scenes_to_coco([sample_scene(0)], tmp_path / "img", categories=["pink blob"])


def test_alt_renderer_same_world_different_pixels(tmp_path):
    path = write_synthetic_coco(tmp_path / "alt", 6, seed=5, renderer="alt")
    data = load_coco(path)
    assert {im["renderer"] for im in data.images.values()} == {"alt"}
    assert {c["name"] for c in data.data["categories"]} == set(CATEGORIES)
    default = [sample_scene(i) for i in range(40)]
    alt = [sample_scene(i, renderer="alt") for i in range(40)]
    assert not {s.background for s in default} & {s.background for s in alt}
    assert {o.category for s in alt for o in s.objects} <= set(CATEGORIES)
    assert all(12 <= o.size_px <= 96 for s in alt for o in s.objects)
    # pixel statistics differ: alt backgrounds (stripes / two-tone / noise) carry far more edges
    grad = lambda scs: np.mean([np.abs(np.diff(np.asarray(s.image, np.float32), axis=1)).mean() for s in scs])
    assert grad(alt) > 1.8 * grad(default)
    assert np.mean([s.width for s in alt]) > np.mean([s.width for s in default]) + 30
