"""Seed-compatible plot_boxes_to_image: deterministic, draws at the border, accepts many box types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chatrex.tools.visualize import plot_boxes_to_image

BOXES = [[10, 12, 60, 50], [0, 0, 120, 80], [70.9, 5.2, 119.99, 79.5]]
SCORES = [0.91, 0.5, 0.33]


def _canvas(mode="RGB"):
    return Image.new(mode, (120, 80), "white" if mode == "RGB" else 255)


def test_deterministic_pixels():
    a, ma = plot_boxes_to_image(_canvas(), BOXES, SCORES)
    b, mb = plot_boxes_to_image(_canvas(), BOXES, SCORES)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(ma), np.asarray(mb))
    assert not np.array_equal(np.asarray(a), np.asarray(_canvas()))  # something was drawn


def test_draws_in_place_and_returns_mask():
    image = _canvas()
    out, mask = plot_boxes_to_image(image, BOXES[:1], SCORES[:1], return_score=False)
    assert out is image  # seed semantics: callers pass image.copy()
    m = np.asarray(mask)
    assert mask.mode == "L" and mask.size == image.size
    assert m[12:51, 10:61].min() == 255 and m[60:, :].max() == 0 and m[:, 62:].max() == 0
    px = np.asarray(out)
    assert tuple(px[30, 10]) != (255, 255, 255)  # left edge outlined
    assert tuple(px[30, 35]) == (255, 255, 255)  # interior untouched


def test_border_box_visible_on_all_sides():
    out, _ = plot_boxes_to_image(_canvas(), [[0, 0, 120, 80]], [0.5], point_width=2, return_score=False)
    px = np.asarray(out)
    white = (255, 255, 255)
    assert tuple(px[40, 0]) != white and tuple(px[40, 119]) != white
    assert tuple(px[0, 60]) != white and tuple(px[79, 60]) != white
    assert tuple(px[40, 60]) == white


def test_box_types_equivalent():
    ref, _ = plot_boxes_to_image(_canvas(), BOXES, SCORES)
    for boxes, scores in (
        (np.array(BOXES, dtype=np.float32), np.array(SCORES)),
        (torch.tensor(BOXES), torch.tensor(SCORES)[:, None]),  # (N, 1) scores like the wrapper's
    ):
        out, _ = plot_boxes_to_image(_canvas(), boxes, scores)
        assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_colour_depends_on_index_not_call():
    one, _ = plot_boxes_to_image(_canvas(), BOXES[:1], SCORES[:1], return_score=False)
    two, _ = plot_boxes_to_image(_canvas(), BOXES[:2], SCORES[:2], return_score=False)
    assert tuple(np.asarray(one)[30, 10]) == tuple(np.asarray(two)[30, 10])
    assert tuple(np.asarray(two)[40, 0]) != tuple(np.asarray(two)[30, 10])  # box 1 has another colour


def test_points_mode_and_grey_input():
    out, mask = plot_boxes_to_image(_canvas("L"), BOXES[:1], SCORES[:1], return_point=True, point_width=4)
    assert out.mode == "RGB"
    px = np.asarray(out)
    assert tuple(px[31, 35]) != (255, 255, 255)  # dot at the centre (35, 31)
    assert tuple(px[12, 10]) == (255, 255, 255)  # no outline in point mode
    assert np.asarray(mask)[31, 35] == 255


def test_empty_and_mismatch():
    out, mask = plot_boxes_to_image(_canvas(), [], [])
    assert np.asarray(mask).max() == 0 and np.array_equal(np.asarray(out), np.asarray(_canvas()))
    with pytest.raises(ValueError):
        plot_boxes_to_image(_canvas(), BOXES, SCORES[:1])
