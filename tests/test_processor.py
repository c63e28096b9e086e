"""ChatRexProcessor against the mllm_tiny fixture cases (bit-exact), plus boxes, batching, decoding, I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from chatrex.errors import ConfigError, InvalidImageError, TooManyBoxesError
from chatrex.model.constants import IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX, SPECIAL_TOKENS
from chatrex.model.processing import (
    ChatRexProcessor,
    ProcessorConfig,
    boxes_to_canvas,
    ensure_special_tokens,
    resize_bilinear_reference,
    select_boxes,
)


# ------------------------------------------------------------------------------------------ fixture access
@pytest.fixture(scope="module")
def tokenizer(mllm_golden):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(mllm_golden / "tokenizer"))


@pytest.fixture(scope="module")
def fixture_sizes(mllm_golden):
    cfg = json.loads((mllm_golden / "config" / "fixture_config.json").read_text())
    return {"low_res_size": cfg["clip"]["image_size"], "high_res_size": cfg["aux_size"], "chat_template": "vicuna"}


@pytest.fixture(scope="module")
def processor(tokenizer, fixture_sizes):
    return ChatRexProcessor(tokenizer, fixture_sizes)


def case_names(golden):
    return json.loads((golden / "cases" / "index.json").read_text())


def load_case(golden, name):
    from safetensors.torch import load_file

    meta = json.loads((golden / "cases" / f"{name}.json").read_text())
    return meta, load_file(str(golden / "cases" / f"{name}.safetensors"))


def case_image(golden, meta) -> np.ndarray:
    """Decoded RGB array of the case, cropped as the case json says (crop is on the decoded array)."""
    info = meta["image"]
    with Image.open(golden / "inputs" / info["file"]) as im:
        arr = np.asarray(im.convert("RGB"))
    assert list(arr.shape) == info["decoded_shape_hwc"]
    if "crop_xyxy" in info:
        x0, y0, x1, y1 = info["crop_xyxy"]
        arr = arr[y0:y1, x0:x1]
        assert list(arr.shape) == info["cropped_shape_hwc"]
    return arr


@pytest.fixture(scope="module")
def cases(mllm_golden):
    names = case_names(mllm_golden)
    if isinstance(names, dict):
        names = names.get("cases", list(names))
    assert len(names) >= 3
    return {name: load_case(mllm_golden, name) for name in names}


@pytest.fixture(scope="module")
def processed(cases, processor, mllm_golden):
    out = {}
    for name, (meta, _) in cases.items():
        out[name] = processor.process(case_image(mllm_golden, meta), meta["question"], meta["boxes_xyxy_original_pixels"])
    return out


# ------------------------------------------------------------------------------------------ fixture parity
def test_every_case_is_bit_exact(cases, processed):
    for name, (meta, tensors) in cases.items():
        got = processed[name]
        assert torch.equal(got["pixel_values_aux"], tensors["pixel_values_aux"]), name
        assert torch.equal(got["pixel_values"], tensors["pixel_values"]), name
        assert got["input_ids"].dtype == torch.long
        assert torch.equal(got["input_ids"], tensors["input_ids"]), name
        assert got["input_ids"][0].tolist() == meta["input_ids"]
        assert torch.equal(got["attention_mask"], torch.ones_like(tensors["input_ids"]))
        n = len(meta["boxes_xyxy_original_pixels"])
        assert got["gt_boxes"].shape == (1, n, 4) and got["gt_boxes"].dtype == torch.float32
        if n:
            assert torch.equal(got["gt_boxes"], tensors["gt_boxes"]), name
        assert got.kept_indices == list(range(n))


def test_prompt_and_sentinel_positions_match(cases, processor):
    for name, (meta, _) in cases.items():
        n = len(meta["boxes_xyxy_original_pixels"])
        assert processor.build_prompt(meta["question"], n) == meta["prompt"], name
        ids = processor.tokenize(meta["prompt"])
        assert [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] == meta["image_sentinel_positions"]
        assert [i for i, t in enumerate(ids) if t == OBJECT_TOKEN_INDEX] == meta["object_sentinel_positions"]


def test_zero_box_case_uses_empty_object_string(cases, processed):
    zero = [name for name, (meta, _) in cases.items() if not meta["boxes_xyxy_original_pixels"]]
    assert zero, "the fixture has a 0-box case"
    for name in zero:
        assert cases[name][0]["prompt"].startswith("USER: <image>\n\n")
        assert processed[name]["gt_boxes"].shape == (1, 0, 4)
        assert OBJECT_TOKEN_INDEX not in processed[name]["input_ids"][0].tolist()


def test_decode_generated_ids(cases, processor):
    for name, (meta, tensors) in cases.items():
        gen = meta["generation"]
        assert processor.decode(tensors["generated_ids"]) == gen["decoded_skip_special_false_strip"], name
        assert processor.decode(gen["generated_ids"]) == gen["decoded_skip_special_false_strip"]
        # A trailing EOS (and padding after it, pad = eos here) is dropped.
        assert processor.decode(gen["generated_ids"] + [2, 2, 2]) == gen["decoded_skip_special_false_strip"]
    texts = processor.batch_decode(torch.stack([t["generated_ids"][0] for _, t in cases.values()]))
    assert texts == [m["generation"]["decoded_skip_special_false_strip"] for m, _ in cases.values()]


def test_decode_keeps_special_tokens_without_spaces(processor, tokenizer):
    ids = tokenizer.encode("a<ground>dog</ground><objects><obj1><obj12></objects>", add_special_tokens=False)
    assert processor.decode(ids + [tokenizer.eos_token_id]) == "a<ground>dog</ground><objects><obj1><obj12></objects>"
    assert processor.decode([IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX]) == "<image><objfeat>"
    with pytest.raises(ValueError):
        processor.decode(torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------ image maths
@pytest.mark.parametrize("size_in,size_out", [(256, 112), (768, 336), (300, 97), (64, 100)])
def test_reference_bilinear_matches_interpolate(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in, generator=torch.Generator().manual_seed(size_in)) * 2
    ref = F.interpolate(x, size=(size_out, size_out), mode="bilinear", align_corners=False, antialias=False)
    got = resize_bilinear_reference(x, size_out)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # Same maths; torch builds round the source index / blend differently (the fixture's build: plain
    # index, fused blend; this CPU build: fused index), so a weight may differ by 1 ulp.
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_image_inputs_agree(processor, mllm_golden, cases):
    meta = next(m for m, _ in cases.values() if "crop_xyxy" not in m["image"])
    path = mllm_golden / "inputs" / meta["image"]["file"]
    arr = case_image(mllm_golden, meta)
    from_path = processor.preprocess_image(path)
    from_pil = processor.preprocess_image(Image.fromarray(arr))
    from_arr = processor.preprocess_image(arr)
    gray = processor.preprocess_image(arr[:, :, 0])
    for a, b in zip(from_path[:2], from_pil[:2]):
        assert torch.equal(a, b)
    assert torch.equal(from_arr[1], from_pil[1]) and from_arr[2] == (arr.shape[1], arr.shape[0])
    assert gray[1].shape == from_arr[1].shape
    with pytest.raises(InvalidImageError):
        processor.preprocess_image(mllm_golden / "inputs" / "missing.jpg")
    with pytest.raises(InvalidImageError):
        processor.preprocess_image(torch.zeros(3, 8, 8))


def test_padding_colour_is_clip_mean(processor):
    # A 1-pixel-high black strip: the rest of the square canvas is the pad colour (122, 116, 104).
    aux = processor.preprocess_image(np.zeros((1, 64, 3), np.uint8))[1]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    corner = aux[0, :, 0, 0]
    assert torch.allclose(corner, (torch.tensor([122, 116, 104]) / 255 - mean) / std, atol=1e-6)


# ------------------------------------------------------------------------------------------ boxes
def test_boxes_to_canvas_general_sizes():
    rng = np.random.default_rng(0)
    for width, height, canvas in [(640, 426, 768), (301, 426, 256), (1000, 1000, 768), (7, 33, 256)]:
        boxes = rng.uniform(0, max(width, height), size=(9, 4))
        got = boxes_to_canvas(boxes, width, height, canvas)
        side = max(width, height)
        pad = np.array([(side - width) // 2, (side - height) // 2] * 2)
        direct = (boxes + pad) * canvas / side
        assert got.dtype == np.float32 and got.shape == (9, 4)
        np.testing.assert_allclose(got, direct, rtol=0, atol=4 * np.spacing(np.float32(canvas)))


def test_box_validation(processor):
    image = np.zeros((20, 30, 3), np.uint8)
    for bad in ([1, 2, 3, 4], [[1, 2, 3]], [[0, 0, float("nan"), 4]], [[0, 0, 1, float("inf")]], [[1, 2], [3, 4, 5, 6]]):
        with pytest.raises(ValueError):
            processor.process(image, "q", bad)
    for empty in (None, [], np.zeros((0, 4)), torch.zeros(0, 4)):
        assert processor.process(image, "q", empty)["gt_boxes"].shape == (1, 0, 4)
    as_tensor = processor.process(image, "q", torch.tensor([[1.0, 2.0, 10.0, 12.0]]))
    as_numpy = processor.process(image, "q", np.array([[1, 2, 10, 12]], np.int32))
    assert torch.equal(as_tensor["gt_boxes"], as_numpy["gt_boxes"])


def test_too_many_boxes(processor):
    image = np.zeros((50, 50, 3), np.uint8)
    boxes = [[i % 40, i % 30, i % 40 + 5, i % 30 + 5] for i in range(101)]
    with pytest.raises(TooManyBoxesError, match="101"):
        processor.process(image, "q", boxes)
    scores = np.linspace(0.1, 0.9, 101)[::-1].copy()
    scores[50] = 0.0  # the lowest score: this box is the one dropped
    out = processor.process(image, "q", boxes, scores=scores)
    assert out["gt_boxes"].shape == (1, 100, 4)
    assert out.kept_indices == [i for i in range(101) if i != 50]
    assert (out["input_ids"] == OBJECT_TOKEN_INDEX).sum() == 100
    with pytest.raises(ValueError):
        processor.process(image, "q", boxes, scores=scores[:5])


def test_select_boxes_keeps_original_order_and_respects_max():
    boxes = np.zeros((6, 4))
    kept = select_boxes(boxes, [0.1, 0.9, 0.5, 0.9, 0.2, 0.3], 3)
    assert kept.tolist() == [1, 2, 3]
    assert select_boxes(boxes, None, 6).tolist() == list(range(6))
    with pytest.raises(TooManyBoxesError):
        select_boxes(boxes, None, 5)


def test_smaller_max_objects_from_config(tokenizer):
    small = ChatRexProcessor(tokenizer, ProcessorConfig(112, 256, max_objects=2))
    with pytest.raises(TooManyBoxesError):
        small.process(np.zeros((8, 8, 3), np.uint8), "q", [[0, 0, 1, 1]] * 3)
    with pytest.raises(ConfigError):
        ProcessorConfig(112, 256, max_objects=101)
    with pytest.raises(ConfigError):
        ProcessorConfig(112, 256, chat_template="nope")


# ------------------------------------------------------------------------------------------ prompts
def test_question_image_tag_is_removed(processor):
    image = np.zeros((8, 8, 3), np.uint8)
    plain = processor.process(image, "what is this?", [[0, 0, 4, 4]])["input_ids"]
    tagged = processor.process(image, "<image>what is this?<objfeat>", [[0, 0, 4, 4]])["input_ids"]
    assert torch.equal(plain, tagged)


def test_history_puts_prefix_in_first_turn_only(processor):
    prompt = processor.build_prompt("and now?", 2, history=[("first q", "first a")])
    assert prompt == "USER: <image>\n<obj0><objfeat><obj1><objfeat>\nfirst q ASSISTANT: first a</s>USER: and now? ASSISTANT:"
    ids = processor.process(np.zeros((8, 8, 3), np.uint8), "and now?", [[0, 0, 1, 1]] * 2, history=[("q", "a")])["input_ids"]
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1 and (ids == OBJECT_TOKEN_INDEX).sum() == 2


def test_chatml_prompt(tokenizer):
    proc = ChatRexProcessor(tokenizer, ProcessorConfig(112, 256, chat_template="chatml"))
    assert proc.build_prompt("hi", 1) == "<|im_start|>user\n<image>\n<obj0><objfeat>\nhi<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------ tokens
def test_fixture_tokenizer_special_tokens_are_single_ids(tokenizer):
    assert ensure_special_tokens(tokenizer) == 0
    ids = [tokenizer.encode(tok, add_special_tokens=False) for tok in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert [i[0] for i in ids] == list(range(400, 504))


def test_ensure_special_tokens_on_a_base_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["a dog on a bed", "objects ground truth"], trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    base = len(tok)
    assert ensure_special_tokens(tok) == 104
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(base, base + 104))
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in SPECIAL_TOKENS)
    assert ensure_special_tokens(tok) == 0


# ------------------------------------------------------------------------------------------ batch
def test_batch_left_padding(processor, processed, cases, mllm_golden):
    names = sorted(cases, key=lambda n: -len(cases[n][0]["boxes_xyxy_original_pixels"]))
    long_name, short_name = names[0], names[-1]
    images = [case_image(mllm_golden, cases[n][0]) for n in (long_name, short_name)]
    batch = processor(images, [cases[n][0]["question"] for n in (long_name, short_name)],
                      [cases[n][0]["boxes_xyxy_original_pixels"] for n in (long_name, short_name)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    singles = [processed[n]["input_ids"][0] for n in (long_name, short_name)]
    length = max(len(s) for s in singles)
    assert ids.shape == (2, length) and mask.shape == (2, length)
    for row, single in enumerate(singles):
        pad = length - len(single)
        assert torch.equal(ids[row, pad:], single)
        assert (ids[row, :pad] == processor.pad_token_id).all()
        assert mask[row].tolist() == [0] * pad + [1] * len(single)
    n_long = len(cases[long_name][0]["boxes_xyxy_original_pixels"])
    n_short = len(cases[short_name][0]["boxes_xyxy_original_pixels"])
    assert batch["num_boxes"].tolist() == [n_long, n_short]
    assert batch["gt_boxes"].shape == (2, n_long, 4)
    assert torch.equal(batch["gt_boxes"][0], processed[long_name]["gt_boxes"][0])
    assert (batch["gt_boxes"][1, n_short:] == 0).all()
    assert torch.equal(batch["pixel_values_aux"][1], processed[short_name]["pixel_values_aux"][0])
    assert batch["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError):
        processor(images, ["only one question"])


def test_inputs_to_casts_only_floats(processed):
    moved = next(iter(processed.values())).to("cpu", dtype=torch.bfloat16)
    assert moved["pixel_values"].dtype == torch.bfloat16 and moved["input_ids"].dtype == torch.long
    assert moved.kept_indices == next(iter(processed.values())).kept_indices


# ------------------------------------------------------------------------------------------ persistence
def test_save_and_load_roundtrip(processor, tmp_path, cases):
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["high_res_size"] == processor.config.high_res_size
    loaded = ChatRexProcessor.from_pretrained(tmp_path, trust_remote_code=True, device_map="cpu")
    assert loaded.config == processor.config
    assert loaded.tokenizer.eos_token_id == processor.tokenizer.eos_token_id
    meta = next(iter(cases.values()))[0]
    assert loaded.tokenize(meta["prompt"]) == meta["input_ids"]
    with pytest.raises(ConfigError):
        ChatRexProcessor.from_pretrained(tmp_path / "nowhere")


def test_accepts_chatrex_config(tokenizer):
    from chatrex.model.configuration import ChatRexConfig

    config = ChatRexConfig.from_name("tiny")
    proc = ChatRexProcessor(tokenizer, config)
    assert (proc.config.low_res_size, proc.config.high_res_size) == (config.low_res_size, config.high_res_size)
    assert proc.config.num_image_tokens == config.num_image_tokens
    out = proc.process(np.zeros((10, 20, 3), np.uint8), "q")
    assert out["pixel_values"].shape == (1, 3, config.low_res_size, config.low_res_size)
    assert out["pixel_values_aux"].shape == (1, 3, config.high_res_size, config.high_res_size)


# ------------------------------------------------------------------------------------------ end to end
def test_processor_feeds_the_fixture_model(processor, cases, mllm_golden):
    """Our inputs through the fixture model reproduce the reference greedy ids, alone and left-padded in a batch."""
    from mllm_fixture import shared_fixture_model

    model = shared_fixture_model()
    names = list(cases)
    images = [case_image(mllm_golden, cases[n][0]) for n in names]
    questions = [cases[n][0]["question"] for n in names]
    boxes = [cases[n][0]["boxes_xyxy_original_pixels"] for n in names]
    expected = [cases[n][0]["generation"]["generated_ids"] for n in names]
    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
    with torch.no_grad():
        single = model.generate(**processor.process(images[0], questions[0], boxes[0]), **settings)
        batched = model.generate(**processor(images, questions, boxes), **settings)
    assert single[0].tolist() == expected[0]
    assert [row.tolist() for row in batched] == expected
    assert processor.batch_decode(batched) == [cases[n][0]["generation"]["decoded_skip_special_false_strip"] for n in names]
