"""UPN training: matcher and losses on hand cases, a few steps lower the loss, resume is exact."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from chatrex.train.common import lr_lambda, parse_overrides
from chatrex.train.losses import LossWeights, one_to_many_assign, set_loss, sigmoid_focal_loss
from chatrex.train.matcher import HungarianMatcher, focal_cost
from chatrex.train.upn_trainer import UPNTrainConfig, build_model, main, make_example, train_upn

# A very small UPN (4 levels, 2 decoder layers, 30 queries) on 96-128 px inputs: steps take ~0.1 s.
MICRO = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, d_model=32,
             d_ffn=64, n_heads=2, n_levels=4, n_points=2, enc_layers=1, dec_layers=2, num_queries=30,
             gn_groups=8)


def micro_config(**changes) -> UPNTrainConfig:
    base = dict(model=MICRO, short=96, max_size=128, steps=6, batch_size=2, lr=1e-3, warmup=0,
                schedule="constant", ckpt_every=1000, log_every=1000, threads=0)
    return UPNTrainConfig(**{**base, **changes})


# ------------------------------------------------------------------------------------- matcher
def test_matcher_assigns_each_target_to_its_nearest_confident_query():
    # Query 0 sits on target 1, query 2 on target 0, query 1 is far from both.
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.1, 0.9, 0.05, 0.05], [0.3, 0.3, 0.2, 0.2]]])
    logits = torch.tensor([[2.0, 3.0, 2.0]])  # query 1 is the most confident but badly placed
    targets = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])]
    (rows, cols), = HungarianMatcher()(logits, boxes, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_matcher_prefers_confident_query_when_boxes_tie_and_handles_empty_targets():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(2, 3, 1)
    logits = torch.tensor([[-3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    out = HungarianMatcher()(logits, boxes, [torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.zeros(0, 4)])
    assert out[0][0].tolist() == [1] and out[0][1].tolist() == [0]
    assert out[1][0].numel() == 0 and out[1][1].numel() == 0
    # The focal cost decreases as the logit grows (a confident query is cheaper to call an object).
    costs = focal_cost(torch.tensor([-3.0, 0.0, 4.0]))
    assert costs[0] > costs[1] > costs[2]


# ------------------------------------------------------------------------------------- losses
def test_focal_loss_hand_values():
    logits = torch.tensor([0.0, 0.0, 2.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    got = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    p = 1 / (1 + math.exp(-2.0))
    expected = [0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2), 0.25 * (1 - p) ** 2 * -math.log(p)]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_set_loss_l1_and_giou_hand_values():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    logits = torch.tensor([[0.0, 0.0]])
    # target equals query 0 shifted right by 0.1 (same size): L1 = 0.1, IoU = 1/3, hull = union -> GIoU = 1/3.
    targets = [torch.tensor([[0.6, 0.5, 0.2, 0.2]])]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    terms = set_loss(logits, boxes, targets, indices, num_boxes=1.0, weights=LossWeights())
    assert terms["l1"].item() == pytest.approx(0.1, abs=1e-6)
    assert terms["giou"].item() == pytest.approx(1 - 1 / 3, abs=1e-6)
    focal = 0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2)  # one positive, one negative at p = 0.5
    assert terms["focal"].item() == pytest.approx(focal, abs=1e-6)
    # A perfect box gives zero box losses.
    perfect = set_loss(logits, boxes, [boxes[0, :1]], indices, 1.0, LossWeights())
    assert perfect["l1"].item() == 0 and perfect["giou"].item() == pytest.approx(0, abs=1e-6)


def test_one_to_many_assignment_takes_k_nearest_valid_tokens_per_target():
    # Tokens 0-2 sit near target 0, tokens 3-4 near target 1, token 5 is on target 0 but invalid.
    boxes = torch.tensor([[0.20, 0.2, 0.1, 0.1], [0.22, 0.2, 0.1, 0.1], [0.25, 0.2, 0.1, 0.1],
                          [0.70, 0.7, 0.3, 0.3], [0.72, 0.7, 0.3, 0.3], [0.20, 0.2, 0.1, 0.1]])
    valid = torch.tensor([True, True, True, True, True, False])
    targets = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]])
    tok, tgt = one_to_many_assign(torch.zeros(6), boxes, valid, targets, HungarianMatcher(), k=2)
    assert dict(zip(tok.tolist(), tgt.tolist())) == {0: 0, 1: 0, 3: 1, 4: 1}
    none = one_to_many_assign(torch.zeros(6), boxes, valid, torch.zeros(0, 4), HungarianMatcher(), k=2)
    assert none[0].numel() == 0


def test_dense_encoder_loss_trains_on_repeated_data(tmp_path):
    cfg = micro_config(steps=8, batch_size=1, data_repeat=1, lr=2e-3, grad_clip=1.0, enc_dense_k=4)
    losses = train_upn(cfg, tmp_path / "dense", stream=io.StringIO())["losses"]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-2:]) < 0.85 * sum(losses[:2])


# ------------------------------------------------------------------------------------- common
def test_lr_schedule_and_overrides():
    assert lr_lambda(0, 100, warmup=10) == pytest.approx(0.1)
    assert lr_lambda(10, 100, warmup=10) == pytest.approx(1.0)
    assert lr_lambda(100, 100, warmup=10, min_ratio=0.05) == pytest.approx(0.05)
    assert lr_lambda(55, 100, warmup=10, kind="linear") == pytest.approx(0.5)
    assert parse_overrides(["lr=1e-3", "bf16=true", "model=tiny"]) == {"lr": 1e-3, "bf16": True, "model": "tiny"}


def test_config_from_json_and_init_prior(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": MICRO, "steps": 7}))
    cfg = UPNTrainConfig.from_json(path, ["lr=0.01"])
    assert cfg.steps == 7 and cfg.lr == 0.01 and cfg.upn_config().num_queries == 30
    with pytest.raises(Exception, match="unknown"):
        UPNTrainConfig.from_json(path, ["lrr=1"])
    model = build_model(micro_config())
    tr = model.transformer
    shift = tr.decoder.norm.bias.detach()
    for prompt in (tr.fine_grained_prompt.weight[0], tr.coarse_grained_prompt.weight[0]):
        assert float(shift @ prompt.detach()) == pytest.approx(math.log(0.01 / 0.99), abs=1e-4)


def test_examples_are_deterministic_and_targets_follow_the_size_rule():
    cfg = micro_config()
    a_pix, a_t = make_example(cfg, 3, 1)
    b_pix, b_t = make_example(cfg, 3, 1)
    assert torch.equal(a_pix, b_pix) and torch.equal(a_t["fine_grained_prompt"], b_t["fine_grained_prompt"])
    assert min(a_pix.shape[1:]) <= 96 and max(a_pix.shape[1:]) <= 128  # the short/max_size rule
    for step in range(4):
        _, t = make_example(cfg, step, 0)
        fine, coarse = t["fine_grained_prompt"], t["coarse_grained_prompt"]
        assert coarse.shape[0] <= fine.shape[0] and fine.shape[0] >= 1
        assert bool(((fine >= 0) & (fine <= 1)).all())


# ------------------------------------------------------------------------------------- training
def test_few_steps_on_repeated_data_lower_the_loss(tmp_path):
    cfg = micro_config(steps=12, batch_size=1, data_repeat=1, lr=2e-3, grad_clip=1.0)
    result = train_upn(cfg, tmp_path / "run", stream=io.StringIO())
    losses = result["losses"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    meta = json.loads((tmp_path / "run" / "upn.json").read_text())
    assert meta["trained_steps"] == 12 and meta["short"] == 96 and meta["config"]["num_queries"] == 30
    assert (tmp_path / "run" / "upn.safetensors").is_file()


def test_resume_is_exact(tmp_path):
    cfg = micro_config(steps=4, warmup=2, schedule="cosine")
    straight = train_upn(cfg, tmp_path / "straight", stream=io.StringIO())
    part = train_upn(cfg, tmp_path / "part", stream=io.StringIO(), stop_at=2)
    assert part["step"] == 2 and part["losses"] == straight["losses"][:2]
    resumed = train_upn(cfg, tmp_path / "part", resume=tmp_path / "part" / "checkpoint.pt", stream=io.StringIO())
    assert resumed["losses"] == straight["losses"]
    for (name, p), q in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(p, q), name


def test_cli_main_trains_and_writes_weights(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(micro_config().to_dict()))
    assert main(["--config", str(path), "--out", str(tmp_path / "o"), "--steps", "2", "--threads", "1"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "upn.json").read_text())["trained_steps"] == 2
    assert main(["--config", str(path), "--out", str(tmp_path / "o"), "nonsense=1"]) == 2


def test_randomized_training_scenes_are_deterministic_and_boxes_tight():
    import numpy as np

    from chatrex.data.synthetic import sample_scene
    from chatrex.train.upn_augment import RANDOMIZED_STYLE

    kinds = set()
    for seed in range(12):
        a, b = sample_scene(seed, renderer=RANDOMIZED_STYLE), sample_scene(seed, renderer=RANDOMIZED_STYLE)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.objects == b.objects
        boxes = a.boxes
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= a.width).all() and (boxes[:, 3] <= a.height).all()
        assert all(12 <= o.size_px <= 97 for o in a.objects)
        kinds.add(a.background)
    assert len(kinds) >= 4  # default and randomized backgrounds both occur


def test_nms_ignore_leaves_near_copies_of_matched_queries_out_of_the_focal_loss():
    from chatrex.train.losses import _nms_keep_weights

    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.505, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    keep = _nms_keep_weights(boxes, [(torch.tensor([0]), torch.tensor([0]))], 0.85)
    assert keep.tolist() == [[1.0, 0.0, 1.0, 1.0]]  # IoU 0.95 copy ignored; IoU 0.6 neighbour stays negative
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    plain = set_loss(logits, boxes, [boxes[0, :1]], indices, 1.0, LossWeights())["focal"]
    ignored = set_loss(logits, boxes, [boxes[0, :1]], indices, 1.0, LossWeights(nms_ignore=0.85))["focal"]
    assert ignored.item() == pytest.approx(plain.item() - 0.75 * 0.25 * math.log(2), abs=1e-6)


def test_iou_score_target_makes_the_focal_target_the_box_iou():
    logits = torch.tensor([[0.3, -1.0]])
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    exact = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    loose = torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])  # IoU 0.6 with the target
    binary = set_loss(logits, exact, [target], indices, 1.0, LossWeights())["focal"]
    assert set_loss(logits, exact, [target], indices, 1.0, LossWeights(iou_target=True))["focal"].item() == \
        pytest.approx(binary.item(), abs=1e-5)  # a perfect box: target 1, the binary focal loss
    soft = set_loss(logits, loose, [target], indices, 1.0, LossWeights(iou_target=True))["focal"]
    p, t = torch.sigmoid(torch.tensor([0.3, -1.0])), torch.tensor([0.6, 0.0])
    bce = torch.nn.functional.binary_cross_entropy(p, t, reduction="none")
    expected = (torch.tensor([0.25, 0.75]) * (t - p).abs() ** 2 * bce).sum()
    assert soft.item() == pytest.approx(expected.item(), rel=1e-4)
    # the score is pushed towards the IoU: at p = IoU the matched query's loss is minimal
    at_iou = set_loss(torch.tensor([[math.log(0.6 / 0.4), -1.0]]), loose, [target], indices, 1.0,
                      LossWeights(iou_target=True))["focal"]
    assert at_iou.item() < soft.item()
