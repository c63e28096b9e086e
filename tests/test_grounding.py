"""Answer-grammar parser: literal strings for every odd case, a fuzz loop, and render round trips."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from chatrex.grounding import (
    GroundedAnswer,
    GroundedSpan,
    answer_indices,
    parse_answer,
    phrase_indices,
    render_answer,
    render_span,
)

BOXES = [[0.0, 0.0, 10.0, 10.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 6.0, 6.0]]


def spans(answer: GroundedAnswer) -> list[tuple[str, list[int]]]:
    return [(s.phrase, s.indices) for s in answer.spans]


def check_offsets(answer: GroundedAnswer) -> None:
    for s in answer.spans:
        assert answer.text[s.start : s.end] == s.phrase
    starts = [s.start for s in answer.spans]
    assert starts == sorted(starts)


def test_readme_detection_output_two_lines():
    raw = "<ground>person</ground><objects><obj0><obj1><obj2></objects>\n<ground>pigeon</ground><objects><obj3><obj4></objects>"
    a = parse_answer(raw)
    assert a.raw == raw
    assert a.text == "person\npigeon"
    assert spans(a) == [("person", [0, 1, 2]), ("pigeon", [3, 4])]
    assert a.problems == [] and all(s.boxes is None for s in a.spans)
    check_offsets(a)


def test_region_caption_and_boxes():
    a = parse_answer("<ground>A brown dog is lying on a bed, appearing relaxed and comfortable</ground><objects><obj0></objects>", BOXES)
    assert a.text == "A brown dog is lying on a bed, appearing relaxed and comfortable"
    assert a.spans[0].indices == [0] and a.spans[0].boxes == [BOXES[0]]
    assert (a.spans[0].start, a.spans[0].end) == (0, len(a.text))
    assert a.problems == []


def test_mid_word_span_and_punctuation_inside_phrase():
    raw = "A man in <ground>sneaker</ground><objects><obj0></objects>s sits on a <ground>plaid couch,</ground><objects><obj2></objects> reading."
    a = parse_answer(raw)
    assert a.text == "A man in sneakers sits on a plaid couch, reading."
    assert spans(a) == [("sneaker", [0]), ("plaid couch,", [2])]
    check_offsets(a)
    assert render_answer(a.spans, a.text) == raw


def test_free_object_mention_is_kept():
    raw = "<obj0> shows a brown dog lying on a bed. The dog is resting comfortably, possibly sleeping, and is positioned on the left side of the bed"
    a = parse_answer(raw, BOXES)
    assert a.text == raw and a.spans == [] and a.problems == []
    assert answer_indices(a) == set() and answer_indices(a, include_mentions=True) == {0}
    assert parse_answer("<obj7> is here", BOXES).problems  # free mention out of range is reported


def test_counting_sentence_and_duplicates():
    a = parse_answer("There are 3 <ground>dogs</ground><objects><obj6><obj2><obj6><obj9></objects> in the park.")
    assert a.text == "There are 3 dogs in the park."
    assert spans(a) == [("dogs", [6, 2, 9])]
    check_offsets(a)


def test_repeated_phrase_gives_one_span_each():
    a = parse_answer("<ground>dog</ground><objects><obj0></objects> and <ground>dog</ground><objects><obj1></objects>")
    assert spans(a) == [("dog", [0]), ("dog", [1])]
    assert phrase_indices(a) == {"dog": [0, 1]}
    assert a.text == "dog and dog" and a.spans[1].start == 8


def test_multiple_lines_inside_and_between():
    a = parse_answer("Intro\n<ground>a tall\nman</ground>\n  <objects>\n<obj1>\n<obj2></objects>\nEnd")
    assert spans(a) == [("a tall\nman", [1, 2])]
    assert a.text == "Intro\na tall\nman\nEnd"
    assert a.problems == []
    check_offsets(a)


def test_out_of_range_indices():
    a = parse_answer("<ground>cat</ground><objects><obj1><obj5></objects>", BOXES)
    assert a.spans[0].indices == [1, 5]
    assert a.spans[0].boxes == [BOXES[1]]
    assert any("obj5" in p for p in a.problems)
    assert parse_answer("<ground>cat</ground><objects><obj5></objects>", np.array(BOXES)).spans[0].boxes == []
    assert parse_answer("<ground>cat</ground><objects><obj2></objects>", torch.tensor(BOXES)).spans[0].boxes == [BOXES[2]]


def test_paper_shorthand_and_spaced_form():
    a = parse_answer("<g>dog</g><o><obj1></o> and <g>cat</g> <o><obj2></o>")
    assert spans(a) == [("dog", [1]), ("cat", [2])] and a.text == "dog and cat" and a.problems == []
    b = parse_answer("<ground> dog </ground> <objects> <obj1> </objects> runs to the <ground> red ball </ground> <objects> <obj0> <obj2> </objects>")
    assert spans(b) == [("dog", [1]), ("red ball", [0, 2])]
    assert b.text == "dog runs to the red ball" and b.problems == []
    check_offsets(b)
    c = parse_answer("A<ground> dog</ground><objects><obj0></objects>")
    assert c.text == "A dog"
    check_offsets(c)


def test_unclosed_tags():
    a = parse_answer("Look: <ground>dog")
    assert a.spans == [] and a.text == "Look: dog" and any("unclosed <ground>" in p for p in a.problems)
    b = parse_answer("<ground>dog</ground><objects><obj1><obj2>")
    assert spans(b) == [("dog", [1, 2])] and any("unclosed <objects>" in p for p in b.problems)
    c = parse_answer("<ground>dog</ground><objects><obj1> and a cat")
    assert spans(c) == [("dog", [1])] and c.text == "dog and a cat" and c.problems
    d = parse_answer("<ground>dog</ground> is happy")
    assert spans(d) == [("dog", [])] and d.text == "dog is happy"
    assert any("no <objects>" in p for p in d.problems)
    e = parse_answer("<ground>dog<objects><obj3></objects>")
    assert spans(e) == [("dog", [3])] and e.problems


def test_nested_and_stray_tags():
    a = parse_answer("<ground>big <ground>dog</ground><objects><obj1></objects>")
    assert spans(a) == [("dog", [1])] and a.text == "big dog" and a.problems
    check_offsets(a)
    b = parse_answer("text</ground> more</objects> end")
    assert b.spans == [] and b.text == "text more end" and len(b.problems) == 2
    c = parse_answer("<objects><obj1></objects>orphan")
    assert c.spans == [] and c.text == "orphan" and c.problems


def test_empty_lists_and_unknown_tags():
    a = parse_answer("<ground>cat</ground><objects></objects>")
    assert spans(a) == [("cat", [])] and any("no object indices" in p for p in a.problems)
    b = parse_answer("a <foo> b</s>")
    assert b.text == "a <foo> b" and len(b.problems) == 2
    c = parse_answer("<ground></ground><objects><obj0></objects>")
    assert spans(c) == [("", [0])] and c.problems


def test_empty_and_none_like_inputs():
    for value in ("", "   ", "\n\n", None):
        a = parse_answer(value)  # type: ignore[arg-type]
        assert a.text == "" and a.spans == []
    assert parse_answer(b"<ground>x</ground><objects><obj0></objects>").spans[0].phrase == "x"  # type: ignore[arg-type]


def test_to_dict_is_json_ready():
    a = parse_answer("<ground>dog</ground><objects><obj0></objects>", BOXES)
    data = json.loads(json.dumps(a.to_dict()))
    assert data["spans"][0] == {"phrase": "dog", "indices": [0], "start": 0, "end": 3, "boxes": [BOXES[0]]}
    assert set(data) == {"raw", "text", "spans", "problems"}
    with pytest.raises(Exception):
        a.spans[0].phrase = "cat"  # type: ignore[misc]  (frozen)


def test_render_helpers():
    assert render_span("dog", [0, 3]) == "<ground>dog</ground><objects><obj0><obj3></objects>"
    assert render_answer([("person", [0]), ("pigeon", [1, 2])]) == (
        "<ground>person</ground><objects><obj0></objects>\n<ground>pigeon</ground><objects><obj1><obj2></objects>"
    )
    assert render_answer([{"phrase": "a", "indices": [1]}], sep="") == "<ground>a</ground><objects><obj1></objects>"
    with pytest.raises(ValueError):
        render_span("x", [100])
    with pytest.raises(ValueError):
        render_answer([GroundedSpan("dog", [0], 0, 3)], text="cat")


def test_answer_indices_on_strings():
    assert answer_indices("<ground>a</ground><objects><obj3><obj1></objects> <obj9>") == {1, 3}
    assert answer_indices("<ground>a</ground><objects><obj3></objects> <obj9>", include_mentions=True) == {3, 9}


ALPHABET = ["<ground>", "</ground>", "<objects>", "</objects>", "<g>", "</g>", "<o>", "</o>", "<obj", ">", "<", "/",
            "<obj1>", "<obj42>", "<obj99999999999999999999>", "</s>", "<|im_end|>", " ", "\n", "dog", "é", "🙂", "\x00", "a,b"]


def test_fuzz_never_raises_and_offsets_hold():
    rng = random.Random(1234)
    for trial in range(1500):
        n = rng.randint(0, 40)
        if trial % 3 == 0:
            text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(n))
        else:
            text = "".join(rng.choice(ALPHABET) for _ in range(n))
        boxes = BOXES if trial % 2 else None
        a = parse_answer(text, boxes)
        assert isinstance(a, GroundedAnswer) and a.raw == text
        assert not any(p.startswith("internal parser error") for p in a.problems), (text, a.problems)
        check_offsets(a)
        for s in a.spans:
            assert s.phrase == s.phrase.strip()
            assert len(set(s.indices)) == len(s.indices)
            assert (s.boxes is None) == (boxes is None)
        for tag in ("<ground>", "</ground>", "<objects>", "</objects>"):
            assert tag not in a.text
        json.dumps(a.to_dict())


def test_huge_input_is_linear_enough():
    raw = "<ground>dog</ground><objects><obj1></objects> and " * 20000 + "<ground>" * 5000
    a = parse_answer(raw, BOXES)
    assert len(a.spans) == 20000 and a.spans[-1].indices == [1]
    check_offsets(a)


def test_round_trip_of_generated_answers():
    rng = random.Random(7)
    words = ["a dog", "the red, ball", "sneaker", "two\ncats", "x"]
    for _ in range(200):
        pieces, expected = [], []
        for _ in range(rng.randint(0, 5)):
            pieces.append(rng.choice(["", " ", "There are 2 ", "s ", ".\n"]))
            phrase = rng.choice(words)
            indices = rng.sample(range(100), rng.randint(1, 4))
            pieces.append(render_span(phrase, indices))
            expected.append((phrase, indices))
        raw = "".join(pieces).strip()
        a = parse_answer(raw)
        assert spans(a) == expected and a.problems == []
        assert render_answer(a.spans, a.text) == raw
