"""ChatRex training data: the instruction rows of one optimizer step, deterministic in (seed, step, micro-batch).

`scene_samples` draws a scene and its questions (`chatrex.data.instructions`), `encode_samples` turns the
questions about ONE image into a left-padded batch (or text-only rows), `region_scene` draws the scenes of
stage 0. Split from `chatrex_trainer` (which re-exports these names) to keep each file readable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from chatrex.model.constants import IGNORE_INDEX

if TYPE_CHECKING:
    from chatrex.train.chatrex_trainer import ChatRexTrainConfig


def draw_tasks(config: ChatRexTrainConfig, rng: np.random.Generator, task_weights: dict | None = None) -> list[str]:
    """`questions_per_image` task names drawn with `task_weights` (default: the config's)."""
    table = config.task_weights if task_weights is None else task_weights
    names = sorted(table)
    weights = np.array([float(table[n]) for n in names], dtype=np.float64)
    picks = rng.choice(len(names), size=config.questions_per_image, p=weights / weights.sum())
    return [names[i] for i in picks]


def scene_samples(config: ChatRexTrainConfig, step: int, micro: int, split: str = "train") -> list[Any]:
    """The instruction samples of micro-batch `micro` of optimizer step `step` (deterministic)."""
    from chatrex.data.instructions import make_samples
    from chatrex.data.synthetic import sample_scene, split_seed

    rng = np.random.default_rng([config.seed, step, micro])
    renderer: Any = config.renderer
    if renderer == "randomized":
        from chatrex.train.upn_augment import RANDOMIZED_STYLE as renderer
    most, distractors = curriculum(config, step)
    scene = sample_scene(split_seed(config.seed, step * config.images_per_step + micro, split), renderer=renderer,
                         max_objects=most)
    jitter = float(rng.uniform(0.0, config.jitter)) if config.jitter > 0 else 0.0
    paraphrase = bool(rng.random() < config.paraphrase_prob)
    tasks = draw_tasks(config, rng, config.stage_at(step)[2].get("task_weights"))
    return make_samples(scene, rng, tasks, max_distractors=distractors, jitter=jitter,
                        paraphrase=paraphrase)


def curriculum(config: ChatRexTrainConfig, step: int, full_objects: int = 8) -> tuple[int, int | None]:
    """(most objects per scene, distractor cap) at `step`: with `curriculum_steps` > 0 both grow linearly
    from (1, 0) to (full_objects, max_distractors) over those steps. One box first means the model can
    learn to read an object's colour / shape before it has to bind <objK> indices to features."""
    if config.curriculum_steps <= 0 or step >= config.curriculum_steps:
        return full_objects, config.max_distractors
    frac = step / config.curriculum_steps
    most = 1 + int(frac * full_objects)
    cap = config.max_distractors if config.max_distractors is not None else 3 * full_objects + 4
    return min(most, full_objects), int(frac * cap)


def encode_samples(processor: Any, samples: Sequence[Any], text_only: bool = False) -> dict[str, Any]:
    """Samples about ONE image -> one left-padded training batch.

    Returns input_ids / labels / attention_mask (B, L) (labels = IGNORE_INDEX except answer + EOS),
    pixel_values (1, 3, low, low), pixel_values_aux (1, 3, high, high), `boxes`: B canvas-xyxy
    float32 tensors (K_b, 4), and `box_attrs`: B (K_b, 2) (colour, shape) indices, -1 for distractors.
    text_only: rows are the chat-wrapped question without the image / object
    prefix, no pixel values or boxes, and only the answer tokens the question determines labelled
    (`_text_labels`).
    """
    if not samples:
        raise ValueError("no samples to encode")
    if text_only:
        return _text_rows(processor, samples)
    low, aux, size = processor.preprocess_image(samples[0].image)
    tok = processor.tokenizer
    rows, boxes = [], []
    for s in samples:
        canvas, kept = processor.prepare_boxes(s.boxes, size)
        if len(kept) != len(s.boxes):
            raise ValueError(f"sample has {len(s.boxes)} boxes, more than the model's {processor.config.max_objects}")
        prompt = processor.tokenize(processor.build_prompt(s.question, len(kept)))
        answer = [int(i) for i in tok.encode(s.answer, add_special_tokens=False)] + [int(tok.eos_token_id)]
        rows.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        boxes.append(canvas)
    batch = {**_left_pad(rows, processor.pad_token_id), "pixel_values": low, "pixel_values_aux": aux, "boxes": boxes}
    if all("box_attrs" in s.meta for s in samples):  # for symbolic slots (`chatrex.train.symbolic`)
        batch["box_attrs"] = [torch.tensor(s.meta["box_attrs"], dtype=torch.long).reshape(-1, 2) for s in samples]
    return batch


def _text_rows(processor: Any, samples: Sequence[Any]) -> dict[str, Any]:
    from chatrex.model.templates import apply_chat_template, clean_question

    tok = processor.tokenizer
    rows = []
    for s in samples:
        prompt = processor.tokenize(apply_chat_template(clean_question(s.question), processor.config.chat_template,
                                                        eos_text=processor.eos_text))
        answer = [int(i) for i in tok.encode(s.answer, add_special_tokens=False)] + [int(tok.eos_token_id)]
        rows.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + _text_labels(tok, prompt, answer)))
    return _left_pad(rows, processor.pad_token_id)


def _text_labels(tok: Any, prompt: Sequence[int], answer: Sequence[int]) -> list[int]:
    """Labels of a text-only row's answer: IGNORE_INDEX where the answer depends on the image.

    Without vision the LLM can only learn the answer's grammar and what it copies from the question. A label
    the text cannot determine teaches a prior that later stages must unlearn. Measured before this rule: after
    3,000 text-only steps with region answers labelled, the model answered every region question with the most
    frequent category, and no head put more than 0.14 of its attention on the question's `<objK>` in the 3,300
    more steps with images. Masked: every `<objK>`; every `</objects>` (where a list ends depends on the
    boxes); and colour / shape words (singular or plural) that the question does not contain.
    """
    from chatrex.constants import MAX_OBJECTS, OBJECTS_END, object_token
    from chatrex.data.synthetic import COLOURS, SHAPES

    hidden = set(tok.convert_tokens_to_ids([object_token(k) for k in range(MAX_OBJECTS)] + [OBJECTS_END]))
    vocabulary = set(COLOURS) | set(SHAPES) | {w + "s" for w in SHAPES}

    def word(i: int) -> str:
        return str(tok.convert_ids_to_tokens(int(i))).lstrip("\u2581").strip(".,;:?!").lower()

    asked = {word(i) for i in prompt}
    return [IGNORE_INDEX if i in hidden or (word(i) in vocabulary and word(i) not in asked) else i for i in answer]


def _left_pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        input_ids[b, length - len(ids):] = torch.tensor(ids)
        labels[b, length - len(ids):] = torch.tensor(lab)
        mask[b, length - len(ids):] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def region_scene(config: ChatRexTrainConfig, step: int, micro: int) -> tuple[Any, np.random.Generator]:
    """Scene + rng of stage-0 micro-batch `micro` of step `step` (deterministic; its own seed stream)."""
    from chatrex.data.synthetic import sample_scene, split_seed

    renderer: Any = config.renderer
    if renderer == "randomized":
        from chatrex.train.upn_augment import RANDOMIZED_STYLE as renderer
    rng = np.random.default_rng([config.seed, 7, step, micro])
    index = step * config.region_images_per_step + micro
    scene = sample_scene(split_seed(config.seed + 7, index, "train"), renderer=renderer,
                         min_objects=config.region_min_objects)
    return scene, rng


__all__ = ["curriculum", "draw_tasks", "encode_samples", "region_scene", "scene_samples"]
