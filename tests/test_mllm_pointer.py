"""The optional pointer head (`ChatRexConfig.object_pointer`): what it adds to the logits, and that every
path that decodes (plain generate, the pipeline's cached prefix + KV cache, save / load) hands it the boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chatrex.errors import ConfigError
from tiny_models import build_tiny_tokenizer

BOXES = [[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 150.0, 100.0], [5.0, 60.0, 40.0, 110.0]]


def _model(strength: float = 0.0, seed: int = 0):
    from chatrex.model import ChatRexConfig, ChatRexForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    offset = int(tokenizer.convert_tokens_to_ids("<obj0>"))
    config = ChatRexConfig.from_name("tiny", object_pointer=True, object_token_offset=offset)
    torch.manual_seed(seed)
    model = ChatRexForConditionalGeneration(config).eval()
    if strength:  # a pointer strong enough to decide every token: the answer is made of <objK> tokens
        with torch.no_grad():
            model.object_pointer.weight.normal_(0.0, strength)
    return model, tokenizer, offset


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))


def test_pointer_adds_scores_on_the_object_token_columns_only(image):
    from chatrex.model.processing import ChatRexProcessor

    model, tokenizer, offset = _model()
    with torch.no_grad():
        model.object_pointer.weight.normal_(0.0, 0.5)
    processor = ChatRexProcessor(tokenizer, model.config)
    inputs = processor.process(image, "What is <obj1>?", BOXES)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (1, E, hidden); the LLM's last entry is already normed
        objects = model.encode_objects(model.encode_highres(inputs["pixel_values_aux"]), [inputs["gt_boxes"][0]])[0]
        plain = model.lm_head(hidden)
    memory = objects / objects.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    scores = (hidden @ model.object_pointer.weight.T) @ memory.T / hidden.shape[-1] ** 0.5  # (1, E, 3)
    delta = out.logits - plain
    torch.testing.assert_close(delta[..., offset:offset + 3], scores, atol=1e-4, rtol=1e-4)
    delta[..., offset:offset + 3] = 0
    assert float(delta.abs().max()) == 0.0  # nothing else moves, not even <obj3> (there are 3 boxes)
    assert float(scores.detach().abs().max()) > 0.1


def test_pointer_is_used_by_generate_the_pipeline_and_after_save_load(image, tmp_path):
    from chatrex.model.modeling import decode_answer
    from chatrex.model.processing import ChatRexProcessor
    from chatrex.pipeline import ChatRex

    model, tokenizer, offset = _model(strength=3.0)
    processor = ChatRexProcessor(tokenizer, model.config)
    inputs = processor.process(image, "Please detect dog in this image.", BOXES)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=processor.pad_token_id, output_scores=True, return_dict_in_generate=True)
        ids = out.sequences[0].tolist()
        # every decoding step (not only the first) saw the boxes: its logits equal one forward over the
        # whole sequence, where the boxes are in the call (a step without them would miss the pointer scores)
        whole = model(input_ids=torch.cat([inputs["input_ids"], out.sequences], 1), pixel_values=inputs["pixel_values"],
                      pixel_values_aux=inputs["pixel_values_aux"], gt_boxes=inputs["gt_boxes"]).logits[0, -6:-1]
    steps = torch.cat(out.scores)  # (5, V)
    torch.testing.assert_close(steps, whole, atol=1e-3, rtol=1e-3)
    assert any(offset <= t < offset + len(BOXES) for t in ids)  # the pointer decides some tokens
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    processor.save_pretrained(tmp_path)
    rex = ChatRex.from_pretrained(mllm=tmp_path, device="cpu", dtype="fp32", max_new_tokens=5)
    assert rex.model.config.object_pointer and rex.model.config.object_token_offset == offset
    torch.testing.assert_close(rex.model.object_pointer.weight, model.object_pointer.weight)
    first = rex.ask(image, "Please detect dog in this image.", boxes=BOXES)
    second = rex.ask(image, "Please detect dog in this image.", boxes=BOXES)  # cached prefix + KV cache
    assert first.raw == second.raw == decode_answer(tokenizer, ids)
    assert second.timing.cache_hit


def test_pointer_config_is_checked():
    from chatrex.model import ChatRexConfig, ChatRexForConditionalGeneration

    with pytest.raises(ConfigError, match="object_token_offset"):
        ChatRexConfig.from_name("tiny", object_pointer=True, object_token_offset=10**6)
    model = ChatRexForConditionalGeneration(ChatRexConfig.from_name("tiny", object_pointer=True)).eval()
    ids = torch.tensor([[1, 5, -300, 7]])
    with pytest.raises(ValueError, match="object_token_offset"):
        model(input_ids=ids, object_features=[torch.randn(1, model.config.hidden_size)])
    assert not hasattr(ChatRexForConditionalGeneration(ChatRexConfig.from_name("tiny")), "object_pointer")


def test_object_in_index_token_adds_the_box_to_question_and_answer_indices_only(image, tmp_path):
    """The question's "<obj1>" and a decoded "<obj2>" carry their boxes; the prefix's "<obj0>" .. (followed by
    their slots) do not; decoding steps and the pipeline's cached prefix agree with one full forward."""
    from chatrex.model import ChatRexConfig, ChatRexForConditionalGeneration
    from chatrex.model.modeling import decode_answer
    from chatrex.model.processing import ChatRexProcessor
    from chatrex.pipeline import ChatRex

    tokenizer = build_tiny_tokenizer()
    offset = int(tokenizer.convert_tokens_to_ids("<obj0>"))
    config = ChatRexConfig.from_name("tiny", object_in_index_token=True, object_pointer=True,
                                     object_token_offset=offset)
    torch.manual_seed(0)
    model = ChatRexForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.object_pointer.weight.normal_(0.0, 3.0)
    processor = ChatRexProcessor(tokenizer, config)
    question = "What is <obj1>? <obj2>"
    inputs = processor.process(image, question, BOXES)
    ids = inputs["input_ids"]
    with torch.no_grad():
        objects = model.encode_objects(model.encode_highres(inputs["pixel_values_aux"]), [inputs["gt_boxes"][0]])
        embeds = model.prepare_inputs_embeds(ids, None, model.encode_images(inputs["pixel_values"],
                                                                            inputs["pixel_values_aux"])[0], objects)[0]
        plain = model.get_input_embeddings()(ids.clamp(min=0))
    from chatrex.model.modeling import merged_slots

    start, _ = merged_slots(ids, model.config.num_image_tokens)
    row = ids[0].tolist()
    memory = objects[0] / objects[0].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    seen = 0
    for p, t in enumerate(row):
        if t < 0:
            continue
        got, want = embeds[0, start[0, p]], plain[0, p]
        question_index = offset <= t < offset + 3 and (p + 1 == len(row) or row[p + 1] != -300)
        if question_index:
            e = plain[0, p]
            want = e + memory[t - offset] * e.norm() / memory.shape[-1] ** 0.5
            seen += 1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert seen == 2  # "<obj1>" and "<obj2>" of the question; the three prefix indices are untouched
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=processor.pad_token_id, output_scores=True, return_dict_in_generate=True)
        whole = model(input_ids=torch.cat([ids, out.sequences], 1), pixel_values=inputs["pixel_values"],
                      pixel_values_aux=inputs["pixel_values_aux"], gt_boxes=inputs["gt_boxes"]).logits[0, -6:-1]
    assert any(offset <= t < offset + 3 for t in out.sequences[0].tolist())  # decoded indices were read back
    torch.testing.assert_close(torch.cat(out.scores), whole, atol=1e-3, rtol=1e-3)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    processor.save_pretrained(tmp_path)
    rex = ChatRex.from_pretrained(mllm=tmp_path, device="cpu", dtype="fp32", max_new_tokens=5)
    seen_embeds = []
    generate = rex.model.generate

    def spy(**kwargs):
        seen_embeds.append(kwargs["inputs_embeds"])
        return generate(**kwargs)

    rex.model.generate = spy
    first = rex.ask(image, question, boxes=BOXES)
    second = rex.ask(image, question, boxes=BOXES)
    assert first.raw == second.raw == decode_answer(tokenizer, out.sequences[0].tolist())
    # the pipeline's prompt (cached prefix + question tail) is the one prepare_inputs_embeds builds
    torch.testing.assert_close(seen_embeds[1], embeds, atol=1e-5, rtol=1e-5)


def test_forward_passes_the_merged_position_ids_of_left_padded_rows(image):
    """Padded rows count positions from their first real token (cumsum of the mask), with or without the
    pointer switches: the LLM must receive `prepare_inputs_embeds`' position ids, not its default arange."""
    from chatrex.model.processing import ChatRexProcessor

    model, tokenizer, _ = _model()
    processor = ChatRexProcessor(tokenizer, model.config)
    rows = [processor.process(image, q, BOXES)["input_ids"][0] for q in ("What is <obj1>?", "Is <obj0> red or blue?")]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), processor.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    inputs = processor.process(image, "x", BOXES)
    seen = {}
    llm_forward = model.model.forward

    def spy(*args, **kwargs):
        seen["position_ids"] = kwargs["position_ids"]
        return llm_forward(*args, **kwargs)

    model.model.forward = spy
    pixels = dict(pixel_values=inputs["pixel_values"].expand(2, -1, -1, -1),
                  pixel_values_aux=inputs["pixel_values_aux"].expand(2, -1, -1, -1),
                  gt_boxes=inputs["gt_boxes"].expand(2, -1, -1))
    with torch.no_grad():
        positions = model.multimodal_embeddings(ids, mask, None, **pixels)[2]
        model(input_ids=ids, attention_mask=mask, **pixels)
    assert torch.equal(seen["position_ids"], positions)
    assert int(positions[0, -1]) != int(positions[1, -1])  # the rows differ in length: positions do too
