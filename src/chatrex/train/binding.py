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

from typing import NamedTuple, Sequence

import torch
from torch import nn

from chatrex.model.constants import OBJECT_TOKEN_INDEX


@torch.no_grad()
def orthogonal_attention_init(model: nn.Module) -> None:
    """Re-draw every LLM layer's v_proj and o_proj weights as (semi-)orthogonal matrices, in place."""
    for layer in model.model.layers:
        nn.init.orthogonal_(layer.self_attn.v_proj.weight)
        nn.init.orthogonal_(layer.self_attn.o_proj.weight)


@torch.no_grad()
def copy_attention_init(model: nn.Module) -> None:
    """Make every attention head a copier at init: o_proj's head-h block = v_proj's block for h, transposed.

    Then W_O^h W_V^h = V^T V, a projection onto the head's value space, so a head that attends to a position
    adds (a projection of) that position's embedding to the residual stream; with tied embeddings the copied
    `<objK>` raises the `<objK>` logit from step one. v_proj rows are drawn orthonormal; with grouped-query
    attention the heads sharing a kv head split its output (scale 1 / heads-per-kv).
    """
    for layer in model.model.layers:
        attn = layer.self_attn
        nn.init.orthogonal_(attn.v_proj.weight)
        hd = attn.head_dim
        n_heads = attn.o_proj.weight.shape[1] // hd
        n_kv = attn.v_proj.weight.shape[0] // hd
        group = n_heads // n_kv
        for h in range(n_heads):
            v = attn.v_proj.weight[(h // group) * hd:(h // group + 1) * hd]  # (hd, hidden)
            attn.o_proj.weight[:, h * hd:(h + 1) * hd] = v.T / group


@torch.no_grad()
def match_attention_init(model: nn.Module, gain: float = 4.0) -> None:
    """`copy_attention_init`, plus q_proj^h = k_proj^h (times `gain`): every head starts as a content matcher.

    q.k = gain * |W x|^2-like for positions holding the same direction, so a head attends to the positions whose
    embedding resembles its own from step one (before RoPE; slow rotary frequencies keep it at distance).
    """
    copy_attention_init(model)
    for layer in model.model.layers:
        attn = layer.self_attn
        nn.init.orthogonal_(attn.k_proj.weight)
        hd = attn.head_dim
        n_heads = attn.q_proj.weight.shape[0] // hd
        group = n_heads // (attn.k_proj.weight.shape[0] // hd)
        for h in range(n_heads):
            k = attn.k_proj.weight[(h // group) * hd:(h // group + 1) * hd]
            attn.q_proj.weight[h * hd:(h + 1) * hd] = k * gain


@torch.no_grad()
def supervised_heads_init(model: nn.Module, layers: tuple[int, int] = (0, 1), gain: float = 4.0,
                          named_head: int | None = None) -> None:
    """Only the two supervised heads (head 0 of `layers[0]` and of `layers[1]`) get a shape; every other head
    keeps the LLM's default init.

    Both become copiers (o_proj's head-0 block = v_proj's block transposed, orthonormal rows); head 0 of
    `layers[1]` also a content matcher (q_proj = gain * k_proj). `match_attention_init` does this to EVERY head:
    measured on the real prompts, that saturates attention on each token's own look-alikes (scores ~20 apart,
    p ~ 1e-9 elsewhere), so no head could learn a new pattern: after 750 steps the model still answered
    "<ground>blue circle" whatever the question named, copying nothing from it.
    named_head: also make that head of `layers[0]` a copier (the region reader, `attention_supervision_loss`).
    It must not share a key/value head with head 0 (grouped-query attention).
    """
    heads = [(layers[0], 0, False), (layers[1], 0, True)]
    if named_head is not None:
        heads.append((layers[0], int(named_head), False))
    for index, head, matcher in heads:
        attn = model.model.layers[index].self_attn
        hd = attn.head_dim
        hidden = attn.v_proj.weight.shape[1]
        group = (attn.o_proj.weight.shape[1] // hd) // (attn.v_proj.weight.shape[0] // hd)
        kv = slice((head // group) * hd, (head // group + 1) * hd)
        v = torch.empty(hd, hidden, dtype=attn.v_proj.weight.dtype)
        nn.init.orthogonal_(v)
        attn.v_proj.weight[kv] = v
        attn.o_proj.weight[:, head * hd:(head + 1) * hd] = v.T
        if matcher:
            k = torch.empty(hd, hidden, dtype=attn.k_proj.weight.dtype)
            nn.init.orthogonal_(k)
            attn.k_proj.weight[:hd] = k
            attn.q_proj.weight[:hd] = k * gain


def object_token_ids(tokenizer) -> list[int]:  # noqa: ANN001 - a tokenizers/transformers tokenizer
    """Token ids of `<obj0>` ... `<obj99>`, in index order."""
    from chatrex.constants import MAX_OBJECTS, object_token

    return [int(i) for i in tokenizer.convert_tokens_to_ids([object_token(k) for k in range(MAX_OBJECTS)])]


def binding_attention_targets(input_ids: torch.Tensor, labels: torch.Tensor, image_tokens: int,
                              object_ids: Sequence[int], ground_ids: tuple[int, int] | None = None,
                              region: bool = True, named: bool = False) -> dict[str, torch.Tensor]:
    """Attention targets of one batch, in merged-sequence positions (after the image sentinel's expansion).

    input_ids / labels (B, L) as `encode_samples` makes them (left padded; labels IGNORE_INDEX but the answer);
    object_ids[k] = the token id of `<objk>`; ground_ids = the ids of (`<ground>`, `</ground>`).
    Returns int64 tensors (N, 3) of (row, query, key):
    "previous": each object slot (-300) -> the position before it (its `<objK>` token);
    "match": each position whose next label is `<objK>` -> the K-th object slot of its row (pairs whose row
    has fewer than K + 1 slots are dropped);
    "remaining" (N, 4) of (row, query, key, group): each such position -> the slots of its `<objK>` and of the
    indices after it in the same `<objects>` list. A content matcher cannot tell two boxes of the same category
    apart, so for "two red stars" the honest target of the first index is both slots (the loss sums them);
    "match" would ask the head for the smaller index by content alone;
    "gather" (N, 4) of (row, query, key, group), with ground_ids only: each such position -> every token of
    the last `<ground>` ... `</ground>` phrase before it (group numbers the query positions; the loss is on the
    attention summed over a group's keys).
    region: also the region answers' targets (`_region_targets`); off for a model with `object_in_index_token`,
    whose question `<objK>` token already carries box K (measured: with both, those gather targets stayed at
    p < 1e-6 and the binding loss at ~10 for 250 steps, ~6x the language loss).
    named: also "named" (N, 3) of (row, query, key): each position of a region answer that predicts the phrase or
    `</ground>` -> the question's `<objK>` token (K the answer's index). For a model with `object_in_index_token`
    that token carries box K, so one attention hop reads the region. Supervised on its own head
    (`attention_supervision_loss(named_head=...)`), apart from the detection heads.
    """
    from chatrex.model.modeling import merged_slots

    start, _ = merged_slots(input_ids, image_tokens)
    is_obj = input_ids == OBJECT_TOKEN_INDEX
    rows, cols = torch.nonzero(is_obj, as_tuple=True)
    slot = start[rows, cols]
    previous = torch.stack([rows, slot, slot - 1], 1)
    index_of = {int(t): k for k, t in enumerate(object_ids)}
    match, gather, remaining, named_t = [], [], [], []
    for b in range(input_ids.shape[0]):
        slots = start[b][is_obj[b]]  # merged positions of this row's object slots, in box order
        ids = input_ids[b].tolist()
        phrase: tuple[int, int] | None = None  # input positions (first, last) of the last closed phrase
        opened = None
        for p in range(1, input_ids.shape[1]):
            if ground_ids is not None:
                if ids[p - 1] == ground_ids[0]:
                    opened = p - 1
                elif ids[p - 1] == ground_ids[1] and opened is not None and p - 2 > opened:
                    phrase, opened = (opened + 1, p - 2), None
            if (region or named) and ground_ids is not None and int(labels[b, p]) == ground_ids[0]:
                for query, slot_k, asked in _region_targets(p, ids, labels[b].tolist(), start[b], slots, index_of,
                                                            ground_ids):
                    if region:
                        match.append((b, query, slot_k))
                        remaining.append((b, query, slot_k, -1))
                        gather.append((b, query, asked, -1))
                    if named:
                        named_t.append((b, query, asked))
            k = index_of.get(int(labels[b, p]))
            if k is None or k >= slots.numel():
                continue
            query = int(start[b, p - 1])
            match.append((b, query, int(slots[k])))
            rest = []  # this index and the ones after it in the same <objects> list (ascending, as answers list them)
            for q in range(p, input_ids.shape[1]):
                j = index_of.get(int(labels[b, q]))
                if j is None:
                    break
                if j < slots.numel():
                    rest.append(j)
            remaining.extend((b, query, int(slots[j]), -1) for j in rest)
            if phrase is not None:
                gather.extend((b, query, int(start[b, q]), -1) for q in range(phrase[0], phrase[1] + 1))
    gather_t = _grouped(gather)
    out = {"previous": previous, "match": torch.tensor(match, dtype=torch.long).reshape(-1, 3),
           "remaining": _grouped(remaining)}
    if ground_ids is not None:
        out["gather"] = gather_t
    if named:
        out["named"] = torch.tensor(named_t, dtype=torch.long).reshape(-1, 3)
    return out


def _grouped(entries: list) -> torch.Tensor:
    """(row, query, key, -1) entries -> (N, 4) long with column 3 numbering the distinct (row, query) pairs."""
    t = torch.tensor(entries, dtype=torch.long).reshape(-1, 4)
    if t.numel():
        _, t[:, 3] = torch.unique(t[:, 0] * (1 << 32) + t[:, 1], return_inverse=True)
    return t


def _region_targets(p: int, ids: list[int], labels: list[int], start: torch.Tensor, slots: torch.Tensor,
                    index_of: dict[int, int], ground_ids: tuple[int, int]) -> list[tuple[int, int, int]]:
    """Region answers: an answer `<ground>` phrase `</ground><objects><objK></objects>` (label at p = `<ground>`)
    whose `<objK>` the question names (a text `<objK>` not followed by an object slot) is read from slot K.
    Returns, for each position that predicts the phrase or `</ground>`, (query, slot K, that question token), all
    merged positions: the "match" / "remaining" and the "gather" / "named" targets."""
    try:
        end = labels.index(ground_ids[1], p)
    except ValueError:
        return []
    if end + 2 >= len(labels) or index_of.get(labels[end + 2]) is None:
        return []
    k = index_of[labels[end + 2]]
    asked = [q for q in range(p) if labels[q] < 0 and index_of.get(ids[q]) == k
             and (q + 1 >= len(ids) or ids[q + 1] != OBJECT_TOKEN_INDEX)]
    if not asked or k >= slots.numel():
        return []
    # position q predicts token q + 1: the phrase tokens, then </ground>
    return [(int(start[q]), int(slots[k]), int(start[asked[-1]])) for q in range(p, end)]


class BindingSpec(NamedTuple):
    """What the trainer's binding loss needs: its weight, the `<objK>` ids, optionally the (`<ground>`,
    `</ground>`) ids (then layer `layers[0]` is supervised to gather phrases), and the two supervised layers."""

    weight: float
    object_ids: Sequence[int]
    ground_ids: tuple[int, int] | None = None
    layers: tuple[int, int] = (0, 1)
    region: bool = True  # `binding_attention_targets(region=...)`
    named_head: int | None = None  # supervise this head of layers[0] on the "named" targets


def attention_supervision_loss(attentions: Sequence[torch.Tensor], targets: dict[str, torch.Tensor],
                               head: int = 0, layers: tuple[int, int] = (0, 1),
                               named_head: int | None = None) -> torch.Tensor:
    """Mean -log p over the targets: layer layers[0] "gather" when present (else "previous"), layer layers[1]
    "remaining" when present (else "match"); on `head`.

    attentions: the LLM's per-layer probabilities (B, H, E, E) (`output_attentions=True`, eager attention).
    For the grouped targets ("gather", "remaining"), p is the attention a query position puts on its whole group.
    named_head: also "named" (when present) on that head of layer layers[0].
    """
    terms = []
    first = "gather" if "gather" in targets else "previous"
    second = "remaining" if "remaining" in targets else "match"
    jobs = [(layers[0], first, head), (layers[1], second, head)]
    if named_head is not None and "named" in targets:
        jobs.append((layers[0], "named", int(named_head)))
    for layer, name, h in jobs:
        t = targets[name].to(attentions[layer].device)
        if not t.numel():
            continue
        p = attentions[layer][t[:, 0], h, t[:, 1], t[:, 2]].float()
        if t.shape[1] == 4:  # grouped: the attention summed over the group's keys
            p = p.new_zeros(int(t[:, 3].max()) + 1).index_add(0, t[:, 3], p)
        # + 1e-30, not a clamp: a target the head starts far from (p ~ 1e-9 at layer 0 under the match init,
        # measured on detection rows) must still get the (1 - p) gradient; a clamp at 1e-6 made it a constant.
        terms.append(-(p + 1e-30).log().mean())
    if not terms:
        return attentions[0].new_zeros(()).float()
    return torch.stack(terms).sum()


__all__ = ["BindingSpec", "attention_supervision_loss", "binding_attention_targets", "copy_attention_init", "match_attention_init", "object_token_ids", "supervised_heads_init", "orthogonal_attention_init"]
