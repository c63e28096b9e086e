"""Training aids for `<objK>` index binding in a from-scratch LLM (off by default; see benchmarks/binding_toy.py).

Answering `<objK>` for "the red star" takes two attention hops in the prompt layout
`<obj0>[OBJ]<obj1>[OBJ]…`: each object slot must read the index token just before it (a previous-token head),
and the position that predicts `<objK>` must find the slot whose features match the question (a content head)
and copy what that slot holds. A randomly initialised LLM sits on a saddle here: every index is present in every
row, so under uniform attention the value/output maps get no index-specific gradient. On the text-only toy with
the same LLM, one query per row stayed at chance for 1,500 steps whatever the init. With many bindings per row and
the two hops given as attention targets it reached 0.85 (chance 0.16). On real ChatRex rows, a fresh LLM trained
1,800 stage-2 steps with both aids (on stage-0 towers) has not left chance yet (detection exact match 0.16).

- `orthogonal_attention_init`: orthogonal v_proj / o_proj in every LLM layer, so attention copies at full
  strength from the start (the default std-0.02 init gives the two-hop copy a gain of ~1e-2).
- `binding_attention_targets` + `attention_supervision_loss`: an extra loss, -log of the attention probability
  on the right position, for head 0 of layer 0 (object slot -> its `<objK>` token) and head 0 of layer 1 (the
  position whose next label is `<objK>` -> the slot of box K). Needs the LLM's eager attention
  (`output_attentions`), so it costs memory; inference is unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from chatrex.model.constants import OBJECT_TOKEN_INDEX


@torch.no_grad()
def orthogonal_attention_init(model: nn.Module) -> None:
    """Re-draw every LLM layer's v_proj and o_proj weights as (semi-)orthogonal matrices, in place."""
    for layer in model.model.layers:
        nn.init.orthogonal_(layer.self_attn.v_proj.weight)
        nn.init.orthogonal_(layer.self_attn.o_proj.weight)


def object_token_ids(tokenizer) -> list[int]:  # noqa: ANN001 - a tokenizers/transformers tokenizer
    """Token ids of `<obj0>` ... `<obj99>`, in index order."""
    from chatrex.constants import MAX_OBJECTS, object_token

    return [int(i) for i in tokenizer.convert_tokens_to_ids([object_token(k) for k in range(MAX_OBJECTS)])]


def binding_attention_targets(input_ids: torch.Tensor, labels: torch.Tensor, image_tokens: int,
                              object_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Attention targets of one batch, in merged-sequence positions (after the image sentinel's expansion).

    input_ids / labels (B, L) as `encode_samples` makes them (left padded; labels IGNORE_INDEX but the answer);
    object_ids[k] = the token id of `<objk>`. Returns int64 tensors (N, 3) of (row, query, key):
    "previous": each object slot (-300) -> the position before it (its `<objK>` token);
    "match": each position whose next label is `<objK>` -> the K-th object slot of its row (pairs whose row
    has fewer than K + 1 slots are dropped).
    """
    from chatrex.model.modeling import merged_slots

    start, _ = merged_slots(input_ids, image_tokens)
    is_obj = input_ids == OBJECT_TOKEN_INDEX
    rows, cols = torch.nonzero(is_obj, as_tuple=True)
    slot = start[rows, cols]
    previous = torch.stack([rows, slot, slot - 1], 1)
    index_of = {int(t): k for k, t in enumerate(object_ids)}
    match = []
    for b in range(input_ids.shape[0]):
        slots = start[b][is_obj[b]]  # merged positions of this row's object slots, in box order
        for p in range(1, input_ids.shape[1]):
            k = index_of.get(int(labels[b, p]))
            if k is not None and k < slots.numel():
                match.append((b, int(start[b, p - 1]), int(slots[k])))
    match_t = torch.tensor(match, dtype=torch.long).reshape(-1, 3)
    return {"previous": previous, "match": match_t}


def attention_supervision_loss(attentions: Sequence[torch.Tensor], targets: dict[str, torch.Tensor],
                               head: int = 0) -> torch.Tensor:
    """Mean -log p over the targets: "previous" on layer 0, "match" on layer 1, both on `head`.

    attentions: the LLM's per-layer probabilities (B, H, E, E) (`output_attentions=True`, eager attention).
    """
    terms = []
    for layer, name in ((0, "previous"), (1, "match")):
        t = targets[name].to(attentions[layer].device)
        if t.numel():
            p = attentions[layer][t[:, 0], head, t[:, 1], t[:, 2]].float()
            terms.append(-p.clamp_min(1e-6).log().mean())
    if not terms:
        return attentions[0].new_zeros(()).float()
    return torch.stack(terms).sum()


__all__ = ["attention_supervision_loss", "binding_attention_targets", "object_token_ids", "orthogonal_attention_init"]
