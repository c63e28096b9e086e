"""The synthetic shapes world: determinism, tight boxes, overlap/size rules, vocabulary coverage,
contrast, referring expressions checked by an independent interpreter, captions, UPN targets."""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import pytest

from chatrex.data import language
from chatrex.data.render_alt import ALT_STYLE
from chatrex.data.synthetic import (
    CATEGORIES, COLOUR_RGB, COLOURS, DEFAULT_STYLE, SHAPES, SyntheticDataset, sample_scene, scene_stream,
    split_seed, upn_targets,
)
from chatrex.grounding import parse_answer

N_SCENES = 150


@pytest.fixture(scope="module", params=["default", "alt"])
def scenes(request):
    return [sample_scene(1000 + i, renderer=request.param) for i in range(N_SCENES)]


def _iou(a, b):
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def test_vocabulary():
    assert len(CATEGORIES) == 40 and len(set(CATEGORIES)) == 40
    assert CATEGORIES[0] == "red circle" and CATEGORIES[-1] == "black hexagon"
    assert set(COLOUR_RGB) == set(COLOURS)


@pytest.mark.parametrize("renderer", ["default", "alt"])
def test_same_seed_same_scene(renderer):
    a, b = sample_scene(7, renderer=renderer), sample_scene(7, renderer=renderer)
    assert a.objects == b.objects and a.background == b.background
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = sample_scene(8, renderer=renderer)
    assert c.objects != a.objects or not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_scene_rules(scenes):
    lo, hi = (160, 320) if scenes[0].renderer == "default" else (200, 400)
    for s in scenes:
        assert lo <= s.width <= hi and lo <= s.height <= hi
        assert s.image.mode == "RGB" and s.image.size == (s.width, s.height)
        assert 1 <= len(s.objects) <= 8
        boxes = s.boxes
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= s.width).all() and (boxes[:, 3] <= s.height).all()
        for i, o in enumerate(s.objects):
            assert o.index == i and o.category == f"{o.colour} {o.shape}"
            assert 12 <= o.size_px <= 96, o
            assert o.size_px == max(o.box[2] - o.box[0], o.box[3] - o.box[1])
            assert o.phrase == f"{o.size_word} {o.category}" and o.category in o.brief and o.category in o.sentence
            for j in range(i):
                assert _iou(boxes[i], boxes[j]) <= 0.3 + 1e-6


def test_every_category_and_word_is_reachable(scenes):
    objs = [o for s in scenes for o in s.objects]
    assert {o.category for o in objs} == set(CATEGORIES)
    assert {o.size_word for o in objs} == {"small", "medium", "large"}
    assert len({o.position_word for o in objs}) == 9
    assert len({s.background for s in scenes}) == 3
    counts = {len(s.objects) for s in scenes}
    assert {1, 8} <= counts


@pytest.mark.parametrize("style", [DEFAULT_STYLE, ALT_STYLE], ids=["default", "alt"])
def test_boxes_are_tight(style):
    """On a flat background, the >= 50 % coverage pixels of a lone shape span exactly its box."""
    flat = dataclasses.replace(style, background=lambda rng, w, h: (np.full((h, w, 3), 128.0, np.float32), "plain"),
                               colour=lambda c, rng: COLOUR_RGB[c])
    for seed in range(40):
        s = sample_scene(seed, min_objects=1, max_objects=1, renderer=flat)
        (o,) = s.objects
        img = np.asarray(s.image, dtype=np.float32)
        col = np.array(COLOUR_RGB[o.colour], np.float32)
        ch = int(np.argmax(np.abs(col - 128)))
        cover = (img[..., ch] - 128) / (col[ch] - 128)  # alpha per pixel
        ys, xs = np.nonzero(cover >= 0.5 + 0.01)
        x1, y1, x2, y2 = o.box
        assert xs.min() >= x1 and xs.max() + 1 <= x2 and ys.min() >= y1 and ys.max() + 1 <= y2
        assert xs.min() <= x1 + 1 and xs.max() + 1 >= x2 - 1 and ys.min() <= y1 + 1 and ys.max() + 1 >= y2 - 1
        ys, xs = np.nonzero(cover > 0.05)  # anti-aliasing fringe stays within 1 px of the box
        assert xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y2 + 1


@pytest.mark.parametrize("style,floor", [(DEFAULT_STYLE, 60.0), (ALT_STYLE, 30.0)], ids=["default", "alt"])
def test_colours_contrast_with_every_background(style, floor):
    """White, black and every other colour stay >= floor (RGB distance) from every background pixel."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        bg, _ = style.background(rng, 180, 160)
        px = bg.reshape(-1, 3)[::5]
        for c in COLOURS:
            col = np.array(style.colour(c, rng), np.float32)
            assert np.sqrt(((px - col) ** 2).sum(1)).min() >= floor, (style.name, c)


def test_white_and_black_visible_in_scenes():
    """The background just above/below each white/black shape's box is far from the shape's colour."""
    seen = 0
    for seed in range(200):
        s = sample_scene(seed)
        img = np.asarray(s.image, dtype=np.float32)
        for o in s.objects:
            if o.colour not in ("white", "black") or o.size_px < 20:
                continue
            x1, y1, x2, y2 = (int(v) for v in o.box)
            seen += 1
            bg = np.concatenate([img[max(y1 - 2, 0), x1:x2], img[min(y2 + 1, s.height - 1), x1:x2]])
            assert np.sqrt(((bg.mean(0) - COLOUR_RGB[o.colour]) ** 2).sum()) > 60
    assert seen > 20


# ------------------------------------------------------------------------------ referring expressions
def _resolve(expr: str, scene) -> list[int]:
    """Independent interpreter of the expression families; asserts the uniqueness margins."""
    objs = scene.objects
    m = re.fullmatch(r"the (\w+) (\w+)", expr)
    if m and m.group(1) in COLOURS and m.group(2) in SHAPES:
        return [o.index for o in objs if o.category == expr[4:]]
    if m and m.group(1) in COLOURS and m.group(2) == "shape":
        return [o.index for o in objs if o.colour == m.group(1)]
    if re.fullmatch(r"the (\w+)", expr) and expr[4:] in SHAPES:
        return [o.index for o in objs if o.shape == expr[4:]]
    m = re.fullmatch(r"the (largest|smallest|leftmost|rightmost|topmost|bottommost) (.+)", expr)
    if m:
        noun = m.group(2)
        group = [o for o in objs if noun == "shape" or noun == o.shape or noun == f"{o.colour} shape"]
        key = {"largest": lambda o: o.area, "smallest": lambda o: -o.area, "leftmost": lambda o: -o.center[0],
               "rightmost": lambda o: o.center[0], "topmost": lambda o: -o.center[1],
               "bottommost": lambda o: o.center[1]}[m.group(1)]
        ranked = sorted(group, key=key, reverse=True)
        assert len(ranked) >= 2
        if m.group(1) in ("largest", "smallest"):
            big, small = sorted([ranked[0].area, ranked[1].area], reverse=True)
            assert big >= 1.3 * small - 1e-6
        else:
            assert abs(key(ranked[0]) - key(ranked[1])) >= 10
        return [ranked[0].index]
    m = re.fullmatch(r"the (\w+) (below|above|to the left of|to the right of) the (\w+)", expr)
    assert m, f"unknown expression family: {expr!r}"
    (anchor,) = [o for o in objs if o.shape == m.group(3)]
    ax1, ay1, ax2, ay2 = anchor.box
    test = {"below": lambda o: o.center[1] > ay2, "above": lambda o: o.center[1] < ay1,
            "to the left of": lambda o: o.center[0] < ax1, "to the right of": lambda o: o.center[0] > ax2}
    return [o.index for o in objs if o.shape == m.group(1) and test[m.group(2)](o)]


def test_referring_expressions_resolve_to_exactly_their_objects(scenes):
    total = 0
    families = set()
    for s in scenes:
        exprs = s.referring_expressions()
        assert len({e for e, _ in exprs}) == len(exprs)
        for expr, ix in exprs:
            assert len(ix) == 1 and 0 <= ix[0] < len(s.objects)
            assert _resolve(expr, s) == ix, (s.seed, expr)
            families.add(expr.split()[1])
            total += 1
    assert total > len(scenes)
    assert {"largest", "smallest", "leftmost", "topmost"} <= families
    assert any(" below the " in e for s in scenes for e, _ in s.referring_expressions())


def test_captions_parse_and_ground_every_object(scenes):
    rng = np.random.default_rng(0)
    for s in scenes[:40]:
        perm = [int(i) for i in rng.permutation(len(s.objects) + 3)[: len(s.objects)]]
        for detailed in (False, True):
            cap = s.caption(detailed=detailed, box_index=perm)
            parsed = parse_answer(cap)
            assert not parsed.problems, (cap, parsed.problems)
            found = sorted(i for sp in parsed.spans for i in sp.indices)
            assert found == sorted(perm)
            for sp in parsed.spans:  # each span names the category of the objects it grounds
                for i in sp.indices:
                    o = s.objects[perm.index(i)]
                    assert o.shape in sp.phrase and o.colour in sp.phrase
    with pytest.raises(ValueError):
        scenes[0].caption(box_index=[0] * (len(scenes[0].objects) + 1))


def test_upn_targets_by_prompt():
    s = next(sc for sc in (sample_scene(i) for i in range(100)) if
             any(o.size_px < 24 for o in sc.objects) and any(o.size_px >= 24 for o in sc.objects))
    fine, coarse = upn_targets(s, "fine"), upn_targets(s, "coarse_grained_prompt")
    assert fine.shape == (len(s.objects), 4) and np.array_equal(fine, upn_targets(s, "fine_grained_prompt"))
    assert len(coarse) == sum(o.size_px >= 24 for o in s.objects) < len(fine)
    assert np.array_equal(coarse, s.boxes[[o.size_px >= 24 for o in s.objects]])
    with pytest.raises(ValueError, match="prompt_type"):
        upn_targets(s, "medium")


def test_dataset_splits_are_disjoint_and_indexable():
    seeds = {split: {split_seed(3, i, split) for i in range(500)} for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"])
    assert not (seeds["val"] & seeds["test"])
    ds = SyntheticDataset(5, seed=3, split="val", max_objects=3)
    assert len(ds) == 5 and ds[2].seed == split_seed(3, 2, "val") and max(len(s.objects) for s in ds) <= 3
    assert ds[-1].objects == ds[4].objects
    assert [s.seed for s in scene_stream(3, 3, split="val")] == [ds[i].seed for i in range(3)]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="split"):
        SyntheticDataset(2, split="dev")


def test_argument_validation_and_min_objects():
    with pytest.raises(ValueError):
        sample_scene(0, min_objects=0)
    with pytest.raises(ValueError, match="renderer"):
        sample_scene(0, renderer="fancy")
    for seed in range(10):
        assert len(sample_scene(seed, min_objects=6, max_objects=6, size_range=(160, 160)).objects) == 6


def test_language_helpers():
    assert language.position_word(10, 10, 300, 300) == "top left"
    assert language.position_word(150, 150, 300, 300) == "center"
    assert language.position_word(290, 150, 300, 300) == "right"
    assert language.count_phrase("orange star", 1) == "an orange star"
    assert language.count_phrase("red circle", 3) == "three red circles"
    assert language.size_word(12) == "small" and language.size_word(40) == "medium" and language.size_word(96) == "large"


def test_speed():
    t = time.perf_counter()
    for i in range(40):
        sample_scene(i)
    rate = 40 / (time.perf_counter() - t)
    print(f"default renderer: {rate:.0f} scenes/s")
    assert rate > 10
