"""Object encoder (multi-level RoIAlign mean + sine box embedding + projector) against the fixtures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from chatrex.model.objects import MultiLevelRoIEncoder, normalized_cxcywh
from chatrex.ops.roi_align import roi_align
from mllm_fixture import CASES, assert_close_rel, case_inputs, golden_root, load_case, shared_fixture_model, unpack_int4_level

BOXED_CASES = [c for c in CASES if c != "install_0boxes"]
FULL_LAYOUT = [(192, 192), (384, 96), (768, 48), (1536, 24)]  # (channels, side) per ConvNeXt-L level at 768 px


@pytest.fixture(scope="module")
def model(mllm_golden):
    return shared_fixture_model()


@pytest.fixture(scope="module")
def full_layout(mllm_golden):
    t = load_file(str(golden_root() / "roi_full_layout" / "roi_full_layout.safetensors"))
    maps = [unpack_int4_level(t[f"level{i}_int4_packed"], c, s) for i, (c, s) in enumerate(FULL_LAYOUT)]
    return maps, t


@pytest.mark.parametrize("name", BOXED_CASES)
def test_object_stages_match_fixture(model, name):
    _, t = load_case(name)
    boxes = t["gt_boxes"]
    encoder = model.box_encoder
    with torch.no_grad():
        maps = model.encode_highres(t["pixel_values_aux"])
        roi = encoder.roi_features(maps, [boxes[0]])
        cxcywh, pos = encoder.box_embedding(boxes[0], roi.shape[1])
        pre = encoder(maps, [boxes[0]])
        tokens = model.encode_objects(maps, [boxes[0]])[0]
    assert_close_rel(roi, t["object_roi_mean"], f"{name}:object_roi_mean")
    assert_close_rel(cxcywh, t["object_box_cxcywh_norm"], f"{name}:object_box_cxcywh_norm")
    assert_close_rel(pos, t["object_pos_embed"], f"{name}:object_pos_embed")
    assert_close_rel(pre, t["object_features_preproj"], f"{name}:object_features_preproj")
    assert_close_rel(tokens, t["object_tokens"], f"{name}:object_tokens")


def test_full_layout_fixture(full_layout):
    maps, t = full_layout
    for i in (1, 2, 3):  # the unpacking and the upsampling both match the reference
        up = F.interpolate(maps[i], size=(192, 192), mode="bilinear", align_corners=False)[0, 0]
        assert_close_rel(up, t[f"upsampled_level{i}_channel0"], f"upsampled_level{i}")
    encoder = MultiLevelRoIEncoder(canvas_size=768)
    boxes = t["boxes"].clone()
    roi = encoder.roi_features(maps, [boxes])
    cxcywh, pos = encoder.box_embedding(boxes, 2880)
    out = roi + pos  # what forward returns (forward itself is checked on the cases; this map is big)
    assert_close_rel(roi, t["roi_mean"], "roi_mean")
    assert_close_rel(cxcywh, t["box_cxcywh_norm"], "box_cxcywh_norm")
    assert_close_rel(pos, t["pos_embed"], "pos_embed")
    assert_close_rel(out, t["output"], "output")
    assert torch.equal(boxes, t["boxes"])  # never normalized in place
    assert torch.equal(roi[9], torch.zeros(2880))  # completely outside the canvas: zero RoI, non-zero embedding
    assert pos[9].abs().sum() > 0


def test_per_level_equals_concatenated_map(full_layout):
    maps, t = full_layout
    # Aligning each level separately must equal aligning the 2880-channel concatenation (what the reference does).
    small = [m[:, :16] for m in maps]
    boxes = t["boxes"]
    per_level = MultiLevelRoIEncoder(canvas_size=768).roi_features(small, [boxes])
    ups = [small[0]] + [F.interpolate(m, size=(192, 192), mode="bilinear", align_corners=False) for m in small[1:]]
    concat = roi_align(torch.cat(ups, 1), [boxes], 7, spatial_scale=0.25, sampling_ratio=-1, aligned=False)
    torch.testing.assert_close(per_level, concat.mean(dim=(2, 3)), rtol=0, atol=1e-6)


def test_normalized_cxcywh_order_and_no_mutation():
    boxes = torch.tensor([[100.0, 200.0, 300.0, 500.0], [400.0, 400.0, 350.0, 450.0]])
    before = boxes.clone()
    out = normalized_cxcywh(boxes, 768)
    assert torch.equal(boxes, before)
    b = before / 768
    torch.testing.assert_close(out[0], torch.stack([b[0, 0] + (b[0, 2] - b[0, 0]) / 2, b[0, 1] + (b[0, 3] - b[0, 1]) / 2, b[0, 2] - b[0, 0], b[0, 3] - b[0, 1]]))
    assert out[1, 2] < 0  # inverted box keeps its negative width (no clipping)


def test_gt_boxes_not_mutated(model, mllm_golden):
    _, t = load_case("cafe_12boxes")
    inputs = case_inputs(t)
    boxes = inputs["gt_boxes"]
    before = boxes.clone()
    with torch.no_grad():
        first = model(**inputs).logits
        second = model(**inputs).logits  # the reference would now see normalized boxes
    model.generate(**inputs, max_new_tokens=2, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert torch.equal(boxes, before)
    assert torch.equal(first, second)


def test_shared_image_maps_for_several_box_sets(model, mllm_golden):
    _, t = load_case("cafe_12boxes")
    boxes = t["gt_boxes"][0]
    with torch.no_grad():
        maps = model.encode_highres(t["pixel_values_aux"])
        together = model.encode_objects(maps, [boxes[:5], boxes[5:]])
        alone = [model.encode_objects(maps, [boxes[:5]])[0], model.encode_objects(maps, [boxes[5:]])[0]]
        empty = model.encode_objects(maps, [boxes[:0]])[0]
    assert [x.shape[0] for x in together] == [5, 7]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert empty.shape == (0, model.config.hidden_size)
