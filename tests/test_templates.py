"""Chat templates: single-turn prompts equal the reference strings; multi-turn rendering; errors."""

from __future__ import annotations

import json

import pytest

from chatrex.errors import ConfigError
from chatrex.model.processing import build_user_text
from chatrex.model.templates import TEMPLATES, ChatTemplate, apply_chat_template, get_template


def test_vicuna_single_turn():
    assert apply_chat_template("hello", "vicuna") == "USER: hello ASSISTANT:"
    assert apply_chat_template("hello") == "USER: hello ASSISTANT:"


def test_chatml_single_turn():
    assert apply_chat_template("hi\nthere", "chatml") == "<|im_start|>user\nhi\nthere<|im_end|>\n<|im_start|>assistant\n"


def test_custom_format_string_and_braces_in_text():
    assert apply_chat_template("q {x} }{", "Q: {input}\nA:") == "Q: q {x} }{\nA:"
    assert get_template("Q: {input}\nA:").name == "custom"
    assert apply_chat_template("{input}", "vicuna") == "USER: {input} ASSISTANT:"


def test_vicuna_multi_turn_uses_eos_between_turns():
    history = [("q1", "a1"), ("q2", "a2")]
    assert apply_chat_template("q3", "vicuna", history=history) == (
        "USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>USER: q3 ASSISTANT:"
    )
    assert apply_chat_template("q2", "vicuna", history=[("q1", "a1")], eos_text="<|endoftext|>") == (
        "USER: q1 ASSISTANT: a1<|endoftext|>USER: q2 ASSISTANT:"
    )


def test_chatml_multi_turn():
    assert apply_chat_template("q2", "chatml", history=[("q1", "a1")]) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_custom_multi_turn_separates_answer():
    assert apply_chat_template("q2", "Q: {input} A:", history=[("q1", "a1")]) == "Q: q1 A: a1</s>Q: q2 A:"
    assert apply_chat_template("q2", "Q: {input} A: ", history=[("q1", "a1")]) == "Q: q1 A: a1</s>Q: q2 A: "


def test_errors():
    with pytest.raises(ConfigError):
        apply_chat_template("x", "llama3")
    with pytest.raises(ConfigError):
        get_template(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ChatTemplate("broken", "no slot here")
    for bad in (["just a string"], [("q",)], [("q", None)]):
        with pytest.raises(ValueError):
            apply_chat_template("x", "vicuna", history=bad)


def test_presets_are_named():
    assert set(TEMPLATES) == {"vicuna", "chatml"}
    assert get_template(TEMPLATES["chatml"]) is TEMPLATES["chatml"]


def test_user_text_layout():
    assert build_user_text("What?", 0) == "<image>\n\nWhat?"
    assert build_user_text("What <image>is<image> it?", 2) == "<image>\n<obj0><objfeat><obj1><objfeat>\nWhat is it?"


def test_fixture_prompts(mllm_golden):
    index = json.loads((mllm_golden / "cases" / "index.json").read_text())["cases"]
    for name in index:
        meta = json.loads((mllm_golden / "cases" / f"{name}.json").read_text())
        user = build_user_text(meta["question"], len(meta["boxes_xyxy_original_pixels"]))
        assert apply_chat_template(user, "vicuna") == meta["prompt"], name


def test_build_prompt_single_and_multi_turn():
    from chatrex.model.templates import build_prompt

    assert build_prompt("Is it a dog?", 1) == "USER: <image>\n<obj0><objfeat>\nIs it a dog? ASSISTANT:"
    assert build_prompt("q2<image>", 0, "chatml", history=[("q1", "a1")], eos_text="<|endoftext|>") == (
        "<|im_start|>user\n<image>\n\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError):
        build_prompt(None, 0)  # type: ignore[arg-type]
