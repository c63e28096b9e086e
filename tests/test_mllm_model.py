"""ChatRex MLLM model: config, strict loading, every stage against the tiny fixture, merge rules, loss."""

from __future__ import annotations

import json

import pytest
import torch

from chatrex.errors import CheckpointError, ConfigError, TooManyBoxesError
from chatrex.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX, ChatRexConfig, ChatRexForConditionalGeneration
from chatrex.model.vision import flatten_last_stage, fuse_image_features
from mllm_fixture import (
    CASES,
    assert_close_rel,
    case_inputs,
    fixture_config,
    fixture_state_dict,
    load_case,
    shared_fixture_model,
)


@pytest.fixture(scope="module")
def model(mllm_golden):
    return shared_fixture_model()


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", ["tiny", "chatrex-7b", "rexseek-3b"])
def test_presets_round_trip(name, tmp_path):
    config = ChatRexConfig.from_name(name)
    assert config.mm_hidden_size == config.vision_config.hidden_size + config.convnext_dims[-1]
    assert config.object_hidden_size == sum(config.convnext_dims)
    assert config.num_image_tokens == (config.low_res_size // config.vision_config.patch_size) ** 2
    again = ChatRexConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "chatrex"
    loaded = ChatRexConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.text_config.model_type == config.text_config.model_type


def test_preset_sizes():
    big = ChatRexConfig.from_name("chatrex-7b")
    assert (big.num_image_tokens, big.mm_hidden_size, big.object_hidden_size, big.hidden_size) == (576, 2560, 2880, 4096)
    assert big.text_config.vocab_size == 32104 and big.chat_template == "vicuna"
    qwen = ChatRexConfig.from_name("rexseek-3b")
    assert qwen.text_config.model_type == "qwen2" and qwen.chat_template == "chatml"
    assert qwen.text_config.num_key_value_heads == 2 and qwen.text_config.vocab_size == 151936
    tiny = ChatRexConfig.from_name("tiny")
    assert (tiny.num_image_tokens, tiny.mm_hidden_size, tiny.object_hidden_size) == (64, 96, 120)
    assert ChatRexConfig().to_dict()["convnext_dims"] == tiny.convnext_dims  # no-arg config = tiny sizes


@pytest.mark.parametrize(
    "overrides",
    [
        dict(convnext_dims=[8, 16, 32]),
        dict(high_res_size=320),  # grid 10 != CLIP grid 8
        dict(low_res_size=100),  # not a multiple of the patch
        dict(chat_template="no placeholder"),
        dict(max_objects=101),
        dict(vision_feature_layer=-4),
    ],
)
def test_config_validation(overrides):
    with pytest.raises(ConfigError):
        ChatRexConfig.from_name("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="tiny"):
        ChatRexConfig.from_name("chatrex-70b")


# ---------------------------------------------------------------------------------------------- loading
def test_strict_load_report(mllm_golden):
    state = fixture_state_dict()
    del state["mm_projector.2.bias"]
    state["mm_projector.9.weight"] = torch.zeros(3)
    state["vision_tower_aux.vision_stages.2.blocks.1.ramma"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        ChatRexForConditionalGeneration.from_reference_state_dict(state, fixture_config())
    text = str(err.value)
    assert "1 missing, 1 unexpected, 1 with the wrong shape" in text
    assert "mm_projector.2.bias" in text and "mm_projector.9.weight" in text
    assert "vision_stages.2.blocks.1.ramma: checkpoint (5,) vs model (32,)" in text


def test_load_accepts_clip_position_ids_and_rebuilds_buffers(mllm_golden):
    state = fixture_state_dict()
    state["vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    loaded = ChatRexForConditionalGeneration.from_reference_state_dict(state, fixture_config())
    torch.manual_seed(0)
    fresh = ChatRexForConditionalGeneration(fixture_config())
    fresh_buffers = dict(fresh.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert not buffer.is_meta, name
        torch.testing.assert_close(buffer, fresh_buffers[name], rtol=0, atol=0, msg=name)
    assert not any(p.is_meta for p in loaded.parameters())
    assert loaded.config.convnext_depths == [1, 1, 2, 1]


def test_load_dtype_bf16(mllm_golden):
    loaded = ChatRexForConditionalGeneration.from_reference_state_dict(fixture_state_dict(), fixture_config(), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module", params=CASES)
def case(request, mllm_golden):
    return request.param, *load_case(request.param)


def test_towers_match_fixture(model, case):
    name, _, t = case
    with torch.no_grad():
        clip = model.vision_tower(t["pixel_values"])
        maps = model.encode_highres(t["pixel_values_aux"])
        tokens, _ = model.encode_images(t["pixel_values"], t["pixel_values_aux"])
    assert_close_rel(clip, t["lowres_features"], f"{name}:lowres_features")
    for i, stage in enumerate(maps):
        assert_close_rel(stage, t[f"convnext_stage{i}"], f"{name}:convnext_stage{i}")
    assert_close_rel(flatten_last_stage(maps[-1]), t["highres_last_flat"], f"{name}:highres_last_flat")
    assert_close_rel(fuse_image_features(clip, maps[-1]), t["image_features_preproj"], f"{name}:image_features_preproj")
    assert_close_rel(tokens, t["image_tokens"], f"{name}:image_tokens")


def test_merge_and_logits_match_fixture(model, case):
    name, meta, t = case
    inputs = case_inputs(t)
    with torch.no_grad():
        embeds, mask, positions, _ = model.multimodal_embeddings(**inputs)
        logits = model(**inputs).logits
    assert_close_rel(embeds, t["inputs_embeds"], f"{name}:inputs_embeds")
    assert mask.shape == embeds.shape[:2] and bool(mask.all())
    assert torch.equal(positions[0], torch.arange(embeds.shape[1]))
    assert embeds.shape[1] == meta["inputs_embeds_len"]
    assert_close_rel(logits, t["logits"], f"{name}:logits")
    assert (logits - t["logits"]).abs().max().item() <= 1e-4


def test_zero_boxes_none_or_empty(model, mllm_golden):
    _, t = load_case("install_0boxes")
    inputs = case_inputs(t)
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(**inputs, gt_boxes=torch.zeros(1, 0, 4)).logits
        c = model(**inputs, gt_boxes=torch.zeros(1, 0, 4), num_boxes=torch.tensor([0])).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    assert_close_rel(a, t["logits"], "install_0boxes:logits")


# ---------------------------------------------------------------------------------------------- count checks
def test_sentinel_box_count_mismatch(model, mllm_golden):
    _, t = load_case("install_portrait_3boxes")
    inputs = case_inputs(t)
    with pytest.raises(ValueError, match="3 object placeholders .* 2 boxes"):
        model(**{**inputs, "gt_boxes": inputs["gt_boxes"][:, :2]})
    with pytest.raises(ValueError, match="1 boxes"):
        model(**inputs, num_boxes=torch.tensor([1]))
    without_boxes = {k: v for k, v in inputs.items() if k != "gt_boxes"}
    with pytest.raises(ValueError, match="3 object placeholders .* 0 boxes"):
        model(**without_boxes)


def test_101_sentinels_vs_100_boxes():
    config = ChatRexConfig.from_name("tiny")
    torch.manual_seed(0)
    model = ChatRexForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX] + [OBJECT_TOKEN_INDEX] * 101 + [5]])
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(1, 100, 1)
    pixels = dict(pixel_values=torch.zeros(1, 3, 112, 112), pixel_values_aux=torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="101 object placeholders .* 100 boxes"):
        model(input_ids=ids, gt_boxes=boxes, **pixels)
    with pytest.raises(TooManyBoxesError, match="101 boxes"):
        model(input_ids=ids, gt_boxes=torch.cat([boxes, boxes[:, :1]], 1), **pixels)


def test_index_in_object_slot_adds_the_preceding_token_embedding_to_each_slot():
    torch.manual_seed(0)
    plain = ChatRexForConditionalGeneration(ChatRexConfig.from_name("tiny")).eval()
    assert plain.config.index_in_object_slot is False  # the official layout: slots hold the features only
    indexed = ChatRexForConditionalGeneration(ChatRexConfig.from_name("tiny", index_in_object_slot=True)).eval()
    indexed.load_state_dict(plain.state_dict())
    assert ChatRexConfig.from_dict(indexed.config.to_dict()).index_in_object_slot is True
    # two rows, left padded: [pad, bos, <img>, 7, obj, 9, obj, 4] and [bos, <img>, 8, obj, 4, 4, 4, 4];
    # a slot right after the image sentinel gets nothing (no text token before it)
    ids = torch.tensor([[0, 1, IMAGE_TOKEN_INDEX, 7, OBJECT_TOKEN_INDEX, 9, OBJECT_TOKEN_INDEX, 4],
                        [1, IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX, 8, OBJECT_TOKEN_INDEX, 4, 4, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
    hidden = plain.config.hidden_size
    image = torch.randn(2, 3, hidden)
    objects = [torch.randn(2, hidden), torch.randn(2, hidden)]
    a = plain.prepare_inputs_embeds(ids, mask, image, objects)[0]
    b = indexed.prepare_inputs_embeds(ids, mask, image, objects)[0]
    table = plain.get_input_embeddings().weight

    def indexed_slot(feature, token):  # the feature + the token's embedding scaled to the feature's norm
        return feature + table[token] * feature.norm() / table[token].norm()

    # merged positions: image (3 tokens) replaces one, so row 0 slots sit at 6 and 8, row 1 slots at 4 and 6
    torch.testing.assert_close(b[0, 6], indexed_slot(objects[0][0], 7))
    torch.testing.assert_close(b[0, 8], indexed_slot(objects[0][1], 9))
    torch.testing.assert_close(b[1, 4], a[1, 4])
    torch.testing.assert_close(b[1, 6], indexed_slot(objects[1][1], 8))
    other = torch.ones(b.shape[:2], dtype=torch.bool)
    other[0, [6, 8]], other[1, [4, 6]] = False, False
    torch.testing.assert_close(b[other], a[other])  # nothing else changes


# ---------------------------------------------------------------------------------------------- training
def test_labels_loss_and_backward(mllm_golden):
    model = ChatRexForConditionalGeneration.from_reference_state_dict(fixture_state_dict(), fixture_config()).train()
    _, t = load_case("install_portrait_3boxes")
    inputs = case_inputs(t)
    ids = inputs["input_ids"]
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # an instruction prefix the loss must skip
    embeds, _, _, merged = model.multimodal_embeddings(**inputs, labels=labels)
    n_obj = int((ids == OBJECT_TOKEN_INDEX).sum())
    assert merged.shape == embeds.shape[:2]
    # every text label survives exactly once; image/object positions (and the prefix) are ignored
    kept = labels[(ids >= 0) & (labels != IGNORE_INDEX)]
    assert torch.equal(merged[merged != IGNORE_INDEX], kept)
    assert int((merged == IGNORE_INDEX).sum()) == model.config.num_image_tokens + n_obj + int((labels[ids >= 0] == IGNORE_INDEX).sum())
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    logits = out.logits[0, :-1]
    target = merged[0, 1:]
    valid = target != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[valid], target[valid])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.mm_object_projector[0].weight.grad is not None
    assert model.mm_projector[0].weight.grad.abs().sum() > 0
    assert model.vision_tower_aux.vision_stages[0].blocks[0].ramma.grad is not None


def test_bf16_forward_is_close_and_finite(mllm_golden):
    model = ChatRexForConditionalGeneration.from_reference_state_dict(fixture_state_dict(), fixture_config(), dtype=torch.bfloat16)
    _, t = load_case("cafe_12boxes")
    with torch.no_grad():
        logits = model(**case_inputs(t)).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    assert_close_rel(logits.float(), t["logits"], "bf16 logits", rel=5e-2)  # bf16 rounding, not a wrong layer


def test_gradient_checkpointing_backward(mllm_golden):
    model = ChatRexForConditionalGeneration.from_reference_state_dict(fixture_state_dict(), fixture_config()).train()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, t = load_case("install_portrait_3boxes")
    inputs = case_inputs(t)
    loss = model(**inputs, labels=inputs["input_ids"].clamp(min=0), use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_proj.weight.grad is not None
