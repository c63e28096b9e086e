"""Symbolic object slots (`chatrex.train.symbolic`): what a slot is made of, the regression target of stage 0,
and a recipe with a symbolic stage and a regressing stage 0 training, checkpointing and resuming exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatrex.data.instructions import make_samples
from chatrex.data.synthetic import COLOURS, SHAPES, sample_scene
from chatrex.train import chatrex_trainer as T
from chatrex.train.symbolic import SymbolicSlots, box_attributes, regression_loss, symbolic_objects

from test_train_chatrex import assert_resume_is_exact, small_config

torch.set_num_threads(1)


def test_a_slot_is_its_colour_and_shape_words_plus_geometry():
    emb = torch.randn(20, 8, requires_grad=True)
    slots = SymbolicSlots(8, colour_ids=list(range(8)), shape_ids=list(range(10, 15)))
    attrs = torch.tensor([[2, 3], [-1, -1], [2, 3]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]])
    out = slots(emb, attrs, boxes)
    geo = slots.geometry(boxes)
    assert torch.allclose(out[0], emb[2] + emb[13] + geo[0])
    assert torch.allclose(out[1], slots.distractor + geo[1])
    assert torch.equal(out[0], out[2])
    out.sum().backward()  # the LLM's word embeddings learn through the slots
    assert emb.grad[2].abs().sum() > 0 and emb.grad[13].abs().sum() > 0 and emb.grad[5].abs().sum() == 0


def test_box_attributes_follow_the_scene_and_reach_the_batch():
    scene = sample_scene(5)
    samples = make_samples(scene, np.random.default_rng(0), ["detect", "region_category"])
    attrs = samples[0].meta["box_attrs"]
    assert len(attrs) == len(samples[0].boxes)
    owners = [None] * len(attrs)
    for k, (c, s) in enumerate(attrs):
        if c >= 0:
            matches = [i for i, o in enumerate(scene.objects) if (o.colour, o.shape) == (COLOURS[c], SHAPES[s])]
            assert matches
            owners[k] = matches[0]
    assert sum(c >= 0 for c, _ in attrs) == len(scene.objects)
    assert torch.equal(box_attributes(scene, owners)[:, 0] >= 0, torch.tensor([c >= 0 for c, _ in attrs]))


def test_regression_loss_is_relative_and_does_not_move_the_target():
    target = torch.randn(3, 6, requires_grad=True)
    assert regression_loss(target.detach().clone(), target).item() == 0.0
    tokens = torch.zeros(3, 6, requires_grad=True)
    loss = regression_loss(tokens, target)
    assert loss.item() == pytest.approx(1.0)
    assert regression_loss(tokens * 10, target * 10).item() == pytest.approx(1.0)  # scale-free
    loss.backward()
    assert target.grad is None and tokens.grad.abs().sum() > 0


def test_symbolic_batches_skip_the_vision_side(tmp_path):
    from chatrex.model.processing import ChatRexProcessor
    from chatrex.train.chatrex_data import encode_samples, scene_samples
    from chatrex.train.region_pretrain import category_word_ids

    cfg = small_config(stages=({"stage": 2, "steps": 1, "lr": 1e-3, "symbolic": True},), tokenizer_scenes=20)
    tok = T.load_or_build_tokenizer(cfg)
    model = T.build_model(cfg, tok)
    words = category_word_ids(tok)
    assert words[0] is not None, "20 scenes make every colour and shape word one token"
    slots = SymbolicSlots(model.config.text_config.hidden_size, *words)
    batch = encode_samples(ChatRexProcessor(tok, model.config), scene_samples(cfg, 0, 0))
    loss = T.batch_loss(model, batch, symbolic=slots)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(T.VISION_PREFIXES))
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    objects = symbolic_objects(slots, model, batch["box_attrs"], batch["boxes"])
    assert [o.shape[0] for o in objects] == [b.shape[0] for b in batch["boxes"]]


@pytest.mark.parametrize("split", [2, 3])  # inside the symbolic stage, at the symbolic -> stage-0 boundary
def test_symbolic_then_regressing_stage0_trains_and_resumes_exactly(tmp_path, split):
    cfg = small_config(stages=({"stage": 2, "steps": 3, "lr": 2e-3, "symbolic": True},
                               {"stage": 0, "steps": 2, "lr": 2e-3, "regress": 2.0},
                               {"stage": 2, "steps": 1, "lr": 2e-3}),
                       region_images_per_step=1, frozen_towers=True, ckpt_every=1, tokenizer_scenes=20)
    assert_resume_is_exact(cfg, tmp_path, split)
    extra = torch.load(tmp_path / "a" / T.CHECKPOINT_NAME, weights_only=True)["extra"]
    assert "symbolic_slots" in extra and "region_head" in extra


def test_symbolic_stages_need_single_token_category_words(tmp_path):
    cfg = small_config(stages=({"stage": 2, "steps": 1, "lr": 1e-3, "symbolic": True},), tokenizer_scenes=3)
    with pytest.raises(T.ConfigError, match="one token"):
        T.train_chatrex(cfg, tmp_path, stream=open(tmp_path / "log.txt", "w"))


def test_symbolic_and_regress_belong_to_their_stages():
    with pytest.raises(T.ConfigError, match="stage-2"):
        small_config(stages=({"stage": 0, "steps": 1, "lr": 1e-3, "symbolic": True},)).validate()
    with pytest.raises(T.ConfigError, match="stage-0"):
        small_config(stages=({"stage": 2, "steps": 1, "lr": 1e-3, "regress": 1.0},)).validate()
