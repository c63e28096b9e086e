"""ChatRex trainer: the paper's stages on synthetic "shapes" instruction data, from scratch on CPU.

Stages (`ChatRexTrainConfig.stages`): stage 1 trains `mm_projector`, `mm_object_projector` and both
embedding matrices in full (`model.embed_tokens`, `lm_head`), as the reference's stage 1 does ("both
embedding matrices made trainable"); stage 2 trains every parameter (or, with `lora`, the towers,
projectors and embeddings in full plus LoRA adapters on the LLM's linear layers). The reference starts
from pretrained CLIP / ConvNeXt / Vicuna, so its stage 1 only has to align projectors. Our tiny model is
random everywhere, so the tiny recipe adds what a from-scratch model needs: stage 0
(`chatrex.train.region_pretrain`: the vision side learns the world before any text), `frozen_towers`
afterwards, text-only stages (rows without the image / object prefix: the LLM learns the grammar and to
copy the question), and per-stage task weights. Stage 1 is kept for fine-tuning pretrained weights.

Batches: one micro-batch = one scene; its image is encoded ONCE (CLIP + ConvNeXt) and its
`questions_per_image` single-turn questions become the rows of a left-padded batch that share those
image features (box features are pooled per question from the same ConvNeXt maps). Prompts are built by
`ChatRexProcessor` (identical to inference). Labels are IGNORE_INDEX everywhere but the answer tokens and
the EOS after them. `images_per_step` micro-batches are accumulated per optimizer step.

Determinism: the data of (step, micro-batch) comes from `np.random.default_rng([seed, step, micro])`,
not from a running RNG, and the model is initialised under `seed`; so a run is reproducible and
`train N; save; resume M` equals `train N + M` (same machine and thread count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from chatrex.errors import ConfigError
from chatrex.model.constants import IGNORE_INDEX
from chatrex.constants import GROUND_END, GROUND_START
from chatrex.train.binding import (
    BindingSpec,
    attention_supervision_loss,
    binding_attention_targets,
    copy_attention_init,
    match_attention_init,
    object_token_ids,
    orthogonal_attention_init,
    supervised_heads_init,
)
from chatrex.train.chatrex_data import curriculum, draw_tasks, encode_samples, region_scene, scene_samples
from chatrex.train.common import (
    ProgressBar,
    TrainConfigBase,
    autocast_context,
    build_scheduler,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from chatrex.train.lora import LoRALinear, apply_lora, merge_lora
from chatrex.train.region_pretrain import REGION_PREFIXES, RegionHead, category_word_ids, region_loss
from chatrex.train.symbolic import SymbolicSlots, symbolic_objects

VISION_PREFIXES = ("vision_tower.", "vision_tower_aux.", "mm_projector.", "mm_object_projector.")
TOWER_PREFIXES = ("vision_tower.", "vision_tower_aux.")
ATTENTION_INITS = {"orth": orthogonal_attention_init, "copy": copy_attention_init, "match": match_attention_init,
                   "supervised": supervised_heads_init}
STAGE1_PREFIXES = ("mm_projector.", "mm_object_projector.", "model.embed_tokens.", "lm_head.", "object_pointer.")
DEFAULT_TASK_WEIGHTS = {
    "detect": 0.2, "detect_multi": 0.08, "detect_absent": 0.06, "refer": 0.2, "region_category": 0.2,
    "region_short": 0.04, "region_brief": 0.04, "region_sentence": 0.03, "caption_brief": 0.03,
    "caption_detailed": 0.03, "count": 0.05, "conversation": 0.04,
}
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_DIR = "model"


@dataclasses.dataclass(frozen=True)
class ChatRexTrainConfig(TrainConfigBase):
    """Everything one ChatRex training run needs (JSON: configs/train_chatrex_tiny.json).

    model / model_overrides: a `ChatRexConfig` preset name and keyword overrides (nested dicts replace the
    preset's `text_config` / `vision_config` keys one by one; `vocab_size` is set from the tokenizer).
    tokenizer: a tokenizer folder, or None to train the world tokenizer (`tokenizer_vocab_size`,
    `tokenizer_scenes` scenes). stages: [{"stage": 0|1|2, "steps": int, "lr": float}, ...] run in order
    (optional per stage: "text_only": true, "task_weights": {...} replacing the config's for that stage;
    stage 2 "symbolic": true = object slots from word embeddings, no vision; stage 0 "regress": w = also pull
    each object token onto its symbolic slot, see `chatrex.train.symbolic`);
    stage 0 (`chatrex.train.region_pretrain`) trains the towers + projectors on region probes
    (colour / shape / objectness / geometry, `region_images_per_step` scenes per step, each with at least
    `region_min_objects` objects: more labelled boxes per ConvNeXt pass) before any text.
    frozen_towers: after stage 0, keep CLIP and ConvNeXt frozen in stages 1-2 (they run without autograd,
    ~3x cheaper steps; the projectors still train at `vision_lr_scale`).
    questions_per_image: rows per micro-batch (one scene); images_per_step: micro-batches accumulated per
    optimizer step. warmup / schedule / min_lr_ratio: per-stage LR schedule. grad_clip: max grad norm
    (0 = off). bf16: CPU/GPU bf16 autocast. lora: None or {"r", "alpha", "target_modules"} (stage 2).
    task_weights: task name -> sampling weight (`chatrex.data.instructions.ALL_TASKS`). renderer: training
    scenes from the "default" renderer or "randomized" (the default renderer's world with domain
    randomization: rotations, stretch, colour jitter, more backgrounds; `chatrex.train.upn_augment`).
    paraphrase_prob: share of scenes whose questions use paraphrased prompts (the rest: canonical).
    embed_init_std: re-draw the input embedding matrix with this std (None: the LLM's own init).
    mean_init_new_tokens: True = the reference's recipe (model built with the base vocabulary, the 104
    ChatRex rows added as the mean of the old rows). False = all rows random from the start: in a model
    trained from scratch the "mean of random rows" is ~0 and identical for all 104 tokens, so <obj0> ..
    <obj99> start indistinguishable. text_warmup_steps: first steps in which the image / object
    embeddings are replaced by zeros (the LLM first learns the answer grammar and to copy the question's
    words; with informative-but-random object features a from-scratch LLM was measured to guess a category
    present in the image instead of reading the question). curriculum_steps: object count / distractor cap
    grow from one box to the full scene over these steps (`curriculum`). vision_lr_scale: LR factor for the
    towers and projectors (Adam's random-walk growth of the projectors at the LLM's LR was measured to
    blow object features up to norm ~200 with little colour information left). jitter: max GT box
    jitter in px (drawn per scene in [0, jitter]). max_distractors: cap on random distractor boxes
    (None: the data default). attention_init: None, "orth" (orthogonal LLM v_proj / o_proj), "copy" (every head
    copies what it attends to), "match" (copy, and q_proj = k_proj: every head starts as a content matcher) or
    "supervised" (only head 0 of the two supervised layers: copiers, the second also a matcher; recommended);
    see `chatrex.train.binding`. attention_supervision: weight of the binding attention loss (0 = off; > 0 runs
    the LLM with eager attention in training: layer 0 head 0 object slot -> its <objK>, or, with the model's
    index_in_object_slot, the position that predicts <objK> -> its grounded phrase; layer 1 head 0 that
    position -> the slot of the box it names); attention_supervision_layers: those two layers (default (0, 1)).
    named_attention_head: with attention_supervision and a model with object_in_index_token, this head of the
    first supervised layer is also supervised from a region answer to the question's `<objK>` (which carries
    box K), so that region captions read the box the question names (None = off). ckpt_every / eval_every: steps between checkpoints / quick evaluations
    (0 = off); eval_scenes: held-out scenes per quick evaluation.
    """

    model: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 1000
    tokenizer_scenes: int = 400
    stages: tuple = ({"stage": 1, "steps": 50, "lr": 1e-3}, {"stage": 2, "steps": 500, "lr": 5e-4})
    region_images_per_step: int = 4
    region_min_objects: int = 1
    frozen_towers: bool = False
    questions_per_image: int = 8
    images_per_step: int = 1
    weight_decay: float = 0.01
    warmup: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    bf16: bool = False
    lora: dict | None = None
    task_weights: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    renderer: str = "default"
    embed_init_std: float | None = None
    mean_init_new_tokens: bool = True
    text_warmup_steps: int = 0
    curriculum_steps: int = 0
    vision_lr_scale: float = 1.0
    attention_init: str | None = None
    attention_supervision: float = 0.0
    attention_supervision_layers: tuple[int, int] = (0, 1)
    named_attention_head: int | None = None
    paraphrase_prob: float = 1.0
    jitter: float = 3.0
    max_distractors: int | None = None
    seed: int = 0
    threads: int = 1
    ckpt_every: int = 200
    eval_every: int = 0
    eval_scenes: int = 20
    log_every: int = 10

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError("stages is empty: give at least one {'stage': 1|2, 'steps': N, 'lr': x}")
        for st in self.stages:
            if not isinstance(st, dict) or st.get("stage") not in (0, 1, 2) or int(st.get("steps", -1)) < 0:
                raise ConfigError(f"bad stage {st!r}: need {{'stage': 0, 1 or 2, 'steps': >= 0, 'lr': > 0}}")
            if float(st.get("lr", 0)) <= 0:
                raise ConfigError(f"stage {st!r} needs a positive lr")
            if st.get("symbolic") and (int(st["stage"]) != 2 or st.get("text_only")):
                raise ConfigError(f"stage {st!r}: 'symbolic' is a stage-2 switch (not with text_only)")
            if float(st.get("regress", 0)) and int(st["stage"]) != 0:
                raise ConfigError(f"stage {st!r}: 'regress' is a stage-0 weight")
        for name in ("questions_per_image", "images_per_step", "threads", "region_images_per_step"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        from chatrex.data.instructions import ALL_TASKS

        for table in [self.task_weights] + [st["task_weights"] for st in self.stages if "task_weights" in st]:
            unknown = sorted(set(table) - set(ALL_TASKS))
            if unknown or not any(float(w) > 0 for w in table.values()):
                raise ConfigError(f"task_weights: unknown tasks {unknown} or no positive weight; tasks: {ALL_TASKS}")
        if self.renderer not in ("default", "randomized"):
            raise ConfigError(f"renderer must be 'default' or 'randomized', got {self.renderer!r}")
        if self.attention_init is not None and self.attention_init not in ATTENTION_INITS:
            raise ConfigError(f"attention_init must be null or one of {sorted(ATTENTION_INITS)}, "
                              f"got {self.attention_init!r}")
        layers = tuple(self.attention_supervision_layers)
        if len(layers) != 2 or not all(isinstance(x, int) and x >= 0 for x in layers):
            raise ConfigError(f"attention_supervision_layers must be two layer numbers, got {layers!r}")
        if self.named_attention_head is not None and (int(self.named_attention_head) < 1
                                                      or not float(self.attention_supervision)):
            raise ConfigError(f"named_attention_head must be a head number >= 1 (head 0 is the detection gather) "
                              f"and needs attention_supervision > 0, got {self.named_attention_head!r}")
        if float(self.attention_supervision) < 0:
            raise ConfigError(f"attention_supervision must be >= 0, got {self.attention_supervision}")
        if self.lora is not None and int(self.lora.get("r", 0)) < 1:
            raise ConfigError(f"lora needs r >= 1, got {self.lora!r}")

    @property
    def total_steps(self) -> int:
        return sum(int(st["steps"]) for st in self.stages)

    def stage_at(self, step: int) -> tuple[int, int, dict]:
        """(stage index, first step of that stage, stage dict) for a 0-based global `step`."""
        start = 0
        for i, st in enumerate(self.stages):
            if step < start + int(st["steps"]):
                return i, start, st
            start += int(st["steps"])
        return len(self.stages) - 1, start - int(self.stages[-1]["steps"]), self.stages[-1]


# ---------------------------------------------------------------------------------------------- model
def build_model_config(config: ChatRexTrainConfig, vocab_size: int) -> Any:
    """`ChatRexConfig` of the preset with `model_overrides` applied and the LLM vocabulary = `vocab_size`."""
    from chatrex.model.configuration import PRESETS, ChatRexConfig

    if config.model not in PRESETS:
        raise ConfigError(f"unknown ChatRex preset {config.model!r}; choose one of {sorted(PRESETS)}")
    kwargs = json.loads(json.dumps(PRESETS[config.model]))
    for key, value in config.model_overrides.items():
        if key in ("text_config", "vision_config") and isinstance(value, dict):
            kwargs[key] = {**kwargs[key], **value}
        else:
            kwargs[key] = value
    kwargs["text_config"]["vocab_size"] = int(vocab_size)
    return ChatRexConfig(**kwargs)


def extend_vocab(model: nn.Module, new_size: int) -> int:
    """Resize input and output embeddings to `new_size` rows; new rows = mean of the existing rows.

    This is the reference's `initialize_vision_tokenizer`: both matrices get the mean of their old rows
    (not random rows), so new tokens start "neutral". Returns the number of rows added.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if new_size <= old:
        return 0
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)
    model.config.text_config.vocab_size = new_size
    return new_size - old


def build_model(config: ChatRexTrainConfig, tokenizer: Any) -> nn.Module:
    """A randomly initialised model (seeded) sized for `tokenizer`: built with the base vocabulary, then
    extended by the ChatRex tokens with mean-initialised rows."""
    from chatrex.model.modeling import ChatRexForConditionalGeneration

    seed_everything(config.seed)
    # rows before the added ChatRex tokens (all rows when they are initialised like the rest)
    base = int(tokenizer.vocab_size) if config.mean_init_new_tokens else len(tokenizer)
    model = ChatRexForConditionalGeneration(build_model_config(config, base))
    if config.embed_init_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, float(config.embed_init_std))
    if config.attention_init == "supervised":  # shapes only the two supervised heads
        supervised_heads_init(model, tuple(int(x) for x in config.attention_supervision_layers),
                              named_head=config.named_attention_head)
    elif config.attention_init is not None:
        ATTENTION_INITS[config.attention_init](model)
    extend_vocab(model, len(tokenizer))
    if model.uses_object_memory:
        model.config.object_token_offset = object_token_offset(tokenizer, model.config.max_objects)
    if config.attention_supervision > 0:  # attention probabilities are only returned by eager attention
        depth = int(model.config.text_config.num_hidden_layers)
        if max(config.attention_supervision_layers) >= depth:
            raise ConfigError(f"attention_supervision_layers {list(config.attention_supervision_layers)} needs "
                              f"layers below the LLM's {depth}")
        model.set_attn_implementation("eager")
    if config.named_attention_head is not None:
        text = model.config.text_config
        group = int(text.num_attention_heads) // int(text.num_key_value_heads)
        if not group <= int(config.named_attention_head) < int(text.num_attention_heads):
            raise ConfigError(f"named_attention_head {config.named_attention_head} must be a head below "
                              f"{text.num_attention_heads} that does not share head 0's key/value head "
                              f"(heads per key/value head: {group})")
    return model


def object_token_offset(tokenizer: Any, count: int) -> int:
    """The id of `<obj0>`; raises ConfigError unless `<obj0>` .. `<obj{count-1}>` have consecutive ids
    (the pointer head scores a contiguous block of logits)."""
    ids = object_token_ids(tokenizer)[:count]
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ConfigError("object_pointer needs the <objK> tokens at consecutive ids in the tokenizer; "
                          "add them in order (chatrex.train.tokenizer.ensure_special_tokens does)")
    return int(ids[0])


def load_or_build_tokenizer(config: ChatRexTrainConfig) -> Any:
    from chatrex.train.tokenizer import build_world_tokenizer

    if config.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(config.tokenizer)
    return build_world_tokenizer(config.tokenizer_vocab_size, config.tokenizer_scenes, seed=config.seed)


# ---------------------------------------------------------------------------------------------- stages
def set_trainable(model: nn.Module, stage: int, frozen_towers: bool = False) -> list[nn.Parameter]:
    """Freeze / unfreeze for `stage` and return the trainable parameters.

    Stage 0: towers + projectors. Stage 1: projectors + full input/output embedding matrices. Stage 2:
    everything, except the frozen base weights of LoRA-wrapped layers (their adapters train).
    `frozen_towers` (stages 1-2) keeps CLIP and ConvNeXt frozen.
    """
    for name, param in model.named_parameters():
        if stage == 0:
            param.requires_grad_(name.startswith(REGION_PREFIXES))
        elif frozen_towers and name.startswith(TOWER_PREFIXES):
            param.requires_grad_(False)
        elif stage == 1:
            param.requires_grad_(name.startswith(STAGE1_PREFIXES))
        else:
            param.requires_grad_(not getattr(param, "_lora_frozen", False))
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, config: ChatRexTrainConfig, stage: dict,
                    head: nn.Module | None = None, symbolic: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW over the stage's trainable parameters (+ the stage-0 `head`); no weight decay on norms, biases
    and embeddings. Stage 0 trains the vision side at the stage's own LR (`vision_lr_scale` is for 1-2)."""
    number = int(stage["stage"])
    params = set_trainable(model, number, config.frozen_towers)
    ids = {id(p) for p in params}
    lr = float(stage["lr"])
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if id(param) not in ids:
            continue
        plain = param.dim() < 2 or "norm" in name or "embed" in name or "embedding" in name
        vision = name.startswith(VISION_PREFIXES)
        buckets.setdefault((plain, vision), []).append(param)
    groups = [{"params": ps, "weight_decay": 0.0 if plain else config.weight_decay,
               "lr": lr * (config.vision_lr_scale if vision and number > 0 else 1.0)}
              for (plain, vision), ps in sorted(buckets.items())]
    if number == 0 and head is not None:
        groups.append({"params": list(head.parameters()), "weight_decay": config.weight_decay, "lr": lr})
    if stage.get("symbolic") and symbolic is not None:  # the symbolic slots' geometry / distractor train with the LLM
        groups.append({"params": list(symbolic.parameters()), "weight_decay": 0.0, "lr": lr})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)


def dense_object_features(model: nn.Module, maps: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """`model.encode_objects(maps, [boxes])[0]` for ONE image, computed densely for fast backward.

    The object encoder's 7x7 RoIAlign mean equals (sum_bins Ry) @ V @ (sum_bins Cx)^T / (count * 49)
    (`chatrex.ops.roi_align.roi_align_mean`); here that product runs as two einsums over the whole map
    instead of one small GEMM per RoI, whose per-RoI slice backward re-allocates the full map each time
    (~10x slower to train). Same geometry (torchvision semantics), same box embedding; equal to
    `encode_objects` up to float rounding (tests/test_train_chatrex.py checks it).
    maps: the 4 ConvNeXt maps (1, C_l, H_l, W_l); boxes (K, 4) xyxy canvas px -> (K, hidden).
    """
    from chatrex.ops.roi_align import _roi_geometry

    encoder = model.box_encoder
    rois = boxes.reshape(-1, 4).to(device=maps[0].device, dtype=torch.float32)
    if rois.shape[0] == 0:
        return model.encode_objects(maps, [boxes])[0]
    size = maps[0].shape[-2:]
    scale = maps[0].shape[-1] / encoder.canvas_size
    out = encoder.output_size
    base = maps[0][:, :1].detach().float()  # only its shape / dtype / device are read
    rois5 = torch.cat([rois.new_zeros(rois.shape[0], 1), rois], dim=1)
    _, ry, _, cx, _, count = _roi_geometry(base, rois5, out, out, scale, -1, False)
    ry, cx = ry.sum(1), cx.sum(1) / (count * out * out)[:, None]  # (K, H), (K, W)
    levels = []
    for i, level in enumerate(maps):
        level = level.float()
        if i > 0:
            level = torch.nn.functional.interpolate(level, size=size, mode="bilinear", align_corners=False)
        rows = torch.einsum("kh,chw->kcw", ry, level[0])  # (K, C_l, W)
        levels.append(torch.einsum("kcw,kw->kc", rows, cx))  # (K, C_l)
    features = torch.cat(levels, dim=1)
    if encoder.add_pos_embedding:
        features = features + encoder.box_embedding(rois, features.shape[1])[1]
    projector = model.mm_object_projector
    return projector(features.to(projector[0].weight.dtype))


def encode_for_training(model: nn.Module, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`model.encode_images`, with the CLIP / ConvNeXt towers run without autograd when both are frozen
    (`frozen_towers`): same numbers, no activation graph kept for them; the projector still trains."""
    from chatrex.model.modeling import fuse_image_features

    towers = (model.vision_tower, model.vision_tower_aux)
    if any(p.requires_grad for tower in towers for p in tower.parameters()):
        return model.encode_images(pixel_values, pixel_values_aux)
    with torch.no_grad():
        clip = model.vision_tower(pixel_values)
        maps = model.encode_highres(pixel_values_aux)
        fused = fuse_image_features(clip, maps[-1])
    return model.mm_projector(fused.to(model.mm_projector[0].weight.dtype)), maps


def batch_loss(model: nn.Module, batch: dict[str, Any], hide_vision: bool = False,
               binding: BindingSpec | tuple | None = None, symbolic: nn.Module | None = None) -> torch.Tensor:
    """Mean next-token loss over the answer tokens of a one-image batch; the image is encoded once,
    and the boxes once when every row has the same box set (the usual case: `make_samples` shares them).
    binding: a `BindingSpec` (or its fields as a tuple) adds its weight x the binding attention loss
    (`chatrex.train.binding`; with the ground ids the first supervised layer gathers the phrase).
    symbolic: a `SymbolicSlots`: object slots from the rows' `box_attrs`, image tokens zero, no vision encoder."""
    device = model.get_input_embeddings().weight.device
    image, objects = None, None
    if symbolic is not None and "pixel_values" in batch:
        hidden = model.config.text_config.hidden_size
        image = torch.zeros(1, model.config.num_image_tokens, hidden, device=device)
        objects = symbolic_objects(symbolic, model, batch["box_attrs"], [b.to(device) for b in batch["boxes"]])
    elif "pixel_values" in batch:  # else a text-only batch (`encode_samples(text_only=True)`)
        image, maps = encode_for_training(model, batch["pixel_values"].to(device), batch["pixel_values_aux"].to(device))
        boxes = [b.to(device) for b in batch["boxes"]]
        if all(b.shape == boxes[0].shape and torch.equal(b, boxes[0]) for b in boxes):
            objects = [dense_object_features(model, maps, boxes[0])] * len(boxes)
        else:
            objects = [dense_object_features(model, maps, b) for b in boxes]
    if hide_vision and image is not None:  # text warm-up: the LLM sees zeros where the image / object embeddings go
        image, objects = image * 0.0, [o * 0.0 for o in objects]
    labels = batch["labels"].to(device)
    # Rows are left padded, so every answer sits at the end of its row (in the merged sequence too):
    # only the last `keep` positions need logits (the lm_head over the image tokens is wasted work).
    keep = int((labels != IGNORE_INDEX).sum(1).max()) + 1
    binding = BindingSpec(*binding) if binding is not None else None
    supervise = binding is not None and binding.weight > 0 and image is not None
    out = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
        image_features=image, object_features=objects, logits_to_keep=keep, output_attentions=supervise,
    )
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1
    target = labels[:, -keep:][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    if supervise:
        targets = binding_attention_targets(batch["input_ids"], batch["labels"], image.shape[1], binding.object_ids,
                                            binding.ground_ids, region=binding.region,
                                            named=binding.named_head is not None)
        loss = loss + binding.weight * attention_supervision_loss(out.attentions, targets, layers=binding.layers,
                                                                  named_head=binding.named_head)
    return loss


# ---------------------------------------------------------------------------------------------- export
def export_model(model: nn.Module, processor: Any, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a from_pretrained folder: config.json, model.safetensors, tokenizer files, processor_config.json.

    LoRA adapters are merged into a copy first; `dtype` (e.g. torch.bfloat16) casts the saved weights.
    """
    import copy

    from chatrex.train.tokenizer import save_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = copy.deepcopy(model).cpu()
    merge_lora(plain)
    if dtype is not None:
        plain = plain.to(dtype)
    for param in plain.parameters():
        param.requires_grad_(False)
    plain.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(folder)
    save_tokenizer(processor.tokenizer, folder)
    return folder


# ---------------------------------------------------------------------------------------------- loop
def _checkpoint_meta(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"step": int(state.get("step", 0)), "extra": state.get("extra", {}) or {}}


def _new_stage(model: nn.Module, config: ChatRexTrainConfig, stage: dict, head: nn.Module | None = None,
               symbolic: nn.Module | None = None) -> tuple[Any, Any]:
    steps = int(stage["steps"])
    optimizer = build_optimizer(model, config, stage, head, symbolic)
    warmup = min(int(config.warmup), max(steps // 4, 1))
    scheduler = build_scheduler(optimizer, steps, warmup, config.schedule, config.min_lr_ratio)
    return optimizer, scheduler


def _region_step(model, head, processor, config, step: int, optimizer, scheduler, symbolic=None) -> tuple[float, int]:
    regress = float(config.stage_at(step)[2].get("regress", 0.0))
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, n = 0.0, config.region_images_per_step
    for micro in range(n):
        scene, rng = region_scene(config, step, micro)
        with autocast_context("cpu" if not torch.cuda.is_available() else "cuda", "bf16" if config.bf16 else None):
            loss, _ = region_loss(model, head, processor, scene, rng, config.jitter, config.max_distractors,
                                  symbolic, regress)
        (loss / n).backward()
        total += float(loss.detach()) / n
    _apply_gradients(config, optimizer, scheduler)
    return total, n


def _apply_gradients(config, optimizer, scheduler) -> None:
    """Clip the accumulated gradients to `grad_clip` (0 = off), then step the optimizer and the schedule."""
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
    optimizer.step()
    scheduler.step()


def _train_step(model, processor, config, step: int, optimizer, scheduler, head=None, symbolic=None
                ) -> tuple[float, int]:
    if head is not None:
        return _region_step(model, head, processor, config, step, optimizer, scheduler, symbolic)
    stage = config.stage_at(step)[2]
    text_only = bool(stage.get("text_only"))
    symbolic = symbolic if stage.get("symbolic") else None
    binding = None
    if config.attention_supervision > 0:
        ground = None
        if getattr(model.config, "index_in_object_slot", False):  # the index is at the slot: supervise the phrase
            ground = tuple(processor.tokenizer.convert_tokens_to_ids([GROUND_START, GROUND_END]))
        binding = BindingSpec(float(config.attention_supervision), object_token_ids(processor.tokenizer), ground,
                              tuple(int(x) for x in config.attention_supervision_layers),
                              region=not getattr(model.config, "object_in_index_token", False),
                              named_head=config.named_attention_head)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, rows = 0.0, 0
    for micro in range(config.images_per_step):
        batch = encode_samples(processor, scene_samples(config, step, micro), text_only=text_only)
        with autocast_context("cpu" if not torch.cuda.is_available() else "cuda", "bf16" if config.bf16 else None):
            loss = batch_loss(model, batch, hide_vision=step < config.text_warmup_steps, binding=binding,
                              symbolic=symbolic)
        (loss / config.images_per_step).backward()
        total += float(loss.detach()) / config.images_per_step
        rows += int(batch["input_ids"].shape[0])
    _apply_gradients(config, optimizer, scheduler)
    return total, rows


def train_chatrex(config: ChatRexTrainConfig, out_dir: str | Path, resume: str | Path | None = None,
                  stream: Any = None, max_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) a ChatRex model; returns {"history", "step", "checkpoint", "model_dir", ...}.

    Writes OUT/checkpoint.pt (resumable: model, optimizer, scheduler, step, RNG, loss history) every
    `ckpt_every` steps and at the end, and OUT/model/ (a from_pretrained folder) with it. `max_steps`
    stops early (after that many global steps) without changing the schedule.
    """
    from chatrex.model.processing import ChatRexProcessor

    torch.set_num_threads(int(config.threads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    stream = stream if stream is not None else sys.stderr
    tokenizer = load_or_build_tokenizer(config)
    model = build_model(config, tokenizer)
    if config.lora is not None:
        targets = config.lora.get("target_modules", ("q_proj", "k_proj", "v_proj", "o_proj"))
        apply_lora(model, int(config.lora["r"]), float(config.lora.get("alpha", 2 * int(config.lora["r"]))), targets)
    processor = ChatRexProcessor(tokenizer, model.config)
    # stage-0 probes (training-only state, seeded after the model so the model's init does not depend on it)
    head = None
    if any(int(st["stage"]) == 0 for st in config.stages):
        head = RegionHead(model.config.text_config.hidden_size, *category_word_ids(tokenizer))
    symbolic = None
    if any(st.get("symbolic") or st.get("regress") for st in config.stages):
        words = category_word_ids(tokenizer)
        if words[0] is None:
            raise ConfigError("symbolic slots need every colour and shape word to be one token of the tokenizer")
        symbolic = SymbolicSlots(model.config.text_config.hidden_size, *words).to(model.device)
    total = config.total_steps if max_steps is None else min(config.total_steps, int(max_steps))
    start, history, optimizer, scheduler, current, spent = 0, [], None, None, -1, 0.0
    if resume is not None:
        meta = _checkpoint_meta(Path(resume))
        start = meta["step"]
        current = config.stage_at(start)[0] if start < config.total_steps else len(config.stages) - 1
        if head is not None and meta["extra"].get("region_head"):
            head.load_state_dict(meta["extra"]["region_head"])
        if symbolic is not None and meta["extra"].get("symbolic_slots"):
            symbolic.load_state_dict(meta["extra"]["symbolic_slots"])
        optimizer, scheduler = _new_stage(model, config, config.stages[current], head, symbolic)
        same = int(meta["extra"].get("stage_index", -1)) == current
        load_checkpoint(resume, model, optimizer if same else None, scheduler if same else None)
        history = list(meta["extra"].get("history", []))
        spent = float(meta["extra"].get("seconds", 0.0))
    bar = ProgressBar(total, desc="chatrex", stream=stream, every=config.log_every)
    started = time.perf_counter()
    for step in range(start, total):
        index, _, stage = config.stage_at(step)
        if index != current:
            optimizer, scheduler, current = *_new_stage(model, config, stage, head, symbolic), index
        stage_head = head if int(stage["stage"]) == 0 else None
        loss, rows = _train_step(model, processor, config, step, optimizer, scheduler, stage_head, symbolic)
        history.append(loss)
        bar.update(step + 1, loss=loss, samples=rows, stage=int(stage["stage"]), lr=scheduler.get_last_lr()[0])
        done = step + 1
        if (config.ckpt_every and done % config.ckpt_every == 0) or done == total:
            seconds = spent + time.perf_counter() - started
            _save(out, model, processor, optimizer, scheduler, done, current, history, config, head, seconds, symbolic)
        if config.eval_every and done % config.eval_every == 0:
            _quick_eval(model, processor, config, done, stream)
    bar.close()
    return {"history": history, "step": max(total, start), "checkpoint": out / CHECKPOINT_NAME,
            "model_dir": out / MODEL_DIR, "seconds": time.perf_counter() - started, "model": model,
            "processor": processor}


def _save(out: Path, model, processor, optimizer, scheduler, step: int, stage_index: int, history, config,
          head: nn.Module | None = None, seconds: float = 0.0, symbolic: nn.Module | None = None) -> None:
    extra = {"stage_index": int(stage_index), "history": [float(h) for h in history], "config": json.dumps(config.to_dict()),
             "seconds": float(seconds)}  # wall clock of all runs so far (resumes add up)
    if head is not None:
        extra["region_head"] = head.state_dict()
    if symbolic is not None:
        extra["symbolic_slots"] = symbolic.state_dict()
    save_checkpoint(out / CHECKPOINT_NAME, model, optimizer, scheduler, step=step, extra=extra)
    export_model(model, processor, out / MODEL_DIR)


def _quick_eval(model, processor, config: ChatRexTrainConfig, step: int, stream: Any) -> None:
    from chatrex.eval.chatrex_eval import evaluate_chatrex, heldout_scenes

    scores = evaluate_chatrex(model, processor, heldout_scenes(config.eval_scenes, seed=config.seed + 1))
    stream.write(f"[eval step {step}] " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()
                                                  if isinstance(v, float)) + "\n")
    stream.flush()


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`chatrex train chatrex --config FILE --out DIR [--steps N] [--resume CKPT] [--threads N] [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="chatrex train chatrex", description="Train the ChatRex MLLM on synthetic shapes.")
    parser.add_argument("--config", help="training config JSON (e.g. configs/train_chatrex_tiny.json)")
    parser.add_argument("--out", required=True, help="output folder (checkpoint.pt, model/)")
    parser.add_argument("--steps", type=int, help="stop after this many global steps (schedule unchanged)")
    parser.add_argument("--resume", help="checkpoint.pt to resume from")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the config's)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (JSON values)")
    args = parser.parse_args(argv)
    try:
        config = ChatRexTrainConfig.from_json(args.config, args.overrides)
        if args.threads:
            config = config.replace(threads=args.threads)
        result = train_chatrex(config, args.out, resume=args.resume, max_steps=args.steps)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    last = result["history"][-1] if result["history"] else float("nan")
    print(f"done: step {result['step']}, last loss {last:.4f}, model in {result['model_dir']}")
    return 0


__all__ = [
    "ChatRexTrainConfig", "LoRALinear", "TOWER_PREFIXES", "VISION_PREFIXES", "apply_lora", "batch_loss",
    "build_model", "build_model_config", "build_optimizer", "curriculum", "dense_object_features", "draw_tasks",
    "encode_for_training", "encode_samples", "export_model", "extend_vocab", "main", "merge_lora", "region_scene",
    "scene_samples", "set_trainable", "train_chatrex",
]


if __name__ == "__main__":
    raise SystemExit(main())
