"""Sine embeddings: fixtures (UPN level-0 embedding, MLLM object box embeddings) and hand-written cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from chatrex.ops.position import box_sine_embedding, object_box_embedding, sine_position_embedding_2d


def _close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item(), f"max|a-b| = {err}"


# ---------------------------------------------------------------- 2-d map embedding (UPN)
def test_2d_matches_upn_level0_sample(upn_golden):
    inputs = torch.load(upn_golden / "inputs.pt", weights_only=True)
    shared = torch.load(upn_golden / "outputs_fp32.pt", weights_only=True)["shared"]
    mask = F.interpolate(inputs["mask"][None].float(), size=(86, 91)).to(torch.bool)[0]
    pos = sine_position_embedding_2d(mask)
    assert pos.shape == (2, 256, 86, 91) and pos.dtype == torch.float32
    torch.testing.assert_close(pos[:, :, ::16, ::16], shared["pos_embed_level0_sample"], atol=1e-6, rtol=0)
    # float64 on request, same values to fp32 precision
    pos64 = sine_position_embedding_2d(mask, dtype=torch.float64)
    assert pos64.dtype == torch.float64
    torch.testing.assert_close(pos64[:, :, ::16, ::16].float(), shared["pos_embed_level0_sample"], atol=2e-6, rtol=0)


def test_2d_channel_order_and_interleaving_by_hand():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # last column padding: 3 valid columns
    n, th, tw = 4, 7.0, 3.0
    pos = sine_position_embedding_2d(mask, num_pos_feats=n, temperature_h=th, temperature_w=tw, dtype=torch.float64)
    assert pos.shape == (1, 8, 3, 4)
    eps, s = 1e-6, 2 * math.pi
    for yy in range(3):
        for xx in range(4):
            vy = (yy + 1) / (3 + eps) * s if xx < 3 else 0.0  # padding column counts no valid rows
            vx = min(xx + 1, 3) / (3 + eps) * s  # padding column keeps the last count
            exp_y = [math.sin(vy), math.cos(vy), math.sin(vy / th ** 0.5), math.cos(vy / th ** 0.5)]
            exp_x = [math.sin(vx), math.cos(vx), math.sin(vx / tw ** 0.5), math.cos(vx / tw ** 0.5)]
            torch.testing.assert_close(pos[0, :, yy, xx], torch.tensor(exp_y + exp_x, dtype=torch.float64))


def test_2d_unnormalized_uses_raw_counts():
    mask = torch.zeros(2, 2, 5, dtype=torch.bool)
    pos = sine_position_embedding_2d(mask, num_pos_feats=2, normalize=False)
    # channel 0 = sin(y), y = 1-based row; channel 2 = sin(x)
    torch.testing.assert_close(pos[0, 0, :, 0], torch.tensor([math.sin(1.0), math.sin(2.0)]))
    torch.testing.assert_close(pos[1, 2, 0], torch.tensor([math.sin(float(k)) for k in range(1, 6)]))


def test_2d_rejects_non_bool_mask():
    with pytest.raises(ValueError, match="bool"):
        sine_position_embedding_2d(torch.zeros(1, 2, 2))


# ---------------------------------------------------------------- box embedding (DINO decoder)
def test_box_embedding_order_y_x_w_h():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    emb = box_sine_embedding(boxes, num_pos_feats=4, temperature=100.0)
    assert emb.shape == (1, 16) and emb.dtype == torch.float64
    dims = [1.0, 1.0, 100.0 ** 0.5, 100.0 ** 0.5]
    expected = []
    for c in (0.2, 0.1, 0.3, 0.4):  # y, x, w, h
        a = [2 * math.pi * c / dims[i] for i in range(4)]
        expected += [math.sin(a[0]), math.cos(a[1]), math.sin(a[2]), math.cos(a[3])]
    torch.testing.assert_close(emb[0], torch.tensor(expected, dtype=torch.float64))
    # 2-d points: [y, x] — the first half of the 4-d embedding
    emb2 = box_sine_embedding(boxes[:, :2], num_pos_feats=4, temperature=100.0)
    torch.testing.assert_close(emb2, emb[:, :8])


def test_box_embedding_batched_shapes_and_default_width():
    boxes = torch.rand(3, 5, 4)
    emb = box_sine_embedding(boxes)
    assert emb.shape == (3, 5, 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[1, 2], box_sine_embedding(boxes[1, 2][None])[0])
    with pytest.raises(ValueError):
        box_sine_embedding(torch.rand(3, 3))


# ---------------------------------------------------------------- object box embedding (MLLM)
@pytest.mark.parametrize("case", ["cafe_12boxes", "install_portrait_3boxes"])
def test_object_embedding_matches_mllm_cases(mllm_golden, case):
    t = load_file(str(mllm_golden / "cases" / f"{case}.safetensors"))
    emb = object_box_embedding(t["object_box_cxcywh_norm"], dim=120)
    _close_rel(emb, t["object_pos_embed"])


def test_object_embedding_matches_full_layout(mllm_golden):
    t = load_file(str(mllm_golden / "roi_full_layout" / "roi_full_layout.safetensors"))
    emb = object_box_embedding(t["box_cxcywh_norm"], dim=2880)
    _close_rel(emb, t["pos_embed"])


def test_object_embedding_by_hand():
    box = torch.tensor([[0.5, 0.25, 0.125, 2.0]], dtype=torch.float64)  # cx, cy, w, h (h > 1: no clipping)
    emb = object_box_embedding(box, dim=8, temperature=16.0)  # d = 2 per component
    expected = []
    for c in (0.25, 0.5, 0.125, 2.0):  # cy, cx, w, h
        expected += [math.sin(2 * math.pi * c), math.cos(2 * math.pi * c)]  # both use T**0 = 1
    torch.testing.assert_close(emb[0], torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of 4"):
        object_box_embedding(box, dim=10)
