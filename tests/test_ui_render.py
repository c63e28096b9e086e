"""Web demo, pure parts: question building, click → image mapping, answer colouring, upload checks.

No gradio server and no model here (fast); the browser tests drive the same code end to end.
"""

from __future__ import annotations

import pytest
from PIL import Image

from chatrex import prompts
from chatrex.errors import InvalidImageError
from chatrex.grounding import parse_answer
from chatrex.ui import render
from chatrex.ui.session import read_upload
from chatrex.viz import color_for


# ----------------------------------------------------------------------------- questions
def test_free_question_wins_over_template():
    question, free = render.build_question("Region category", "<obj0>", False, 3, "  What is blue?  ")
    assert (question, free) == ("What is blue?", True)


def test_region_template_fills_ids_like_the_seed():
    question, free = render.build_question("Region category", "<obj1>, 2", False, 3, "")
    assert not free
    assert question == prompts.REGION_CATEGORY.replace("[OBJ]", "<obj1>; <obj2>")


def test_all_regions_lists_every_box():
    question, _ = render.build_question("Region short phrase", "", True, 3, "")
    assert question == prompts.REGION_SHORT_PHRASE.replace("[OBJ]", "<obj0>; <obj1>; <obj2>")


def test_single_box_needs_no_ids_but_several_do():
    assert render.region_targets("", 1, False) == ["<obj0>"]
    with pytest.raises(ValueError, match="which of the 2 regions"):
        render.region_targets("", 2, False)


@pytest.mark.parametrize("field, message", [("<obj5>", "does not exist"), ("dog", "not a region")])
def test_bad_region_ids_are_readable_errors(field, message):
    with pytest.raises(ValueError, match=message):
        render.region_targets(field, 2, False)


def test_region_template_without_boxes_says_how_to_get_some():
    with pytest.raises(ValueError, match="draw one"):
        render.build_question("Region category", "<obj0>", False, 0, "")


def test_detection_template_joins_categories():
    question, free = render.build_question("Grounding (detect categories)", "red circle, star;", False, 0, "")
    assert (question, free) == (prompts.detection_prompt(["red circle", "star"]), False)
    with pytest.raises(ValueError, match="categories"):
        render.build_question("Grounding (detect categories)", " , ", False, 0, "")


def test_caption_templates_and_the_seven_names():
    assert render.build_question("Detailed grounded caption", "", False, 0, "")[0] == prompts.DETAILED_GROUNDED_CAPTION
    assert len(render.TEMPLATES) == 7 and render.TEMPLATE_NAMES[0] == render.FREE_QUESTION
    with pytest.raises(ValueError, match="type a question"):
        render.build_question(render.FREE_QUESTION, "", False, 0, " ")
    with pytest.raises(ValueError, match="unknown task template"):
        render.template_by_name("nope")


# ----------------------------------------------------------------------------- canvas geometry
@pytest.mark.parametrize("size", [(189, 229), (300, 160), (1024, 2048)])
def test_click_maps_back_to_original_pixels(size):
    scale = render.canvas_scale(size)
    assert scale >= 1.0 and (max(size) * scale >= render.CANVAS_LONG_SIDE - 1e-6 or scale == 1.0)
    x, y = render.click_to_image((round(40 * scale), round(25 * scale)), scale, size)
    assert abs(x - 40) <= 0.5 / scale + 1e-9 and abs(y - 25) <= 0.5 / scale + 1e-9
    assert render.click_to_image((-5, 10 ** 6), scale, size) == (0.0, float(size[1]))  # clamped


def test_corners_in_any_order_make_one_box():
    assert render.corners_to_box((50, 8), (10.04, 30)) == [10.0, 8, 50, 30]
    assert render.corners_to_box((10, 30), (50, 8)) == [10, 8, 50, 30]


def test_canvas_draws_boxes_at_display_scale():
    image = Image.new("RGB", (100, 50), (128, 128, 128))
    scale = render.canvas_scale(image.size)
    out = render.draw_canvas(image, [[10, 10, 40, 30]], scale, pending=(80, 25))
    assert out.size == (round(100 * scale), round(50 * scale))
    # box outline at x = 10 px of the original → 10 * scale on the canvas, in the colour of <obj0>
    column = [out.getpixel((x, round(20 * scale))) for x in range(int(10 * scale) - 1, int(10 * scale) + 3)]
    assert color_for("obj0") in column
    assert out.getpixel((round(80 * scale), round(25 * scale))) in {(255, 255, 255), (0, 0, 0)}  # pending cross


# ----------------------------------------------------------------------------- answers
RAW = ("A <ground>red circle</ground><objects><obj1></objects> left of "
       "<ground>stars</ground><objects><obj0><obj3></objects>.")


def test_highlighted_segments_rebuild_the_text_with_box_colours():
    answer = parse_answer(RAW, [[0, 0, 5, 5], [1, 1, 9, 9]])
    segments, colors = render.highlighted(answer)
    assert "".join(text for text, _ in segments) == answer.text == "A red circle left of stars."
    assert [(t, label) for t, label in segments if label] == [("red circle", "red circle"), ("stars", "stars")]
    assert colors == {"red circle": render.hex_color("red circle"), "stars": render.hex_color("stars")}
    assert render.hex_color("stars") == "#{:02x}{:02x}{:02x}".format(*color_for("stars"))


def test_overlay_draws_phrase_boxes_in_the_highlight_colour():
    image = Image.new("RGB", (200, 200), (128, 128, 128))
    boxes = [[10, 10, 60, 60], [100, 100, 180, 180]]
    answer = parse_answer("<ground>red circle</ground><objects><obj1></objects>", boxes)
    out = render.draw_grounded(image, boxes, answer, render.canvas_scale(image.size))
    s = render.canvas_scale(image.size)
    row = [out.getpixel((x, round(150 * s))) for x in range(int(100 * s) - 1, int(100 * s) + 3)]
    assert color_for("red circle") in row
    assert out.getpixel((round(10 * s) + 1, round(40 * s))) == (128, 128, 128)  # box 0 not named: not drawn


def test_phrase_rows_list_boxes_and_flag_missing_ones():
    answer = parse_answer(RAW)
    rows = render.phrase_rows(answer, [[0, 0, 5, 5], [1, 1, 9, 9]])
    assert rows[0] == ["red circle", "<obj1>", "[1, 1, 9, 9]"]
    assert rows[1][1] == "<obj0>, <obj3> (no box)" and rows[1][2] == "[0, 0, 5, 5]"


def test_proposal_rows_and_box_text():
    rows = render.proposal_rows([[1.04, 2, 3, 4]], [0.91234])
    assert rows == [[0, 0.912, 1.0, 2.0, 3.0, 4.0]]
    assert render.format_boxes([[1, 2, 3, 4.25]]) == "<obj0>: [1.0, 2.0, 3.0, 4.2]"


# ----------------------------------------------------------------------------- uploads
def test_upload_limits_and_corrupt_files_are_readable(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(good)
    assert read_upload(good, 10 * 2**20).size == (8, 6)
    with pytest.raises(InvalidImageError, match=r"ok\.png is 0\.0 MB; the limit is"):
        read_upload(good, 10)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(InvalidImageError) as info:
        read_upload(corrupt, 10 * 2**20)
    assert "broken.png" in str(info.value) and str(tmp_path) not in str(info.value)
    with pytest.raises(InvalidImageError, match="no image"):
        read_upload(None, 10)
