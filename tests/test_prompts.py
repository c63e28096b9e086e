"""Prompts: canonical strings are the seed's exact text; paraphrase families are well-formed."""

from __future__ import annotations

import pytest

from chatrex import prompts


def test_canonical_strings_match_the_seed_readme():
    assert prompts.detection_prompt(["person", "pigeon"]) == (
        "Please detect person; pigeon in this image. Answer the question with object indexes."
    )
    assert prompts.detection_prompt("dog") == (
        "Please detect dog in this image. Answer the question with object indexes."
    )
    assert prompts.referring_prompt("the man in yellow shirt") == (
        "Please detect the man in yellow shirt in this image. Answer the question with object indexes."
    )
    assert prompts.region_prompt(3, "category") == (
        "What is the category name of <obj3>? Answer the question with its category name in free format."
    )
    assert prompts.region_prompt(0, "short") == (
        "Can you provide me with a short phrase to describe <obj0>? Answer the question with a short phrase."
    )
    assert prompts.region_prompt(7, "brief") == (
        "Can you provide me with a brief description of <obj7>? Answer the question with brief description."
    )
    assert prompts.region_prompt(1, "sentence") == (
        "Can you provide me with a one sentence of <obj1>? Answer the question with one sentence description."
    )
    # The seed's typo "breifly" is kept on purpose (the model was trained on it).
    assert prompts.caption_prompt() == (
        "Please breifly describe this image in one sentence and detect all the mentioned objects. "
        "Answer the question with grounded answer."
    )
    assert prompts.caption_prompt(detailed=True) == (
        "Please provide a detailed description of the image and detect all the mentioned objects. "
        "Answer the question with grounded object indexes."
    )
    q = "This is a photo of my room, and can you tell me what kind of person I am?  "
    assert prompts.conversation_prompt(q) == "Answer the question in grounded format. " + q
    assert prompts.conversation_prompt(prompts.conversation_prompt(q)) == prompts.conversation_prompt(q)


@pytest.mark.parametrize("name", sorted(prompts.PROMPT_FAMILIES))
def test_families_are_unique_and_have_placeholder_when_needed(name):
    family = prompts.PROMPT_FAMILIES[name]
    assert len(family) >= 8
    assert len(set(family)) == len(family), "duplicate paraphrases"
    needs_obj = not name.endswith("grounded_caption")
    for template in family:
        assert (prompts.PLACEHOLDER in template) == needs_obj, template
        rendered = prompts.render(template, "<obj2>") if needs_obj else prompts.render(template)
        assert prompts.PLACEHOLDER not in rendered


def test_first_entry_is_canonical():
    assert prompts.GROUNDING_PROMPTS[0] == prompts.DETECT
    assert prompts.REGION_CATEGORY_PROMPTS[0] == prompts.REGION_STYLES["category"]
    assert prompts.REGION_SHORT_PHRASE_PROMPTS[0] == prompts.REGION_STYLES["short"]
    assert prompts.REGION_BRIEF_PROMPTS[0] == prompts.REGION_STYLES["brief"]
    assert prompts.REGION_ONE_SENTENCE_PROMPTS[0] == prompts.REGION_STYLES["sentence"]
    assert prompts.BRIEF_GROUNDED_CAPTION_PROMPTS[0] == prompts.caption_prompt(False)
    assert prompts.DETAILED_GROUNDED_CAPTION_PROMPTS[0] == prompts.caption_prompt(True)


def test_render_and_join_errors():
    assert prompts.render("find [OBJ]", ["a", "b"]) == "find a; b"
    assert prompts.join_targets(" person ;pigeon; ") == "person; pigeon"
    with pytest.raises(ValueError, match="needs a value"):
        prompts.render(prompts.DETECT)
    with pytest.raises(ValueError, match="no \\[OBJ\\]"):
        prompts.render(prompts.BRIEF_GROUNDED_CAPTION, "dog")
    with pytest.raises(ValueError, match="no target"):
        prompts.detection_prompt(" ; ")
    with pytest.raises(ValueError, match="unknown region caption style"):
        prompts.region_prompt(0, "poem")
    with pytest.raises(ValueError):
        prompts.object_token(-1)
    with pytest.raises(ValueError):
        prompts.referring_prompt("  ")
