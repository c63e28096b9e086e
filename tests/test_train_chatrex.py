"""ChatRex trainer and tokenizer: special tokens, label masking, stage freezing, dense RoI parity,
loss decrease, exact resume, LoRA, and the exported folder loading through every entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatrex.constants import SPECIAL_TOKENS
from chatrex.model.constants import IGNORE_INDEX
from chatrex.train import chatrex_trainer as T
from chatrex.train.tokenizer import prompt_corpus, save_tokenizer, train_tokenizer

torch.set_num_threads(1)

# Smallest useful model: the tiny preset with a 1-layer LLM, small towers.
SMALL = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1},
    "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
    "convnext_dims": [4, 8, 8, 16],
    "convnext_depths": [1, 1, 1, 1],
}


def small_config(**changes) -> T.ChatRexTrainConfig:
    base = dict(model="tiny", model_overrides=SMALL, tokenizer_scenes=3, tokenizer_vocab_size=300,
                stages=({"stage": 1, "steps": 2, "lr": 2e-3}, {"stage": 2, "steps": 4, "lr": 2e-3}),
                questions_per_image=3, warmup=1, ckpt_every=0, log_every=1000, seed=3)
    base.update(changes)
    return T.ChatRexTrainConfig(**base)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(prompt_corpus(), 300)


@pytest.fixture(scope="module")
def model_and_processor(tokenizer):
    from chatrex.model.processing import ChatRexProcessor

    model = T.build_model(small_config(), tokenizer)
    return model, ChatRexProcessor(tokenizer, model.config)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_specials_round_trip_and_determinism(tokenizer, tmp_path):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    first = tokenizer.convert_tokens_to_ids("<obj0>")
    assert first == tokenizer.vocab_size  # appended after the BPE vocabulary, reference order
    for k, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(tok, add_special_tokens=False) == [first + k]
    text = "<ground>red circle</ground><objects><obj3><obj12></objects>\nThere are 2 small stars."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False) == text
    save_tokenizer(tokenizer, tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.encode(text, add_special_tokens=False) == ids and len(again) == len(tokenizer)
    other = train_tokenizer(prompt_corpus(), 300)
    assert other.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_keeps_special_text_out_of_bpe():
    # "<obj0>" in the corpus must not become a plain BPE token (it would then not be special).
    tok = train_tokenizer(["<obj0> <obj0> <ground>x</ground>"] * 50 + prompt_corpus(), 300)
    assert tok.convert_tokens_to_ids("<obj0>") == tok.vocab_size


# ---------------------------------------------------------------------------------------------- data / labels
def test_labels_mask_everything_but_answer_and_eos(model_and_processor):
    _, processor = model_and_processor
    samples = T.scene_samples(small_config(), step=0, micro=0)
    assert len(samples) >= 2
    batch = T.encode_samples(processor, samples)
    tok = processor.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == len(samples)
    for b, sample in enumerate(samples):
        answer = tok.encode(sample.answer, add_special_tokens=False) + [tok.eos_token_id]
        supervised = labels[b][labels[b] != IGNORE_INDEX].tolist()
        assert supervised == answer
        assert labels[b, -len(answer):].tolist() == answer  # answer at the end of the (left-padded) row
        assert ids[b, -len(answer):].tolist() == answer
        n = int(mask[b].sum())
        prompt = processor.tokenize(processor.build_prompt(sample.question, len(sample.boxes)))
        assert ids[b, -n:].tolist() == prompt + answer  # the inference prompt, exactly
        assert (mask[b, : ids.shape[1] - n] == 0).all()
        assert batch["boxes"][b].shape == (len(sample.boxes), 4)


def test_data_is_deterministic_per_step():
    cfg = small_config()
    a, b = T.scene_samples(cfg, 5, 0), T.scene_samples(cfg, 5, 0)
    assert [(s.question, s.answer, s.boxes) for s in a] == [(s.question, s.answer, s.boxes) for s in b]
    c = T.scene_samples(cfg, 6, 0)
    assert [s.answer for s in a] != [s.answer for s in c]


# ---------------------------------------------------------------------------------------------- model pieces
def test_extend_vocab_initialises_new_rows_to_the_mean(tokenizer):
    model = T.build_model(small_config(), tokenizer)
    base = tokenizer.vocab_size
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.shape[0] == len(tokenizer)
        mean = weight[:base].mean(0)
        torch.testing.assert_close(weight[base:], mean.expand(len(tokenizer) - base, -1))
    assert model.config.text_config.vocab_size == len(tokenizer)


def test_dense_object_features_match_the_model_encoder(model_and_processor):
    model, _ = model_and_processor
    torch.manual_seed(0)
    side = model.config.high_res_size
    maps = model.encode_highres(torch.randn(1, 3, side, side))
    xy = torch.rand(9, 2) * side * 0.7
    boxes = torch.cat([xy, xy + torch.rand(9, 2) * 80 + 1], dim=1)
    boxes[0] = torch.tensor([-5.0, -5.0, 20.0, 30.0])  # partly outside the canvas
    with torch.no_grad():
        ref = model.encode_objects(maps, [boxes])[0]
        got = T.dense_object_features(model, maps, boxes)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_stage1_trains_only_projectors_and_embeddings(model_and_processor):
    model, processor = model_and_processor
    cfg = small_config()
    T.build_optimizer(model, cfg, {"stage": 1, "steps": 1, "lr": 1e-3})
    model.zero_grad(set_to_none=True)
    T.batch_loss(model, T.encode_samples(processor, T.scene_samples(cfg, 0, 0))).backward()
    for name, param in model.named_parameters():
        trainable = name.startswith(T.STAGE1_PREFIXES)
        assert param.requires_grad == trainable, name
        if not trainable:
            assert param.grad is None, name
    for prefix in ("mm_projector.0.weight", "mm_object_projector.0.weight", "lm_head.weight"):
        assert dict(model.named_parameters())[prefix].grad.abs().sum() > 0
    T.build_optimizer(model, cfg, {"stage": 2, "steps": 1, "lr": 1e-3})
    assert all(p.requires_grad for p in model.parameters())
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- training
def test_training_decreases_the_loss(tmp_path):
    cfg = small_config(stages=({"stage": 2, "steps": 24, "lr": 3e-3},), questions_per_image=4, warmup=2)
    result = T.train_chatrex(cfg, tmp_path, stream=open(tmp_path / "log.txt", "w"))
    hist = result["history"]
    assert len(hist) == 24 and all(np.isfinite(hist))
    assert np.mean(hist[-4:]) < np.mean(hist[:2]) - 1.0, hist
    assert "samples/s" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("split", [2, 3])  # at the stage boundary and inside stage 2
def test_resume_equals_straight_run(tmp_path, split):
    assert_resume_is_exact(small_config(ckpt_every=1), tmp_path, split)


def assert_resume_is_exact(cfg, tmp_path, split):
    """Train straight; train `split` steps, stop, resume to the end: same losses and same weights."""
    straight = T.train_chatrex(cfg, tmp_path / "a", stream=open(tmp_path / "a.log", "w"))
    T.train_chatrex(cfg, tmp_path / "b", stream=open(tmp_path / "b.log", "w"), max_steps=split)
    resumed = T.train_chatrex(cfg, tmp_path / "c", resume=tmp_path / "b" / T.CHECKPOINT_NAME,
                              stream=open(tmp_path / "c.log", "w"))
    assert resumed["history"] == straight["history"]
    sa, sc = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)


def test_lora_wraps_merges_and_trains_adapters_only(model_and_processor, tokenizer):
    model = T.build_model(small_config(), tokenizer)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    n = T.apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert n == 2  # one LLM layer, two projections
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0 at init
    T.build_optimizer(model, small_config(), {"stage": 2, "steps": 1, "lr": 1e-3})
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.endswith("base.weight") for n in frozen)
    for mod in model.modules():
        if isinstance(mod, T.LoRALinear):
            torch.nn.init.normal_(mod.lora_b, std=0.05)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, before)
    assert T.merge_lora(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="matched no Linear"):
        T.apply_lora(model, 4, 8, ["nope"])


def test_config_validation_and_cli(tmp_path):
    from chatrex.errors import ConfigError

    with pytest.raises(ConfigError):
        small_config(stages=({"stage": 3, "steps": 1, "lr": 1e-3},))
    with pytest.raises(ConfigError):
        small_config(task_weights={"nope": 1.0})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(small_config().to_dict()))
    assert T.main(["--config", str(path), "--out", str(tmp_path / "run"), "--steps", "1"]) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert T.main(["--config", str(path), "--out", str(tmp_path / "x"), "questions_per_image=0"]) == 2


def test_exported_folder_loads_everywhere(model_and_processor, tmp_path):
    from transformers import AutoModelForCausalLM

    import chatrex  # noqa: F401  (registers the Auto classes)
    from chatrex.model.modeling import ChatRexForConditionalGeneration
    from chatrex.model.processing import ChatRexProcessor
    from chatrex.pipeline import ChatRex

    model, processor = model_and_processor
    folder = T.export_model(model, processor, tmp_path / "m")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for loaded in (ChatRexForConditionalGeneration.from_pretrained(folder),
                   AutoModelForCausalLM.from_pretrained(folder)):
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    proc = ChatRexProcessor.from_pretrained(folder)
    assert proc.config == processor.config and len(proc.tokenizer) == len(processor.tokenizer)
    pipe = ChatRex.from_pretrained(mllm=folder, dtype=torch.float32, device="cpu")
    result = pipe.detect(T.scene_samples(small_config(), 0, 0)[0].image, ["red circle"], boxes=[[1, 1, 30, 30]])
    assert isinstance(result.raw, str)


def test_batch_loss_equals_the_models_own_label_loss(model_and_processor):
    model, processor = model_and_processor
    batch = T.encode_samples(processor, T.scene_samples(small_config(), 1, 0))
    with torch.no_grad():
        fast = T.batch_loss(model, batch)
        image, maps = model.encode_images(batch["pixel_values"], batch["pixel_values_aux"])
        objects = [model.encode_objects(maps, [b])[0] for b in batch["boxes"]]
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     image_features=image, object_features=objects).loss
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_text_warmup_hides_vision_and_random_new_rows(tokenizer, model_and_processor):
    model, processor = model_and_processor
    batch = T.encode_samples(processor, T.scene_samples(small_config(), 2, 0))
    with torch.no_grad():
        hidden = T.batch_loss(model, batch, hide_vision=True)
        shown = T.batch_loss(model, batch)
    assert torch.isfinite(hidden) and not torch.equal(hidden, shown)
    fresh = T.build_model(small_config(mean_init_new_tokens=False), tokenizer)
    rows = fresh.get_input_embeddings().weight[tokenizer.vocab_size:]
    assert rows.shape[0] == len(tokenizer) - tokenizer.vocab_size and rows.std(0).mean() > 1e-3  # not all equal


def test_curriculum_and_vision_lr_groups(model_and_processor):
    model, _ = model_and_processor
    cfg = small_config(curriculum_steps=100, max_distractors=6, vision_lr_scale=0.1)
    assert T.curriculum(cfg, 0) == (1, 0)
    assert T.curriculum(cfg, 50) == (5, 3)
    assert T.curriculum(cfg, 100) == (8, 6)
    assert all(len(s.boxes) == 1 for s in T.scene_samples(cfg, 0, 0))  # one object, no distractor
    opt = T.build_optimizer(model, cfg, {"stage": 2, "steps": 1, "lr": 1e-3})
    vision = {id(p) for n, p in model.named_parameters() if n.startswith(T.VISION_PREFIXES)}
    for group in opt.param_groups:
        is_vision = {id(p) in vision for p in group["params"]}
        assert len(is_vision) == 1
        assert group["lr"] == pytest.approx(1e-4 if is_vision.pop() else 1e-3)


# ---------------------------------------------------------------------------------------------- stage 0
def test_region_targets_follow_the_scene():
    from chatrex.data.instructions import make_input_boxes
    from chatrex.data.synthetic import COLOURS, SHAPES, sample_scene, split_seed
    from chatrex.train.region_pretrain import region_targets

    scene = sample_scene(split_seed(0, 5, "train"))
    boxes, owners = make_input_boxes(scene, np.random.default_rng(0), jitter=0.0, max_distractors=3)
    canvas = torch.tensor(boxes, dtype=torch.float32)
    t = region_targets(scene, owners, canvas, 100.0)
    for k, obj in enumerate(owners):
        if obj is None:
            assert t["colour"][k] == -100 and t["shape"][k] == -100 and t["objectness"][k] == 0
        else:
            o = scene.objects[obj]
            assert (COLOURS[t["colour"][k]], SHAPES[t["shape"][k]]) == (o.colour, o.shape) and t["objectness"][k] == 1
    x1, y1, x2, y2 = boxes[0]
    assert torch.allclose(t["geometry"][0], torch.tensor([(x1 + x2) / 200, (y1 + y2) / 200, (x2 - x1) / 100, (y2 - y1) / 100]))


def test_stage0_trains_the_vision_side_only_and_learns(tmp_path):
    cfg = small_config(stages=({"stage": 0, "steps": 30, "lr": 5e-3},), region_images_per_step=2, warmup=2)
    model = T.build_model(cfg, T.load_or_build_tokenizer(cfg))
    from chatrex.train.region_pretrain import RegionHead

    head = RegionHead(model.config.text_config.hidden_size)
    opt = T.build_optimizer(model, cfg, cfg.stages[0], head)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in trained) == name.startswith(T.VISION_PREFIXES), name
    assert all(id(p) in trained for p in head.parameters())
    result = T.train_chatrex(cfg, tmp_path, stream=open(tmp_path / "log.txt", "w"))
    hist = result["history"]
    assert np.mean(hist[-5:]) < np.mean(hist[:3]) - 0.5, hist
    assert "region_head" in torch.load(tmp_path / T.CHECKPOINT_NAME, weights_only=True)["extra"]


@pytest.mark.parametrize("split", [2, 3])  # inside stage 0 and at the stage-0 -> stage-2 boundary
def test_resume_with_stage0_and_frozen_towers_equals_straight_run(tmp_path, split):
    cfg = small_config(stages=({"stage": 0, "steps": 3, "lr": 2e-3}, {"stage": 2, "steps": 2, "lr": 2e-3}),
                       region_images_per_step=2, frozen_towers=True, ckpt_every=1)
    assert_resume_is_exact(cfg, tmp_path, split)


def test_frozen_towers_stay_fixed_in_stage2_and_encode_without_autograd(model_and_processor, tokenizer):
    cfg = small_config(frozen_towers=True)
    model = T.build_model(cfg, tokenizer)
    opt = T.build_optimizer(model, cfg, {"stage": 2, "steps": 1, "lr": 1e-3})
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in trained) == (not name.startswith(T.TOWER_PREFIXES)), name
    low, aux = torch.rand(1, 3, 112, 112), torch.rand(1, 3, 256, 256)
    image, maps = T.encode_for_training(model, low, aux)
    ref_image, ref_maps = model.encode_images(low, aux)
    assert torch.equal(image, ref_image) and all(torch.equal(a, b) for a, b in zip(maps, ref_maps))
    assert image.requires_grad and not maps[0].requires_grad  # the projector trains, the towers do not


def test_text_only_rows_drop_the_image_prefix_and_object_labels(model_and_processor, tokenizer, tmp_path):
    from chatrex.constants import object_token

    model, processor = model_and_processor
    cfg = small_config(stages=({"stage": 2, "steps": 3, "lr": 1e-3, "text_only": True},))
    samples = T.scene_samples(cfg, 0, 0)
    batch = T.encode_samples(processor, samples, text_only=True)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert not (batch["input_ids"] < 0).any()  # no image / object sentinels
    objects = set(tokenizer.convert_tokens_to_ids([object_token(k) for k in range(100)]))
    labelled = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    assert labelled and not objects & set(labelled)
    loss = T.batch_loss(model, batch)
    assert torch.isfinite(loss)
    hist = T.train_chatrex(cfg, tmp_path, stream=open(tmp_path / "log.txt", "w"))["history"]
    assert len(hist) == 3 and all(np.isfinite(hist))


def test_ship_writes_a_bf16_folder_with_training_metadata(tmp_path):
    from chatrex.model.loading import load_chatrex
    from chatrex.train.ship import ship_chatrex

    cfg = small_config(stages=({"stage": 2, "steps": 2, "lr": 1e-3},))
    result = T.train_chatrex(cfg, tmp_path / "run", stream=open(tmp_path / "log.txt", "w"))
    meta = ship_chatrex(tmp_path / "run", tmp_path / "assets", eval_scenes=1)
    folder = tmp_path / "assets" / "tiny_chatrex"
    assert meta["trained_steps"] == 2 and meta["train_seconds"] > 0 and meta["train_config"]["seed"] == cfg.seed
    assert set(meta["eval"]) == {"scenes", "seed", "default", "alt"}
    assert json.loads((folder / "training.json").read_text()) == meta
    model, _ = load_chatrex(folder, device="cpu")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    trained = result["model"].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key].to(torch.bfloat16)), key


def test_stage_task_weights_replace_the_global_table():
    cfg = small_config(stages=({"stage": 2, "steps": 2, "lr": 1e-3},
                               {"stage": 2, "steps": 2, "lr": 1e-3, "task_weights": {"caption_brief": 1.0}}))
    assert {s.task for s in T.scene_samples(cfg, 2, 0)} == {"caption_brief"}
    assert {s.task for s in T.scene_samples(cfg, 0, 0)} != {"caption_brief"}
    with pytest.raises(T.ConfigError):
        small_config(stages=({"stage": 2, "steps": 1, "lr": 1e-3, "task_weights": {"nope": 1.0}},)).validate()


def test_the_tiny_model_recipe_parses_and_validates():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "train_chatrex_tiny.json"
    cfg = T.ChatRexTrainConfig.from_json(str(path), [])
    cfg.validate()
    # text-only grammar, then the symbolic binding stage, then stage 0 regressing onto its slots, then real rows
    kinds = [("text" if st.get("text_only") else "symbolic" if st.get("symbolic") else
              "regress" if st.get("regress") else f"stage{st['stage']}") for st in cfg.stages]
    assert kinds[:3] == ["text", "symbolic", "regress"] and "stage2" in kinds[3:], kinds
    assert cfg.frozen_towers and cfg.attention_init == "supervised" and cfg.attention_supervision > 0
    # the model answers box indices with the pointer head and reads "<objK>" tokens with their boxes
    model_config = T.build_model_config(cfg, 1100)
    assert model_config.object_pointer and model_config.object_in_index_token and model_config.index_in_object_slot


POINTER = {**SMALL, "object_pointer": True, "object_in_index_token": True, "index_in_object_slot": True}


def test_pointer_models_train_resume_exactly_and_stage1_trains_the_pointer(tmp_path, tokenizer):
    cfg = small_config(model_overrides=POINTER, ckpt_every=1)
    model = T.build_model(cfg, tokenizer)
    assert model.config.object_token_offset == tokenizer.convert_tokens_to_ids("<obj0>")
    trainable = {n for n, p in model.named_parameters() if p in set(T.set_trainable(model, 1))}
    assert "object_pointer.weight" in trainable
    assert_resume_is_exact(cfg, tmp_path, 3)
    from chatrex.model.processing import ChatRexProcessor

    processor = ChatRexProcessor(tokenizer, model.config)
    batch = T.encode_samples(processor, T.scene_samples(cfg, 1, 0))
    with torch.no_grad():  # the trainer's loss (dense object features) is the model's own, pointer included
        model.object_pointer.weight.normal_(0.0, 1.0)
        fast = T.batch_loss(model, batch)
        image, maps = model.encode_images(batch["pixel_values"], batch["pixel_values_aux"])
        objects = [model.encode_objects(maps, [b])[0] for b in batch["boxes"]]
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     image_features=image, object_features=objects).loss
        model.object_pointer.weight.zero_()
        without = T.batch_loss(model, batch)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert abs(float(fast) - float(without)) > 1e-3  # the pointer is in the loss


def test_text_only_labels_keep_what_the_question_determines(tokenizer):
    from chatrex.constants import object_token
    from chatrex.train.chatrex_data import _text_labels

    def ids(text):
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]

    def labelled(question, answer):
        a = ids(answer)
        return [tokenizer.convert_ids_to_tokens(i).lstrip("\u2581") for i, lab in zip(a, _text_labels(tokenizer, ids(question), a))
                if lab != IGNORE_INDEX]

    answer = f"<ground>red circle</ground><objects>{object_token(2)}{object_token(4)}</objects>"
    kept = labelled("Please detect red circle; in this image.", answer)
    assert "red" in kept and "circle" in kept and "<objects>" in kept and "</ground>" in kept
    assert object_token(2) not in kept and "</objects>" not in kept  # where the list stops depends on the boxes
    region = labelled(f"What is the category of {object_token(2)}?", answer)
    assert "red" not in region and "circle" not in region and "<ground>" in region  # the image decides the words
