"""Stage 0 of the tiny-model recipe: teach the vision side the synthetic world before the LLM reads it.

The reference starts from pretrained CLIP / ConvNeXt, so its object tokens already carry colour and
shape when the LLM first sees them. Our tiny towers are random. Learning the towers and the LLM together
from scratch was measured to fail within the CPU budget: the LLM has to discover that `<objK>` binds to
the feature right after it while that feature is still noise, and it settles on guessing a category
present in the image. Stage 0 removes that chicken-and-egg problem with a small supervised task on the
object tokens exactly as the LLM will receive them (`mm_object_projector` output):

- colour (8-way) and shape (5-way) of every input box that covers an object (IoU >= 0.5 by construction
  of `make_input_boxes`);
- objectness: object box vs distractor (random / partial / background box);
- geometry: the box (cx, cy, w, h) / canvas, so position and size words ("leftmost", "largest") stay
  readable after the projector;
- background kind from the mean image token (`mm_projector` output), so captions can name it.

`RegionHead` reads colour and shape by similarity to the LLM's own word embeddings (see its docstring)
and the rest with linear probes: linear readability is what the LLM's first attention layer needs. The
head is training-only state (saved in checkpoints, never exported).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

REGION_PREFIXES = ("vision_tower.", "vision_tower_aux.", "mm_projector.", "mm_object_projector.")


class RegionHead(nn.Module):
    """Probes on object tokens (K, hidden) and on the mean image token (hidden,).

    With `colour_ids` / `shape_ids` (the LLM token ids of the 8 colour and 5 shape words), colour and
    shape are read by cosine similarity with those words' input embeddings (`category_logits`): the
    object token of a red circle is pulled towards the embeddings of "red" and "circle". The LLM then
    starts stage 2 with object tokens that already look like the words it must copy into an answer
    ("<ground>red circle</ground>") and match by content when a question names a category, instead of
    having to learn a translation from an unrelated feature space. Without ids: plain linear probes.
    """

    def __init__(self, hidden: int, colour_ids: list[int] | None = None, shape_ids: list[int] | None = None,
                 scale: float = 16.0) -> None:
        super().__init__()
        from chatrex.data.synthetic import BACKGROUNDS, COLOURS, SHAPES

        self.scale = float(scale)
        if colour_ids is None or shape_ids is None:
            self.colour_ids = self.shape_ids = None
            self.colour = nn.Linear(hidden, len(COLOURS))
            self.shape = nn.Linear(hidden, len(SHAPES))
        else:
            if len(colour_ids) != len(COLOURS) or len(shape_ids) != len(SHAPES):
                raise ValueError(f"need {len(COLOURS)} colour and {len(SHAPES)} shape word ids")
            self.register_buffer("colour_ids", torch.tensor(colour_ids, dtype=torch.long))
            self.register_buffer("shape_ids", torch.tensor(shape_ids, dtype=torch.long))
        self.objectness = nn.Linear(hidden, 1)
        self.geometry = nn.Linear(hidden, 4)
        self.background = nn.Linear(hidden, len(BACKGROUNDS))

    def category_logits(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (K, hidden), the LLM input embedding matrix (V, hidden) -> colour (K, 8), shape (K, 5) logits."""
        if self.colour_ids is None:
            return self.colour(tokens), self.shape(tokens)
        t = nn.functional.normalize(tokens.float(), dim=-1)
        e = nn.functional.normalize(embeddings.float(), dim=-1)
        return self.scale * t @ e[self.colour_ids].T, self.scale * t @ e[self.shape_ids].T


def category_word_ids(tokenizer: Any) -> tuple[list[int], list[int]] | tuple[None, None]:
    """Token ids of the colour and shape words as they appear in answers ("<ground>red circle..."), or
    (None, None) when some word is not a single token of `tokenizer`."""
    from chatrex.data.synthetic import COLOURS, SHAPES

    ids = []
    for word in (*COLOURS, *SHAPES):
        pieces = [i for i in tokenizer.encode(f"<ground>{word}", add_special_tokens=False)
                  if tokenizer.convert_ids_to_tokens(i) not in ("<ground>", "▁")]
        if len(pieces) != 1:
            return None, None
        ids.append(int(pieces[0]))
    return ids[:len(COLOURS)], ids[len(COLOURS):]


def region_targets(scene: Any, owners: list[int | None], canvas: torch.Tensor, canvas_size: float) -> dict[str, torch.Tensor]:
    """Targets for the K input boxes of one scene.

    owners[k]: scene object index of box k or None (distractor). canvas: (K, 4) xyxy canvas px.
    Returns colour / shape (K,) long with -100 for distractors, objectness (K,) float, geometry (K, 4)
    float (cx, cy, w, h) / canvas_size, background () long.
    """
    from chatrex.data.synthetic import BACKGROUNDS, COLOURS, SHAPES

    colour = torch.full((len(owners),), -100, dtype=torch.long)
    shape = torch.full((len(owners),), -100, dtype=torch.long)
    for k, obj in enumerate(owners):
        if obj is not None:
            colour[k] = COLOURS.index(scene.objects[obj].colour)
            shape[k] = SHAPES.index(scene.objects[obj].shape)
    boxes = canvas.float().reshape(-1, 4)
    geometry = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                            boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1) / float(canvas_size)
    background = BACKGROUNDS.index(scene.background) if scene.background in BACKGROUNDS else -100
    return {"colour": colour, "shape": shape, "objectness": torch.tensor([o is not None for o in owners], dtype=torch.float32),
            "geometry": geometry, "background": torch.tensor(background)}


def region_loss(model: nn.Module, head: RegionHead, processor: Any, scene: Any, rng: np.random.Generator,
                jitter: float, max_distractors: int | None, symbolic: nn.Module | None = None,
                regress: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-0 loss for one scene: CE(colour) + CE(shape) + BCE(objectness) + 4 * L1(geometry) + CE(background)
    (+ `regress` x the relative squared error between each object token and its `symbolic` slot, detached:
    `chatrex.train.symbolic`).

    Boxes are drawn like the instruction data's (`make_input_boxes`: jittered ground truth + distractors),
    and the object tokens are computed like in training batches (`dense_object_features`).
    Returns (loss, {"colour_acc", "shape_acc"} on the object boxes).
    """
    from chatrex.data.instructions import make_input_boxes
    from chatrex.train.chatrex_trainer import dense_object_features

    boxes, owners = make_input_boxes(scene, rng, jitter=jitter, max_distractors=max_distractors)
    low, aux, size = processor.preprocess_image(scene.image)
    canvas, _ = processor.prepare_boxes(boxes, size)
    device = model.get_input_embeddings().weight.device
    image, maps = model.encode_images(low.to(device), aux.to(device))
    tokens = dense_object_features(model, maps, canvas.to(device)).float()  # (K, hidden)
    target = {k: v.to(device) for k, v in region_targets(scene, owners, canvas, model.box_encoder.canvas_size).items()}
    f = nn.functional
    colour_logits, shape_logits = head.category_logits(tokens, model.get_input_embeddings().weight)
    loss = (f.cross_entropy(colour_logits, target["colour"], ignore_index=-100)
            + f.cross_entropy(shape_logits, target["shape"], ignore_index=-100)
            + f.binary_cross_entropy_with_logits(head.objectness(tokens)[:, 0], target["objectness"])
            + 4.0 * f.l1_loss(head.geometry(tokens), target["geometry"]))
    if int(target["background"]) >= 0:
        loss = loss + f.cross_entropy(head.background(image.float().mean(1)), target["background"].reshape(1))
    real = target["colour"] >= 0
    regression = None
    if symbolic is not None and regress > 0:
        from chatrex.train.symbolic import box_attributes, regression_loss, symbolic_objects

        goal = symbolic_objects(symbolic, model, [box_attributes(scene, owners)], [canvas.to(device)])[0]
        regression = regression_loss(tokens, goal)
        loss = loss + float(regress) * regression
    stats = {"colour_acc": float((colour_logits.argmax(1) == target["colour"])[real].float().mean()),
             "shape_acc": float((shape_logits.argmax(1) == target["shape"])[real].float().mean())}
    if regression is not None:
        stats["regression"] = float(regression.detach())
    return loss, stats


__all__ = ["REGION_PREFIXES", "RegionHead", "category_word_ids", "region_loss", "region_targets"]
