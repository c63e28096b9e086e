"""Distinct two-stage query selection (UPNConfig.query_nms) and the post-training score calibration."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from chatrex.errors import ConfigError
from chatrex.eval.upn_eval import choose_threshold
from chatrex.train.upn_trainer import UPNTrainConfig, build_model, calibrate_prompts, train_upn
from chatrex.upn.config import UPNConfig
from chatrex.upn.transformer import distinct_topk

MICRO = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, d_model=32,
             d_ffn=64, n_heads=2, n_levels=4, n_points=2, enc_layers=1, dec_layers=2, num_queries=30,
             gn_groups=8)


def _logit_box(cx, cy, w, h):
    p = torch.tensor([cx, cy, w, h])
    return torch.log(p / (1 - p))


def test_distinct_topk_skips_near_copies_and_fills_with_them_last():
    # Tokens 0, 1 are near-copies (IoU ~0.9), token 2 is elsewhere, token 3 is invalid (inf), 4 is weak.
    coords = torch.stack([_logit_box(0.3, 0.3, 0.2, 0.2), _logit_box(0.305, 0.3, 0.2, 0.2),
                          _logit_box(0.7, 0.7, 0.2, 0.2), torch.full((4,), float("inf")),
                          _logit_box(0.5, 0.1, 0.1, 0.1)])[None]
    logits = torch.tensor([[5.0, 4.0, 3.0, 6.0, 1.0]])
    assert distinct_topk(logits, coords, 3, 0.7).tolist() == [[0, 2, 4]]
    # The duplicate and the invalid token only fill slots after every distinct one, by score.
    assert distinct_topk(logits, coords, 5, 0.7).tolist() == [[0, 2, 4, 3, 1]]
    assert distinct_topk(logits, coords, 3, 0.99).tolist() == [[0, 1, 2]]  # threshold above their IoU


def test_query_nms_is_off_by_default_and_validated():
    assert UPNConfig.from_name("large").query_nms == 0.0 and UPNConfig.from_name("tiny").query_nms == 0.0
    with pytest.raises(ConfigError):
        UPNConfig.from_dict({**UPNConfig.from_name("tiny").to_dict(), "query_nms": 1.5})
    cfg = UPNTrainConfig(model={**MICRO, "query_nms": 0.7}, short=96, max_size=128)
    model = build_model(cfg).eval()
    pixels, mask = torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        out = model(pixels, mask, "fine_grained_prompt")
    idx = out.topk_indices[0]
    assert idx.shape == (30,) and idx.unique().numel() == 30


def test_choose_threshold_takes_the_highest_recall_point_at_the_precision_floor():
    points = [{"threshold": 0.1, "recall": 0.99, "precision": 0.5, "num_pred": 10},
              {"threshold": 0.2, "recall": 0.97, "precision": 0.86, "num_pred": 8},
              {"threshold": 0.3, "recall": 0.90, "precision": 0.95, "num_pred": 6},
              {"threshold": 0.4, "recall": 0.0, "precision": 1.0, "num_pred": 0}]
    assert choose_threshold(points, 0.85)["threshold"] == 0.2
    assert choose_threshold(points, 0.99)["threshold"] == 0.3  # unreachable: best F1, never an empty point


def test_calibration_rescales_prompt_logits_without_changing_the_ranking(tmp_path):
    cfg = UPNTrainConfig(model=MICRO, short=96, max_size=128, calibrate_scenes=2, calibrate_precision=0.0)
    model = build_model(cfg).eval()
    pixels, mask = torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        before = model(pixels, mask, "fine_grained_prompt")
    result = calibrate_prompts(model, cfg)
    with torch.no_grad():
        after = model(pixels, mask, "fine_grained_prompt")
    fine = result["fine_grained_prompt"]
    # precision floor 0 → the lowest threshold; its logit maps onto logit(0.3).
    assert fine["threshold"] == pytest.approx(0.02) and fine["scale"] == pytest.approx(
        math.log(0.3 / 0.7) / math.log(0.02 / 0.98), rel=1e-3)
    assert torch.equal(before.topk_indices, after.topk_indices)
    assert torch.allclose(after.pred_logits, before.pred_logits * fine["scale"], rtol=1e-3, atol=1e-4)
    assert result["split"] == "val" and result["scenes"] == 2


def test_training_run_calibrates_the_export_but_not_the_checkpoint(tmp_path):
    cfg = UPNTrainConfig(model=MICRO, short=96, max_size=128, steps=2, batch_size=1, warmup=0, ckpt_every=1000,
                         log_every=1000, calibrate_scenes=2)
    train_upn(cfg, tmp_path, stream=io.StringIO())
    meta = json.loads((tmp_path / "upn.json").read_text())
    assert set(meta["calibration"]) >= {"fine_grained_prompt", "coarse_grained_prompt", "scenes"}
    from chatrex.upn.checkpoint import read_state_dict

    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    exported = read_state_dict(tmp_path / "upn.safetensors")
    key = "transformer.fine_grained_prompt.weight"
    scale = meta["calibration"]["fine_grained_prompt"]["scale"]
    assert torch.allclose(exported[key].float(), ckpt["model"][key].float() * scale, rtol=1e-3, atol=1e-5)
