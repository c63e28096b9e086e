"""Symbolic object slots: teach the LLM the `<objK>` binding on clean inputs, then make the vision side match.

Binding an answer's `<objK>` to the box whose features fit the question is a content-addressed lookup the LLM
has to learn from scratch here. Measured on the real prompts: with object tokens from the (stage-0) vision
side, the lookup stayed at chance for 3,000 steps, while the same LLM learned it in a few hundred steps on
the text-only toy (benchmarks/binding_toy.py), where a slot is a clean sum of word embeddings. So the recipe
splits the problem in two:

1. symbolic stage (`{"stage": 2, "symbolic": true}`): the object slots are `SymbolicSlots` vectors,
       slot_k = E[colour word] + E[shape word] + geometry(cx, cy, w, h)      (an object box)
       slot_k = distractor + geometry(cx, cy, w, h)                          (a distractor box)
   with E the LLM's own input embeddings and the image tokens zeroed; the LLM learns the prompt grammar
   and the lookup. No vision encoder runs, so these steps are cheap.
2. stage 0 with `"regress"`: the towers and `mm_object_projector` are trained so that the real object
   token of each box equals its symbolic slot (relative squared error against the detached target),
   next to the stage-0 probes. The LLM's lookup then reads real features from the first real step.

Training-only state (saved in checkpoints, never exported): the inference model is unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from chatrex.model.objects import normalized_cxcywh


class SymbolicSlots(nn.Module):
    """Symbolic object tokens from (colour, shape) attributes and boxes; see the module docstring.

    colour_ids / shape_ids: the LLM token ids of the 8 colour and 5 shape words (`category_word_ids`).
    """

    def __init__(self, hidden: int, colour_ids: Sequence[int], shape_ids: Sequence[int], std: float = 0.02) -> None:
        super().__init__()
        self.register_buffer("colour_ids", torch.tensor(list(colour_ids), dtype=torch.long))
        self.register_buffer("shape_ids", torch.tensor(list(shape_ids), dtype=torch.long))
        self.distractor = nn.Parameter(torch.randn(hidden) * std)
        # raw (cx, cy, w, h) -> hidden, small like a word embedding (a sine code would drown the words)
        self.geometry = nn.Sequential(nn.Linear(4, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        nn.init.normal_(self.geometry[2].weight, std=std)
        nn.init.zeros_(self.geometry[2].bias)

    def forward(self, embeddings: torch.Tensor, attrs: torch.Tensor, cxcywh: torch.Tensor) -> torch.Tensor:
        """embeddings (V, hidden) the LLM input matrix; attrs (K, 2) long (colour, shape) or -1 for a
        distractor; cxcywh (K, 4) normalized -> (K, hidden) slots."""
        attrs = attrs.to(embeddings.device)
        real = attrs[:, 0] >= 0
        c, s = attrs[:, 0].clamp(min=0), attrs[:, 1].clamp(min=0)
        words = embeddings[self.colour_ids[c]] + embeddings[self.shape_ids[s]]
        base = torch.where(real[:, None], words, self.distractor.to(words.dtype).expand_as(words))
        return base + self.geometry(cxcywh.to(device=embeddings.device, dtype=torch.float32)).to(words.dtype)


def box_attributes(scene: Any, owners: Sequence[int | None]) -> torch.Tensor:
    """(K, 2) long (colour index, shape index) of each box's object, -1 -1 for distractors
    (`chatrex.data.instructions.box_attributes` as a tensor)."""
    from chatrex.data.instructions import box_attributes as attributes

    return torch.tensor(attributes(scene, owners), dtype=torch.long).reshape(-1, 2)


def symbolic_objects(module: SymbolicSlots, model: nn.Module, attrs: Sequence[torch.Tensor],
                     boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per row: (K_b, hidden) symbolic slots for attrs[b] (K_b, 2) and canvas xyxy boxes[b] (K_b, 4)."""
    weight = model.get_input_embeddings().weight
    canvas = model.box_encoder.canvas_size
    return [module(weight, a, normalized_cxcywh(b.reshape(-1, 4), canvas)) for a, b in zip(attrs, boxes)]


def regression_loss(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean relative squared error |t - y|^2 / |y|^2 over the K rows (scale-free: slot norms change in training)."""
    target = target.detach().float()
    return ((tokens.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-8)).mean()


__all__ = ["SymbolicSlots", "box_attributes", "regression_loss", "symbolic_objects"]
