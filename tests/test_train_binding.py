"""Binding aids of the ChatRex trainer (`chatrex.train.binding`): attention targets in merged positions,
the supervision loss, orthogonal attention init, and the trainer switches that use them."""

from __future__ import annotations

import io
import json

import pytest
import torch

from chatrex.model.constants import IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX
from chatrex.train import chatrex_trainer as T
from chatrex.train.binding import attention_supervision_loss, binding_attention_targets, object_token_ids
from chatrex.train.tokenizer import prompt_corpus, train_tokenizer
from test_train_chatrex import SMALL  # the trainer tests' smallest model

torch.set_num_threads(1)

TWO_LAYERS = {**SMALL, "text_config": {**SMALL["text_config"], "num_hidden_layers": 2}}  # layer 1 is supervised


def config(**changes) -> T.ChatRexTrainConfig:
    base = dict(model="tiny", model_overrides=TWO_LAYERS, tokenizer_scenes=3, tokenizer_vocab_size=300,
                stages=({"stage": 2, "steps": 3, "lr": 2e-3},), questions_per_image=4, warmup=1, ckpt_every=0,
                log_every=1000, seed=5, task_weights={"detect": 1.0, "detect_multi": 1.0})
    base.update(changes)
    return T.ChatRexTrainConfig(**base)


@pytest.fixture(scope="module")
def setup():
    from chatrex.model.processing import ChatRexProcessor

    tokenizer = train_tokenizer(prompt_corpus(), 300)
    cfg = config(attention_supervision=1.0, attention_init="orth")
    model = T.build_model(cfg, tokenizer)
    processor = ChatRexProcessor(tokenizer, model.config)
    batch = T.encode_samples(processor, T.scene_samples(cfg, 0, 0))
    return cfg, model, processor, batch


def _merged_ids(input_ids: torch.Tensor, image_tokens: int) -> list[list[int]]:
    """The merged sequence as ids (image slots = -200), left padded with -1, built independently of the model."""
    rows = []
    for row in input_ids.tolist():
        out = []
        for t in row:
            out += [t] * (image_tokens if t == IMAGE_TOKEN_INDEX else 1)
        rows.append(out)
    width = max(len(r) for r in rows)
    return [[-1] * (width - len(r)) + r for r in rows]


def test_targets_point_at_index_tokens_and_at_the_named_slots(setup):
    _, model, processor, batch = setup
    with torch.no_grad():
        image_tokens = model.encode_images(batch["pixel_values"], batch["pixel_values_aux"])[0].shape[1]
    object_ids = object_token_ids(processor.tokenizer)
    targets = binding_attention_targets(batch["input_ids"], batch["labels"], image_tokens, object_ids)
    merged = _merged_ids(batch["input_ids"], image_tokens)
    # every object slot looks one back, at the <objK> token of its own index
    assert len(targets["previous"]) == int((batch["input_ids"] == OBJECT_TOKEN_INDEX).sum())
    for b, q, k in targets["previous"].tolist():
        assert merged[b][q] == OBJECT_TOKEN_INDEX and k == q - 1
        slots = [i for i, t in enumerate(merged[b]) if t == OBJECT_TOKEN_INDEX]
        assert merged[b][k] == object_ids[slots.index(q)]
    # every answer position whose next token is <objK> looks at slot K of its row
    named = [(b, p) for b, row in enumerate(batch["labels"].tolist()) for p, t in enumerate(row) if t in object_ids]
    assert len(named) > 0 and len(targets["match"]) == len(named)
    for b, q, k in targets["match"].tolist():
        slots = [i for i, t in enumerate(merged[b]) if t == OBJECT_TOKEN_INDEX]
        assert merged[b][k] == OBJECT_TOKEN_INDEX
        assert merged[b][q + 1] == object_ids[slots.index(k)]


def test_supervision_adds_a_positive_loss_that_trains_the_first_two_layers(setup):
    _, model, processor, batch = setup
    assert model.config.text_config._attn_implementation == "eager"
    plain = T.batch_loss(model, batch)
    model.zero_grad(set_to_none=True)
    total = T.batch_loss(model, batch, binding=(1.0, object_token_ids(processor.tokenizer)))
    assert total.item() > plain.item()
    total.backward()
    for layer in (0, 1):
        assert model.model.layers[layer].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_supervision_loss_is_minus_log_of_the_target_probabilities():
    attn = [torch.full((1, 2, 3, 3), 1 / 3), torch.zeros(1, 2, 3, 3)]
    attn[1][0, 0, 2, 1] = 0.5
    targets = {"previous": torch.tensor([[0, 1, 0]]), "match": torch.tensor([[0, 2, 1]])}
    loss = attention_supervision_loss(attn, targets)
    assert loss.item() == pytest.approx(-torch.tensor(1 / 3).log().item() - torch.tensor(0.5).log().item(), rel=1e-6)
    empty = {"previous": torch.zeros(0, 3, dtype=torch.long), "match": torch.zeros(0, 3, dtype=torch.long)}
    assert attention_supervision_loss(attn, empty).item() == 0.0


def test_supervision_still_pulls_a_target_the_head_starts_far_from():
    """A layer-0 head under the match init put p ~ 1e-9 on detection phrases: the loss must still give the
    target's score the softmax gradient -(1 - p) (a clamp at 1e-6 had made it a constant, and it never learned)."""
    scores = torch.zeros(1, 1, 2, 4)
    scores[0, 0, 1, 3] = 25.0  # the query attends to key 3; key 0 is the target, p = e^-25 ~ 1e-11
    scores.requires_grad_(True)
    attn = scores.softmax(-1)
    targets = {"previous": torch.zeros(0, 3, dtype=torch.long), "match": torch.tensor([[0, 1, 0]])}
    attention_supervision_loss([attn, attn], targets, layers=(0, 1)).backward()
    assert scores.grad[0, 0, 1, 0].item() == pytest.approx(-1.0, abs=1e-6)
    assert scores.grad[0, 0, 1, 3].item() == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_init_and_export_keep_the_default_attention(setup, tmp_path):
    _, model, processor, _ = setup
    v = model.model.layers[0].self_attn.v_proj.weight  # (kv width, hidden): orthonormal rows
    torch.testing.assert_close(v @ v.T, torch.eye(v.shape[0]), atol=1e-5, rtol=0)
    T.export_model(model, processor, tmp_path / "m")
    assert "eager" not in json.dumps(json.loads((tmp_path / "m" / "config.json").read_text()))


def test_training_with_the_binding_switches_runs_and_validates(tmp_path):
    result = T.train_chatrex(config(attention_supervision=0.5, attention_init="orth"), tmp_path, stream=io.StringIO())
    assert len(result["history"]) == 3 and all(torch.isfinite(torch.tensor(result["history"])))
    with pytest.raises(Exception, match="attention_init"):
        config(attention_init="xavier").validate()
    with pytest.raises(Exception, match="attention_supervision"):
        config(attention_supervision=-1.0).validate()


def test_gather_targets_point_from_each_named_index_to_its_grounded_phrase(setup):
    _, model, processor, batch = setup
    with torch.no_grad():
        image_tokens = model.encode_images(batch["pixel_values"], batch["pixel_values_aux"])[0].shape[1]
    tok = processor.tokenizer
    ground = tuple(tok.convert_tokens_to_ids(["<ground>", "</ground>"]))
    object_ids = object_token_ids(tok)
    targets = binding_attention_targets(batch["input_ids"], batch["labels"], image_tokens, object_ids, ground)
    merged = _merged_ids(batch["input_ids"], image_tokens)
    gather = targets["gather"].tolist()
    assert len(gather) > 0
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for b, q, k, g in gather:
        groups.setdefault(g, []).append((b, q, k))
    assert sorted(groups) == list(range(len(groups)))  # groups are numbered 0..n-1
    assert len(groups) == len(targets["match"])  # every detection answer here has a phrase before its indices
    for members in groups.values():
        (b, q), keys = members[0][:2], [k for _, _, k in members]
        assert all((m[0], m[1]) == (b, q) for m in members)
        assert merged[b][q + 1] in object_ids
        # the keys are exactly the tokens strictly between the last <ground> and </ground> before q
        end = max(i for i in range(q + 1) if merged[b][i] == ground[1])
        begin = max(i for i in range(end) if merged[b][i] == ground[0])
        assert keys == list(range(begin + 1, end))
    # the phrase is the category the question asked: decode one
    b, q, _ = groups[0][0]
    words = tok.decode([merged[b][k] for _, _, k in groups[0]])
    assert words.strip() and words.strip() in tok.decode(batch["input_ids"][b][batch["labels"][b] < 0].clamp(min=0))


def test_gather_loss_is_minus_log_of_the_attention_on_the_whole_phrase():
    attn = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)]
    attn[0][0, 0, 3, 1], attn[0][0, 0, 3, 2] = 0.2, 0.3  # query 3 puts 0.5 on its phrase (keys 1, 2)
    attn[1][0, 0, 3, 0] = 0.25
    targets = {"gather": torch.tensor([[0, 3, 1, 0], [0, 3, 2, 0]]), "match": torch.tensor([[0, 3, 0]]),
               "previous": torch.tensor([[0, 1, 0]])}  # ignored when "gather" is given
    loss = attention_supervision_loss(attn, targets)
    assert loss.item() == pytest.approx(-torch.tensor(0.5).log().item() - torch.tensor(0.25).log().item(), rel=1e-6)


def test_copy_and_match_inits_make_heads_copiers_and_content_matchers():
    from chatrex.train.binding import copy_attention_init, match_attention_init

    cfg = config(model_overrides={**TWO_LAYERS, "text_config": {**TWO_LAYERS["text_config"],
                                                                "num_attention_heads": 4, "num_key_value_heads": 2}})
    model = T.build_model(cfg, train_tokenizer(prompt_corpus(), 300))
    copy_attention_init(model)
    attn = model.model.layers[1].self_attn
    hd = attn.head_dim
    for h in range(4):  # head h reads kv head h // 2; its value -> output map is V^T V / 2, symmetric PSD
        v = attn.v_proj.weight[(h // 2) * hd:(h // 2 + 1) * hd]
        ov = attn.o_proj.weight[:, h * hd:(h + 1) * hd] @ v
        torch.testing.assert_close(ov, v.T @ v / 2, atol=1e-6, rtol=0)
        assert torch.linalg.eigvalsh(ov).min() > -1e-5
    match_attention_init(model, gain=3.0)
    for h in range(4):
        k = attn.k_proj.weight[(h // 2) * hd:(h // 2 + 1) * hd]
        torch.testing.assert_close(attn.q_proj.weight[h * hd:(h + 1) * hd], 3.0 * k)
    config(attention_init="match").validate()
    config(attention_init="copy").validate()


def test_supervised_init_shapes_only_the_two_supervised_heads():
    text = {**TWO_LAYERS["text_config"], "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    overrides = {**TWO_LAYERS, "text_config": text}
    tokenizer = train_tokenizer(prompt_corpus(), 300)
    plain = T.build_model(config(model_overrides=overrides), tokenizer)
    shaped = T.build_model(config(model_overrides=overrides, attention_init="supervised",
                                  attention_supervision=1.0, attention_supervision_layers=(0, 2)), tokenizer)
    hd = plain.model.layers[0].self_attn.head_dim
    for index in range(3):
        a, b = plain.model.layers[index].self_attn, shaped.model.layers[index].self_attn
        if index == 1:  # not supervised: the default init, untouched
            assert all(torch.equal(getattr(a, n).weight, getattr(b, n).weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            continue
        v = b.v_proj.weight[:hd]
        torch.testing.assert_close(v @ v.T, torch.eye(hd), atol=1e-5, rtol=0)  # orthonormal rows
        torch.testing.assert_close(b.o_proj.weight[:, :hd], v.T)  # head 0 copies what it attends to
        torch.testing.assert_close(b.o_proj.weight[:, hd:], a.o_proj.weight[:, hd:])  # other heads: default
        torch.testing.assert_close(b.v_proj.weight[hd:], a.v_proj.weight[hd:])
        if index == 2:  # the match layer: head 0 matches content
            torch.testing.assert_close(b.q_proj.weight[:hd], 4.0 * b.k_proj.weight[:hd])
        else:
            assert torch.equal(a.q_proj.weight, b.q_proj.weight) and torch.equal(a.k_proj.weight, b.k_proj.weight)


def _region_batch(setup):
    """A region-category batch of the setup's model: (batch, image tokens, (<ground>, </ground>) ids, <objK> ids)."""
    _, model, processor, _ = setup
    batch = T.encode_samples(processor, T.scene_samples(config(task_weights={"region_category": 1.0}), 0, 0))
    with torch.no_grad():
        image_tokens = model.encode_images(batch["pixel_values"], batch["pixel_values_aux"])[0].shape[1]
    tok = processor.tokenizer
    return batch, image_tokens, tuple(tok.convert_tokens_to_ids(["<ground>", "</ground>"])), object_token_ids(tok)


def test_region_answers_read_the_named_slot_and_gather_the_question_index(setup):
    batch, image_tokens, ground, object_ids = _region_batch(setup)
    targets = binding_attention_targets(batch["input_ids"], batch["labels"], image_tokens, object_ids, ground)
    merged = _merged_ids(batch["input_ids"], image_tokens)
    slot_of = {}  # (row, merged slot position) -> box index
    for b, row in enumerate(merged):
        slots = [i for i, t in enumerate(row) if t == OBJECT_TOKEN_INDEX]
        slot_of.update({(b, s): k for k, s in enumerate(slots)})
    gathered: dict[tuple[int, int], list[int]] = {}
    for b, q, key, _ in targets["gather"].tolist():
        gathered.setdefault((b, q), []).append(key)
    phrase_rows = 0
    for b, q, key in targets["match"].tolist():
        if merged[b][q + 1] in object_ids:  # the <objK> after the phrase: gathers the phrase (tested above)
            continue
        (named,) = gathered[(b, q)]  # a position that predicts the phrase gathers one token: the question's <objK>
        k = slot_of[(b, key)]
        assert merged[b][named] == object_ids[k] and merged[b][named + 1] != OBJECT_TOKEN_INDEX
        answer = merged[b][q + 1:]
        assert ground[1] in answer and answer[answer.index(ground[1]) + 2] == object_ids[k]  # the answer names K
        phrase_rows += merged[b][q] == ground[0]
    assert phrase_rows == batch["input_ids"].shape[0]  # one region answer per row, each supervised
    # region=False (models with object_in_index_token): only the answer's own <objK> keeps its targets
    plain = binding_attention_targets(batch["input_ids"], batch["labels"], image_tokens, object_ids, ground,
                                      region=False)
    kept = {(b, q) for b, q, _ in plain["match"].tolist()}
    assert kept and all(merged[b][q + 1] in object_ids for b, q in kept)
    assert len(plain["match"]) < len(targets["match"]) and len(plain["gather"]) < len(targets["gather"])


def test_supervised_layers_are_a_switch_checked_against_the_llm_depth():
    attn = [torch.full((1, 1, 3, 3), 1 / 3), torch.full((1, 1, 3, 3), 1 / 3), torch.zeros(1, 1, 3, 3)]
    attn[2][0, 0, 2, 1] = 0.5
    targets = {"previous": torch.tensor([[0, 1, 0]]), "match": torch.tensor([[0, 2, 1]])}
    loss = attention_supervision_loss(attn, targets, layers=(0, 2))  # "match" read from layer 2
    assert loss.item() == pytest.approx(-torch.tensor(1 / 3).log().item() - torch.tensor(0.5).log().item(), rel=1e-6)
    with pytest.raises(Exception, match="attention_supervision_layers"):
        config(attention_supervision_layers=(0,)).validate()
    with pytest.raises(Exception, match="below the LLM's 2"):
        T.build_model(config(attention_supervision=1.0, attention_supervision_layers=(0, 2)),
                      train_tokenizer(prompt_corpus(), 300))


def test_remaining_targets_group_an_index_with_the_later_ones_of_its_list(setup):
    """A content matcher cannot tell two boxes of one category apart: the position that predicts the first
    index of `<obj2><obj5>` is pointed at both slots (one group), the one before `<obj5>` at slot 5 only."""
    cfg, model, processor, _ = setup
    object_ids = object_token_ids(processor.tokenizer)
    for step in range(50):  # the first step whose rows answer with a list of several indices
        batch = T.encode_samples(processor, T.scene_samples(cfg, step, 0))
        labels = batch["labels"]
        if bool((torch.isin(labels[:, 1:], torch.tensor(object_ids))
                 & torch.isin(labels[:, :-1], torch.tensor(object_ids))).any()):
            break
    with torch.no_grad():
        image_tokens = model.encode_images(batch["pixel_values"], batch["pixel_values_aux"])[0].shape[1]
    targets = binding_attention_targets(batch["input_ids"], batch["labels"], image_tokens, object_ids)
    merged = _merged_ids(batch["input_ids"], image_tokens)
    groups: dict[int, set[int]] = {}
    for b, q, k, g in targets["remaining"].tolist():
        groups.setdefault(g, set()).add(k)
    assert len(groups) == len(targets["match"])  # one group per position that predicts an index
    multi = 0
    for (b, q, k), keys in zip(targets["match"].tolist(), (groups[g] for g in sorted(groups))):
        assert k in keys  # the group holds the match target itself ...
        answer, j = [], q + 1  # ... and the slots of the indices after it in the same list
        while merged[b][j] in object_ids:
            answer.append(object_ids.index(merged[b][j]))
            j += 1
        slots = [i for i, t in enumerate(merged[b]) if t == OBJECT_TOKEN_INDEX]
        assert keys == {slots[i] for i in answer}
        multi += len(keys) > 1
    assert multi > 0  # the batch (detect_multi rows) has lists of several indices
    attn = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)]
    attn[1][0, 0, 3, 0], attn[1][0, 0, 3, 1] = 0.25, 0.5
    loss = attention_supervision_loss(attn, {"previous": torch.zeros(0, 3, dtype=torch.long),
                                             "match": torch.tensor([[0, 3, 0]]),
                                             "remaining": torch.tensor([[0, 3, 0, 0], [0, 3, 1, 0]])})
    assert loss.item() == pytest.approx(-torch.tensor(0.75).log().item(), rel=1e-6)


def test_named_targets_point_region_answers_at_the_question_index_on_their_own_head(setup):
    batch, image_tokens, ground, object_ids = _region_batch(setup)
    targets = binding_attention_targets(batch["input_ids"], batch["labels"], image_tokens, object_ids, ground,
                                        region=False, named=True)
    merged = _merged_ids(batch["input_ids"], image_tokens)
    named = targets["named"].tolist()
    assert {b for b, _, _ in named} == set(range(len(merged)))  # every region row is supervised
    for b, q, key in named:
        answer = merged[b][q:]
        k = answer[answer.index(ground[1]) + 2]  # the answer's index
        assert merged[b][key] == k and merged[b][key + 1] != OBJECT_TOKEN_INDEX  # the question's <objK>
        assert key < q and ground[1] in merged[b][q + 1:]  # from inside the phrase, before </ground>
    assert "named" not in binding_attention_targets(batch["input_ids"], batch["labels"], image_tokens, object_ids,
                                                    ground, region=False)
    # the loss reads "named" from its own head of the first supervised layer
    attn = [torch.full((1, 3, 3, 3), 1 / 3), torch.full((1, 3, 3, 3), 1 / 3)]
    attn[0][0, 2, 2, 0] = 0.25
    t = {"previous": torch.tensor([[0, 1, 0]]), "match": torch.tensor([[0, 2, 1]]), "named": torch.tensor([[0, 2, 0]])}
    base = attention_supervision_loss(attn, t)
    assert attention_supervision_loss(attn, t, named_head=2).item() == pytest.approx(
        base.item() - torch.tensor(0.25).log().item(), rel=1e-6)


def test_named_head_is_a_copier_and_checked_against_the_key_value_groups():
    text = {**TWO_LAYERS["text_config"], "num_attention_heads": 4, "num_key_value_heads": 2}
    overrides = {**TWO_LAYERS, "text_config": text}
    tokenizer = train_tokenizer(prompt_corpus(), 300)
    common = dict(model_overrides=overrides, attention_init="supervised", attention_supervision=1.0)
    plain = T.build_model(config(**common), tokenizer)
    shaped = T.build_model(config(**common, named_attention_head=2), tokenizer)
    a, b = plain.model.layers[0].self_attn, shaped.model.layers[0].self_attn
    hd = a.head_dim
    v = b.v_proj.weight[hd:2 * hd]  # head 2 reads key/value head 1
    torch.testing.assert_close(v @ v.T, torch.eye(hd), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.o_proj.weight[:, 2 * hd:3 * hd], v.T)
    torch.testing.assert_close(b.o_proj.weight[:, :hd], a.o_proj.weight[:, :hd])  # head 0 as without it
    with pytest.raises(Exception, match="key/value head"):
        T.build_model(config(**common, named_attention_head=1), tokenizer)  # shares head 0's key/value head
    with pytest.raises(Exception, match="named_attention_head"):
        config(named_attention_head=2).validate()  # needs attention_supervision
