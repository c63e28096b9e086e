"""Box ops: conversions, IoU/GIoU, NMS against torchvision's fixture, batched NMS, clipping and scaling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from chatrex.ops import boxes as box_ops
from chatrex.ops.boxes import (
    batched_nms,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    clip_boxes_to_image,
    denormalize_boxes,
    generalized_box_iou,
    nms,
    normalize_boxes,
    remove_small_boxes,
    scale_boxes,
)


def _random_xyxy(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * 100
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 50
    return torch.cat([xy, xy + wh], dim=-1)


# ---------------------------------------------------------------- conversions
def test_conversions_by_hand():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), torch.tensor([[20.0, 40.0, 20.0, 40.0]]))
    torch.testing.assert_close(box_xyxy_to_xywh(xyxy), torch.tensor([[10.0, 20.0, 20.0, 40.0]]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(torch.tensor([[20.0, 40.0, 20.0, 40.0]])), xyxy)
    torch.testing.assert_close(box_xywh_to_xyxy(torch.tensor([[10.0, 20.0, 20.0, 40.0]])), xyxy)
    assert box_area(xyxy).tolist() == [800.0]
    assert box_area(torch.tensor([5.0, 5.0, 3.0, 9.0])).item() == -8.0  # inverted: negative, not clamped


def test_conversion_round_trips_keep_leading_dims():
    gen = torch.Generator().manual_seed(0)
    b = _random_xyxy(24, gen).view(2, 3, 4, 4)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b, atol=1e-12, rtol=0)
    torch.testing.assert_close(box_xywh_to_xyxy(box_xyxy_to_xywh(b)), b, atol=1e-12, rtol=0)
    c = box_xyxy_to_cxcywh(b)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(c)), c, atol=1e-12, rtol=0)
    assert box_xyxy_to_cxcywh(b).shape == (2, 3, 4, 4)


def test_xyxy_to_cxcywh_float32_order_is_x1_plus_half_width():
    # ChatRex's object encoder computes cx = x1 + (x2 - x1) / 2 in float32; (x1 + x2) / 2 can differ by an ulp.
    b = torch.tensor([[0.1300781, 0.2718281, 0.7777777, 0.9999999]], dtype=torch.float32)
    x1, y1, x2, y2 = b.unbind(-1)
    w, h = x2 - x1, y2 - y1
    expected = torch.stack([x1 + w / 2, y1 + h / 2, w, h], dim=-1)
    assert torch.equal(box_xyxy_to_cxcywh(b), expected)


def test_empty_inputs():
    e = torch.zeros(0, 4)
    assert box_cxcywh_to_xyxy(e).shape == (0, 4) and box_area(e).shape == (0,)
    iou, union = box_iou(e, torch.rand(3, 4))
    assert iou.shape == (0, 3) and union.shape == (0, 3)
    assert generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), e).shape == (1, 0)
    keep = nms(e, torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.numel() == 0
    assert batched_nms(e, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


# ---------------------------------------------------------------- IoU / GIoU
def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0, 4.0]]))


def test_giou_properties_and_value():
    gen = torch.Generator().manual_seed(1)
    a, b = _random_xyxy(30, gen), _random_xyxy(20, gen)
    g = generalized_box_iou(a, b)
    assert g.shape == (30, 20)
    assert (g >= -1).all() and (g <= 1).all()
    torch.testing.assert_close(torch.diagonal(generalized_box_iou(a, a)), torch.ones(30, dtype=torch.float64))
    iou, _ = box_iou(a, b)
    assert (g <= iou + 1e-12).all()  # GIoU <= IoU
    # disjoint unit squares 1 apart: IoU 0, hull 3, union 2 -> GIoU = -1/3
    g2 = generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 0, 3, 1]]))
    torch.testing.assert_close(g2, torch.tensor([[-1 / 3]]))
    with pytest.raises(ValueError, match="inverted"):
        generalized_box_iou(torch.tensor([[2.0, 0, 1, 1]]), a)


# ---------------------------------------------------------------- NMS
@pytest.fixture(scope="module")
def nms_fixture(upn_golden):
    tensors = load_file(str(upn_golden / "nms_fixture.safetensors"))
    meta = json.loads((upn_golden / "nms_fixture.json").read_text())
    return tensors, meta["cases"]


def test_nms_matches_torchvision_on_all_72_cases(nms_fixture):
    tensors, cases = nms_fixture
    assert len(cases) == 72
    assert sum(c["float32_threshold_compare_differs"] for c in cases) == 12
    for c in cases:
        cid = c["id"]
        keep = nms(tensors[f"{cid}.boxes"], tensors[f"{cid}.scores"], c["iou_threshold"])
        assert keep.dtype == torch.int64
        assert keep.tolist() == tensors[f"{cid}.keep"].tolist(), f"{cid} ({c['coord_mode']}, thr {c['iou_threshold']})"


def test_nms_matches_upn_filter_inputs(upn_golden):
    pf = torch.load(upn_golden / "postprocess_filter.pt", weights_only=True)
    for prompt in ("fine_grained_prompt", "coarse_grained_prompt"):
        p = pf[prompt]
        assert len(p["nms_keep"]) == 2
        for b, s, k in zip(p["nms_input_boxes"], p["nms_input_scores"], p["nms_keep"]):
            assert nms(b, s, p["filter_nms_iou_threshold"]).tolist() == k.tolist()


def test_nms_threshold_compared_in_float64():
    # IoU exactly float32(0.8) = 0.800000011920929 > 0.8 (as a double): torchvision suppresses.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0]])
    iou = box_iou(boxes[:1], boxes[1:])[0].item()
    assert iou == torch.tensor(0.8, dtype=torch.float32).item()
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.8).tolist() == [0]
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.8000001).tolist() == [0, 1]


def test_nms_ties_keep_index_order_and_zero_area_pairs_never_suppress():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3 + [[5.0, 5.0, 5.0, 5.0]] * 2)
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [3, 4, 0]


def test_nms_row_chunking_is_invisible(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    boxes, scores = _random_xyxy(300, gen).float(), torch.rand(300, generator=gen)
    full = nms(boxes, scores, 0.3)
    monkeypatch.setattr(box_ops, "_NMS_ROW_CHUNK", 7)
    assert nms(boxes, scores, 0.3).tolist() == full.tolist()


def test_batched_nms_equals_per_class_nms():
    gen = torch.Generator().manual_seed(3)
    boxes = _random_xyxy(200, gen).float()
    scores = torch.rand(200, generator=gen)
    scores[10:20] = scores[0]  # some ties across classes
    idxs = torch.randint(0, 5, (200,), generator=gen)
    keep = batched_nms(boxes, scores, idxs, 0.4)
    expected = []
    for cls in range(5):
        members = torch.nonzero(idxs == cls).flatten()
        expected += members[nms(boxes[members], scores[members], 0.4)].tolist()
    assert sorted(keep.tolist()) == sorted(expected)
    kept_scores = scores[keep]
    assert (kept_scores[:-1] >= kept_scores[1:]).all()  # by descending score
    # a single class gives plain nms
    assert batched_nms(boxes, scores, torch.zeros(200, dtype=torch.int64), 0.4).tolist() == nms(boxes, scores, 0.4).tolist()


# ---------------------------------------------------------------- clipping, scaling, filtering
def test_clip_scale_normalize():
    b = torch.tensor([[-5.0, 3.0, 120.0, 90.0]])
    assert clip_boxes_to_image(b, (80, 100)).tolist() == [[0.0, 3.0, 100.0, 80.0]]
    assert scale_boxes(b, 2.0, 0.5).tolist() == [[-10.0, 1.5, 240.0, 45.0]]
    per_image = scale_boxes(torch.ones(2, 3, 4), torch.tensor([[2.0], [3.0]]), torch.tensor([[5.0], [7.0]]))
    assert per_image[1, 2].tolist() == [3.0, 7.0, 3.0, 7.0]
    n = normalize_boxes(b, (90, 120))
    torch.testing.assert_close(n, torch.tensor([[-5 / 120, 3 / 90, 1.0, 1.0]]))
    torch.testing.assert_close(denormalize_boxes(n, (90, 120)), b)


def test_remove_small_boxes():
    b = torch.tensor([[0.0, 0, 5, 5], [0.0, 0, 1, 9], [2.0, 2, 4, 4]])
    assert remove_small_boxes(b, 2.0).tolist() == [0, 2]
