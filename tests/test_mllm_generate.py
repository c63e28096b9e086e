"""Generation: fixture ids and step logits, seed-compatible text call, left-padded batches, cached
features, and save_pretrained -> from_pretrained round trips (Llama and Qwen2 LLMs)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from chatrex.model import IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX, ChatRexConfig, ChatRexForConditionalGeneration
from mllm_fixture import CASES, assert_close_rel, case_inputs, load_case, load_fixture_tokenizer, shared_fixture_model

GREEDY = dict(max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)


@pytest.fixture(scope="module")
def model(mllm_golden):
    return shared_fixture_model()


def left_pad_batch(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack single-prompt inputs the way the processor batches them: ids left padded, boxes padded + num_boxes."""
    length = max(r["input_ids"].shape[1] for r in rows)
    n_max = max(r["gt_boxes"].shape[1] if "gt_boxes" in r else 0 for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    boxes = torch.zeros(len(rows), n_max, 4)
    counts = []
    for b, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        ids[b, length - n :] = r["input_ids"][0]
        mask[b, length - n :] = 1
        k = r["gt_boxes"].shape[1] if "gt_boxes" in r else 0
        if k:
            boxes[b, :k] = r["gt_boxes"][0]
        counts.append(k)
    return dict(
        input_ids=ids, attention_mask=mask, gt_boxes=boxes, num_boxes=torch.tensor(counts),
        pixel_values=torch.cat([r["pixel_values"] for r in rows]),
        pixel_values_aux=torch.cat([r["pixel_values_aux"] for r in rows]),
    )


# ---------------------------------------------------------------------------------------------- fixture
@pytest.mark.parametrize("name", CASES)
def test_generate_matches_fixture(model, name):
    meta, t = load_case(name)
    out = model.generate(**case_inputs(t), **GREEDY, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, t["generated_ids"])  # new tokens only
    step_logits = torch.cat(out.logits)  # (12, vocab)
    assert_close_rel(step_logits, t["generation_step_logits"], f"{name}:generation_step_logits")
    plain = model.generate(**case_inputs(t), **GREEDY)
    assert plain.tolist() == [meta["generation"]["generated_ids"]]


@pytest.mark.parametrize("name", CASES)
def test_seed_compatible_call_returns_text(model, name):
    meta, t = load_case(name)
    tokenizer = load_fixture_tokenizer()
    text = model.generate(case_inputs(t), gen_config=GenerationConfig(max_new_tokens=12, do_sample=False), tokenizer=tokenizer)
    assert isinstance(text, str)
    assert text == meta["generation"]["decoded_skip_special_false_strip"]


def test_batched_left_padding_equals_one_by_one(model, mllm_golden):
    cases = [load_case(name) for name in CASES]  # 12, 3 and 0 boxes, three prompt lengths
    batch = left_pad_batch([case_inputs(t) for _, t in cases], pad_id=2)
    ids = model.generate(**batch, **GREEDY)
    for row, (_, t) in zip(ids, cases):
        assert torch.equal(row, t["generated_ids"][0])
    texts = model.generate(batch, gen_config=GenerationConfig(max_new_tokens=12, do_sample=False),
                           tokenizer=load_fixture_tokenizer())
    assert texts == [meta["generation"]["decoded_skip_special_false_strip"] for meta, _ in cases]
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    for b, (_, t) in enumerate(cases):
        assert_close_rel(logits[b], t["logits"][0, -1], f"batched last logits row {b}")


def test_precomputed_features_equal_pixel_path(model, mllm_golden):
    _, t = load_case("install_portrait_3boxes")
    inputs = case_inputs(t)
    with torch.no_grad():
        tokens, maps = model.encode_images(inputs["pixel_values"], inputs["pixel_values_aux"])
        objects = model.encode_objects(maps, [inputs["gt_boxes"][0]])
        cached = model(input_ids=inputs["input_ids"], image_features=tokens, object_features=objects).logits
        direct = model(**inputs).logits
    torch.testing.assert_close(cached, direct, rtol=0, atol=0)
    ids = model.generate(input_ids=inputs["input_ids"], image_features=tokens, object_features=objects, **GREEDY)
    assert torch.equal(ids, t["generated_ids"])


# ---------------------------------------------------------------------------------------------- random tiny models
def tiny_config(llm: str) -> ChatRexConfig:
    config = ChatRexConfig.from_name("tiny")
    if llm == "llama":
        return config
    text = config.to_dict()["text_config"]
    text.update(model_type="qwen2", tie_word_embeddings=True)
    return ChatRexConfig.from_name("tiny", text_config=text)


def random_prompt(n_boxes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 400, (6 + seed,), generator=g).tolist()
    ids = [1, *words[:3], IMAGE_TOKEN_INDEX]
    for k in range(n_boxes):
        ids += [400 + k, OBJECT_TOKEN_INDEX]
    ids += words[3:]
    xy = torch.rand(n_boxes, 2, generator=g) * 200
    wh = torch.rand(n_boxes, 2, generator=g) * 50 + 1
    inputs = dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.randn(1, 3, 112, 112, generator=g),
        pixel_values_aux=torch.randn(1, 3, 256, 256, generator=g),
    )
    if n_boxes:
        inputs["gt_boxes"] = torch.cat([xy, xy + wh], 1)[None]
    return inputs


def random_model(llm: str) -> ChatRexForConditionalGeneration:
    torch.manual_seed(0)
    model = ChatRexForConditionalGeneration(tiny_config(llm)).eval()
    with torch.no_grad():  # bigger layer-scales than the init so the ConvNeXt matters for the test
        for block in (m for m in model.modules() if m.__class__.__name__ == "ConvNextBlock"):
            block.ramma.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_save_pretrained_round_trip(llm, tmp_path):
    model = random_model(llm)
    assert type(model.model).__name__ == ("LlamaModel" if llm == "llama" else "Qwen2Model")
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == (llm == "qwen2")
    prompt = random_prompt(3, seed=1)
    expected = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for cls in (ChatRexForConditionalGeneration, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, ChatRexForConditionalGeneration)
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        got = loaded.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2)
        assert torch.equal(got, expected)


def test_random_llama_batch_equals_single():
    model = random_model("llama")
    prompts = [random_prompt(n, seed=s) for s, n in enumerate((2, 0, 5))]
    batch = left_pad_batch(prompts, pad_id=0)
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for b, prompt in enumerate(prompts):
            single = model(**prompt).logits[0, -1]
            torch.testing.assert_close(batched[b], single, rtol=1e-5, atol=1e-5)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    for b, prompt in enumerate(prompts):
        alone = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True, output_logits=True)
        for step_batched, step_alone in zip(out.logits, alone.logits):
            torch.testing.assert_close(step_batched[b], step_alone[0], rtol=1e-4, atol=1e-4)
