"""ChatRex pipeline: result builders on literal answers, and every task end to end on tiny models.

Two tiny MLLM folders are used (tests/tiny_models.py): a random one (gibberish text: structure, caching
and equality with the plain processor + generate path) and a scripted one that always answers
`SCRIPTED_ANSWER` (grounds <obj0>, <obj2>, <obj7>), which makes detections and out-of-range handling
deterministic end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chatrex.errors import MissingWeightsError, TooManyBoxesError
from chatrex.grounding import parse_answer
from chatrex.pipeline_cache import LRUCache, boxes_key, image_key
from chatrex.results import (
    DetectionResult,
    InputBoxes,
    build_detections,
    grounded_phrases,
    match_category,
    region_caption_text,
)
from tiny_models import SCRIPTED_ANSWER, build_tiny_upn, scripted_chatrex_dir, tiny_chatrex_dir, tiny_upn_ckpt  # noqa: F401

BOXES3 = [[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 150.0, 110.0], [5.0, 60.0, 40.0, 115.0]]


# ----------------------------------------------------------------------------- pure builders
def _inputs(n=3, source="fine_grained_prompt"):
    return InputBoxes([list(b) for b in BOXES3[:n]], [0.9, 0.6, 0.4][:n], source)


def test_build_detections_from_literal_answers():
    text = ("<ground>person</ground><objects><obj2><obj0></objects>\n"
            "<ground>Pigeons</ground><objects><obj1><obj5></objects>\n"
            "<ground>tree</ground><objects><obj1></objects>")
    inputs = _inputs()
    answer = parse_answer(text, inputs.boxes)
    dets, warnings = build_detections(answer, ["person", "pigeon"], inputs)
    assert [(d.category, d.index) for d in dets] == [("person", 2), ("person", 0), ("pigeon", 1)]
    assert dets[0].box == BOXES3[2] and dets[0].score == pytest.approx(0.4)
    # <obj5> is reported once (by the parser, which saw the boxes) and becomes no detection.
    assert any("<obj5>" in p for p in answer.problems)
    assert len(warnings) == 1 and "'tree'" in warnings[0] and "matches none" in warnings[0]
    # Parsed without boxes: the builder reports the out-of-range index itself.
    _, warnings2 = build_detections(parse_answer(text), ["person", "pigeon"], inputs)
    assert any("<obj5>" in w and "only 3 input boxes" in w for w in warnings2)


def test_detections_dedupe_and_spaced_form_and_no_answer():
    inputs = _inputs()
    spaced = "<ground> dog </ground> <objects> <obj1> <obj1> </objects>"
    dets, _ = build_detections(parse_answer(spaced, inputs.boxes), ["dog"], inputs)
    assert [(d.category, d.index) for d in dets] == [("dog", 1)]
    dets, warnings = build_detections(parse_answer("There is no such thing in this image.", inputs.boxes),
                                      ["dog"], inputs)
    assert dets == [] and warnings == []


def test_match_category_rules():
    assert match_category(" Person. ", ["person", "dog"]) == "person"
    assert match_category("dogs", ["person", "dog"]) == "dog"
    assert match_category("puppies", ["puppy", "cat"]) == "puppy"
    assert match_category("the man in red", ["man in red shirt"]) == "man in red shirt"  # single target
    assert match_category("car", ["person", "dog"]) is None


def test_region_caption_text_and_phrases():
    inputs = _inputs()
    answer = parse_answer("<ground>A brown dog lying on a bed</ground><objects><obj1></objects>", inputs.boxes)
    assert region_caption_text(answer, 1) == "A brown dog lying on a bed"
    assert region_caption_text(parse_answer("<obj0> shows a dog."), 0) == "<obj0> shows a dog."
    phrases = grounded_phrases(parse_answer("a <ground>cat</ground><objects><obj0><obj9></objects>"), inputs)
    assert phrases[0].phrase == "cat" and phrases[0].indices == [0] and phrases[0].boxes == [BOXES3[0]]


def test_detection_exports():
    inputs = _inputs()
    answer = parse_answer("<ground>dog</ground><objects><obj1></objects><ground>cat</ground><objects><obj0></objects>",
                          inputs.boxes)
    dets, _ = build_detections(answer, ["cat", "dog"], inputs)
    from chatrex.results import Timing

    result = DetectionResult("detect", "q", answer.raw, answer, inputs, (160, 120), Timing(),
                             categories=["cat", "dog"], detections=dets)
    coco = result.to_coco(7)
    assert coco[0] == {"image_id": 7, "category_id": 2, "bbox": [70.0, 20.0, 80.0, 90.0], "score": 0.6}
    assert result.to_coco(7, {"cat": 17, "dog": 18})[1]["category_id"] == 17
    with pytest.raises(ValueError, match="not in the COCO category map"):
        result.to_coco(7, {"cat": 1})
    sv = result.to_supervision()
    assert sv["xyxy"].shape == (2, 4) and sv["xyxy"].dtype == np.float32
    assert list(sv["class_name"]) == ["dog", "cat"] and list(sv["class_id"]) == [1, 0]
    np.testing.assert_allclose(sv["confidence"], [0.6, 0.9], rtol=1e-6)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["detections"][0] == {"category": "dog", "box": BOXES3[1], "score": 0.6, "index": 1}
    assert data["input_boxes"]["boxes"][2]["index"] == 2


def test_lru_cache_and_keys():
    cache: LRUCache[int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now most recent
    cache.put("c", 3)
    assert "b" not in cache and "a" in cache and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 0)
    img = Image.new("RGB", (8, 6), (1, 2, 3))
    assert image_key(img) == image_key(img.copy()) != image_key(Image.new("RGB", (6, 8), (1, 2, 3)))
    assert boxes_key([[1.00001, 2, 3, 4]]) == boxes_key([[1.0, 2, 3, 4]])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    base = np.zeros((120, 160, 3), np.uint8)
    base[20:90, 30:120] = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    return Image.fromarray(base)


def _load(folder, upn=None, **kwargs):
    from chatrex.pipeline import ChatRex

    return ChatRex.from_pretrained(mllm=folder, upn=upn, upn_config="tiny", device="cpu", dtype="fp32",
                                   upn_options={"short": 224, "max_size": 320}, **kwargs)


@pytest.fixture(scope="module")
def rex(tiny_chatrex_dir, tiny_upn_ckpt):
    return _load(tiny_chatrex_dir, tiny_upn_ckpt, max_new_tokens=6)


@pytest.fixture(scope="module")
def scripted(scripted_chatrex_dir, tiny_upn_ckpt):
    return _load(scripted_chatrex_dir, tiny_upn_ckpt, max_new_tokens=20)


def test_cached_answers_equal_the_plain_processor_generate_path(rex, image):
    """Prefix embeddings + KV reuse must not change a single generated id."""
    rex.clear_cache()
    question = "What is the category name of <obj1>? Answer the question with its category name in free format."
    first = rex.ask(image, question, boxes=BOXES3)
    second = rex.ask(image, question, boxes=BOXES3)  # from the cache
    inputs = rex.processor.process(image, question, BOXES3)
    with torch.inference_mode():
        ids = rex.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                 eos_token_id=rex.processor.tokenizer.eos_token_id, pad_token_id=rex.processor.pad_token_id)
    from chatrex.model.modeling import decode_answer

    expected = decode_answer(rex.processor.tokenizer, ids[0].tolist())
    assert first.raw == second.raw == expected
    assert not first.timing.cache_hit and second.timing.cache_hit


def test_chat_reuses_vision_features_across_turns_and_questions(rex, image):
    rex.clear_cache()
    calls = {"n": 0}
    original = rex.model.encode_images

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    rex.model.encode_images = counting
    try:
        turn1 = rex.chat(image, "What is in this room?")
        turn2 = rex.chat(image, "And what about the left side?", history=turn1.history)
        other = rex.caption_image(image)  # other question, other (fine) boxes: same vision features
        fresh = rex.chat(image.transpose(Image.FLIP_LEFT_RIGHT), "What is in this room?")
    finally:
        rex.model.encode_images = original
    assert calls["n"] == 2, "vision towers must run once per distinct image"
    assert turn2.timing.cache_hit and turn2.timing.proposals_s < turn1.timing.proposals_s
    assert turn1.boxes.source == "coarse_grained_prompt" and other.boxes.source == "fine_grained_prompt"
    assert turn1.question.startswith("Answer the question in grounded format. ")
    assert turn2.history == [*turn1.history, (turn2.question, turn2.raw)] and len(turn2.history) == 2
    assert not fresh.timing.cache_hit


def test_every_task_returns_typed_results_with_and_without_boxes(rex, image):
    det = rex.detect(image, "person; pigeon")
    assert det.categories == ["person", "pigeon"] and det.proposals is not None
    assert det.boxes.source == "fine_grained_prompt" and len(det.boxes) == len(det.proposals.boxes)
    assert det.question == "Please detect person; pigeon in this image. Answer the question with object indexes."
    user = rex.detect(image, ["dog"], boxes=BOXES3)
    assert user.boxes.source == "user" and user.boxes.scores == [1.0] * 3 and user.proposals is None
    ref = rex.refer(image, "the man in yellow shirt", boxes=BOXES3)
    assert ref.categories == ["the man in yellow shirt"] and isinstance(ref.raw, str)
    regions = rex.caption_region(image, BOXES3[:2], style="short")
    assert [r.index for r in regions.regions] == [0, 1] and len(regions.captions) == 2
    assert regions.questions[1].startswith("Can you provide me with a short phrase to describe <obj1>?")
    cap = rex.caption_image(image, detailed=True, boxes=BOXES3)
    assert cap.question.startswith("Please provide a detailed description") and cap.boxes.source == "user"
    for result in (det, user, ref, regions, cap):
        data = json.loads(json.dumps(result.to_dict()))
        assert data["timing"]["total_s"] > 0 and "input_boxes" in data


def test_scripted_detection_end_to_end_with_user_boxes(scripted, image):
    result = scripted.detect(image, ["person", "dog"], boxes=BOXES3)
    assert result.raw == SCRIPTED_ANSWER
    assert [(d.category, d.index, d.box, d.score) for d in result.detections] == [
        ("person", 0, BOXES3[0], 1.0), ("person", 2, BOXES3[2], 1.0)]
    # <obj7> does not exist: reported once, no detection, drawn nowhere.
    assert [p for p in result.problems if "<obj7>" in p] and len(result.problems) == 1
    assert result.phrases[0].indices == [0, 2]
    coco = result.to_coco(3)
    assert [c["bbox"] for c in coco] == [[10.0, 10.0, 50.0, 40.0], [5.0, 60.0, 35.0, 55.0]]


def test_scripted_detection_with_upn_proposals(scripted, image):
    result = scripted.detect(image, "person")
    n = len(result.boxes)
    assert n > 0 and result.boxes.source == "fine_grained_prompt"
    expected = [k for k in (0, 2, 7) if k < n]
    assert [d.index for d in result.detections] == expected
    for det in result.detections:
        assert det.box == result.proposals.boxes[det.index]
        assert det.score == pytest.approx(result.proposals.scores[det.index])
    assert (7 >= n) == any("<obj7>" in p for p in result.problems)


def test_scripted_chat_and_captions(scripted, image):
    chat = scripted.chat(image, "Who is here?", boxes=BOXES3)
    assert chat.text == "person" and chat.phrases[0].boxes == [BOXES3[0], BOXES3[2]]
    regions = scripted.caption_region(image, BOXES3, style="category")
    assert regions.captions == ["person"] * 3


def test_errors_are_typed_and_say_what_to_do(rex, tiny_chatrex_dir, image):
    from chatrex.pipeline import ChatRex

    with pytest.raises(MissingWeightsError, match="mllm="):
        ChatRex.from_pretrained()
    no_upn = ChatRex(rex.model, rex.processor, None)
    with pytest.raises(MissingWeightsError, match="boxes="):
        no_upn.detect(image, "dog")
    with pytest.raises(TooManyBoxesError, match="at most 100"):
        rex.detect(image, "dog", boxes=[[0, 0, 5, 5]] * 101)
    with pytest.raises(ValueError, match="style"):
        rex.caption_region(image, BOXES3, style="poem")
    with pytest.raises(ValueError, match="at least one box"):
        rex.caption_region(image, [])
    with pytest.raises(MissingWeightsError, match="UPN checkpoint not found"):
        ChatRex.from_pretrained(mllm=tiny_chatrex_dir, upn="/nonexistent/upn.pth", device="cpu")


def test_proposals_beyond_the_object_limit_keep_the_best(rex, tmp_path, image):
    from chatrex.pipeline import ChatRex
    from chatrex.upn.predictor import UPNPredictor

    flood = UPNPredictor.from_checkpoint(build_tiny_upn(tmp_path / "flood.pth", calibrate=False), config="tiny",
                                         device="cpu", short=224, max_size=320)
    pipe = ChatRex(rex.model, rex.processor, flood, max_new_tokens=2)
    result = pipe.detect(image, "dog")
    assert len(result.proposals.boxes) > 100 and len(result.boxes) == 100
    assert result.boxes.boxes == result.proposals.boxes[:100]
    assert any("kept the 100 best" in p for p in result.problems)
