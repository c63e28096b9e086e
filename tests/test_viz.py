"""Drawing: deterministic colours (across processes), scaled fonts, clipped labels, skipped indices."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from chatrex import viz


def _blank(w=200, h=160):
    return Image.new("RGB", (w, h), (40, 40, 40))


def test_color_is_a_pure_function_of_the_label():
    assert viz.color_for("dog") == viz.color_for("dog")
    assert viz.color_for("dog") != viz.color_for("cat")
    colors = {viz.color_for(f"phrase {i}") for i in range(50)}
    assert len(colors) >= 45  # well spread
    for c in colors:
        assert all(0 <= v <= 255 for v in c)


_DRAW_SCRIPT = """
import sys
from PIL import Image
from chatrex import viz
img = Image.new("RGB", (160, 120), (20, 20, 20))
out, _ = viz.draw_groups(img, [[10, 30, 60, 90], [70, 40, 150, 110]], [("person", [0]), ("red car", [1])])
out.save(sys.argv[1])
"""


def test_colours_identical_across_processes_with_different_hash_seeds(tmp_path):
    paths = []
    for seed in ("1", "987654"):
        path = tmp_path / f"draw_{seed}.png"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", _DRAW_SCRIPT, str(path)], check=True, env=env, timeout=60)
        paths.append(path)
    a, b = (np.asarray(Image.open(p)) for p in paths)
    assert a.shape == b.shape
    assert (a != 20).any(), "nothing was drawn"
    assert np.array_equal(a, b)
    # The box outline uses the label's colour.
    assert tuple(a[60, 10]) == viz.color_for("person")


def test_font_and_width_scale_with_image_size():
    assert viz.auto_font_size((100, 80)) == 10
    assert viz.auto_font_size((4000, 3000)) == 75
    assert viz.auto_line_width((4000, 3000)) > viz.auto_line_width((300, 200))
    assert viz.load_font(30).size == 30


def test_label_moves_inside_when_clipped_at_the_top():
    img = _blank()
    color = viz.color_for("top")
    out, skipped = viz.draw_groups(img, [[20, 0, 120, 100]], [("top", [0])], font_size=14, line_width=2)
    arr = np.asarray(out)
    assert skipped == []
    # The filled tag sits inside the box, just below the top edge (rows 3..10 at x = 25).
    assert tuple(arr[6, 25]) == color or tuple(arr[6, 24]) == color
    # A box lower down puts its tag above the box instead.
    out2, _ = viz.draw_groups(img, [[20, 80, 120, 150]], [("top", [0])], font_size=14, line_width=2)
    arr2 = np.asarray(out2)
    assert tuple(arr2[75, 22]) == color
    assert tuple(arr2[100, 60]) == (40, 40, 40)  # box interior untouched


def test_out_of_range_indices_are_skipped_and_drawn_nowhere():
    img = _blank()
    out, skipped = viz.draw_groups(img, [[10, 10, 50, 50]], [("a", [0, 3]), ("b", [7])])
    assert skipped == [3, 7]
    # Only box 0 changed pixels: everything right of / below it is untouched.
    arr = np.asarray(out)
    assert (arr[60:, :] == 40).all() and (arr[:, 60:] == 40).all()
    assert np.asarray(img).max() == 40, "input image must not be modified"


def test_draw_proposals_labels_every_box():
    img = _blank(400, 300)
    boxes = [[10, 50, 100, 120], [200, 100, 390, 290]]
    out = viz.draw_proposals(img, boxes, [0.9, 0.5])
    arr = np.asarray(out)
    assert tuple(arr[85, 10]) == viz.color_for("obj0")
    assert tuple(arr[200, 200]) == viz.color_for("obj1")
    assert out.size == img.size and out is not img


@pytest.mark.parametrize("size", [(64, 48), (3000, 2000)])
def test_draw_answer_at_any_size(size):
    pytest.importorskip("chatrex.grounding")
    w, h = size
    img = _blank(w, h)
    boxes = [[0, 0, w / 2, h / 2], [w / 2, h / 2, w - 1, h - 1]]
    text = "A <ground>dog</ground><objects><obj0><obj5></objects> and a <ground>cat</ground><objects><obj1></objects>"
    out = viz.draw_answer(img, boxes, text)
    arr = np.asarray(out)
    assert tuple(arr[h // 4, 0]) == viz.color_for("dog")
    assert tuple(arr[h * 3 // 4, w - 1 - viz.auto_line_width(size) // 2]) == viz.color_for("cat")


def test_seed_visualize_chatrex_output_signature():
    pytest.importorskip("chatrex.grounding")
    img = _blank()
    pred = "<ground>person</ground><objects><obj0></objects>\n<ground>pigeon</ground><objects><obj1><obj9></objects>"
    out = viz.visualize_chatrex_output(img, np.array([[10, 30, 60, 90], [70, 40, 150, 110]]), pred, 15, 5)
    assert isinstance(out, Image.Image) and out is not img and out.size == img.size
    arr = np.asarray(out)
    assert tuple(arr[60, 11]) == viz.color_for("person")
    assert tuple(arr[80, 71]) == viz.color_for("pigeon")
    groups = viz.answer_groups(pred + "<ground>person</ground><objects><obj2><obj0></objects>")
    assert groups == [("person", [0, 2]), ("pigeon", [1, 9])]
