"""Reference-layout state dicts -> `ChatRexForConditionalGeneration`, strictly, without a second random init.

The rename table maps reference key names to ours. Our module tree copies the reference layout, so the
table is the identity except where the installed transformers names CLIP differently: since 5.x
`CLIPVisionModel` holds its layers directly (no `vision_model.` level), so the reference's
`vision_tower.vision_tower.vision_model.X` is our `vision_tower.vision_tower.X` (transformers'
`save_pretrained` writes the reference spelling back). CLIP's `embeddings.position_ids` buffer, which
some versions stored, is recomputed by ours and dropped when present. The streaming loader
(`chatrex.model.convert` / `loading`) uses the same `reference_rename_table(model)` + `rename_reference_key`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from chatrex.errors import CheckpointError

CLIP_REFERENCE_PREFIX = "vision_tower.vision_tower.vision_model."
# Reference keys that carry no information for us (recomputed buffers): dropped, never reported.
DROPPED_REFERENCE_KEYS: tuple[str, ...] = (
    r"^vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$",
    r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$",  # LLaVA-era Llama checkpoints stored it
)
REPORT_LIMIT = 12  # keys listed per category in an error report


def reference_rename_table(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(regex on a reference key, replacement) pairs for `model`, applied in order.

    Empty (identity) when the installed CLIP keeps its `vision_model` level; otherwise one rule
    removing it.
    """
    clip = model.vision_tower.vision_tower
    if hasattr(clip, "vision_model"):
        return ()
    return ((r"^" + re.escape(CLIP_REFERENCE_PREFIX), "vision_tower.vision_tower."),)


def rename_reference_key(key: str, table: tuple[tuple[str, str], ...] = ()) -> str | None:
    """Our name for a reference state-dict key under `table`, or None when the key is dropped."""
    if any(re.match(pattern, key) for pattern in DROPPED_REFERENCE_KEYS):
        return None
    for pattern, replacement in table:
        key = re.sub(pattern, replacement, key)
    return key


def _listing(title: str, keys: list[str]) -> str:
    shown = "\n".join(f"    {k}" for k in keys[:REPORT_LIMIT])
    more = f"\n    ... and {len(keys) - REPORT_LIMIT} more" if len(keys) > REPORT_LIMIT else ""
    return f"  {title} ({len(keys)}):\n{shown}{more}"


def key_report(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], optional: Iterable[str] = ()
) -> str | None:
    """Compare key -> shape maps; return a readable report of the differences, or None when they match.

    `optional` keys may be absent from `given` (e.g. an lm_head tied to the input embeddings).
    """
    optional = set(optional)
    missing = sorted(k for k in expected if k not in given and k not in optional)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(given[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in given and tuple(given[k]) != tuple(expected[k])
    )
    if not (missing or unexpected or mismatched):
        return None
    parts = [
        f"state dict does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} with the wrong shape"
    ]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            parts.append(_listing(title, keys))
    parts.append("Check that the config matches the checkpoint (preset, vocab size, ConvNeXt depths).")
    return "\n".join(parts)


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    # state_dict() keeps tied duplicates under both names; shapes only (params are on meta here).
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _materialize_buffers(model: Any, device: torch.device) -> None:
    """Give meta buffers (non-persistent: CLIP position ids, rotary frequencies) real storage and
    recompute them through the models' own `_init_weights`; loaded tensors are flagged and left alone."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    for tensor in model.parameters():
        tensor._is_hf_initialized = True
    model.initialize_weights()


def load_reference_state_dict(
    cls: Any, state_dict: Mapping[str, torch.Tensor], config: Any, dtype: torch.dtype | None = None
) -> Any:
    """Build `cls(config)` on the meta device and assign the (renamed) reference tensors strictly.

    Raises CheckpointError with a key report on any missing / unexpected / wrong-shape key.
    """
    with torch.device("meta"):
        model = cls(config)
    table = reference_rename_table(model)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = rename_reference_key(key, table)
        if new_key is not None:
            renamed[new_key] = value
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if config.tie_word_embeddings else set()
    report = key_report(_expected_shapes(model), {k: tuple(v.shape) for k, v in renamed.items()}, optional=tied)
    if report is not None:
        raise CheckpointError(report)
    if dtype is not None:
        renamed = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in renamed.items()}
    model.load_state_dict(renamed, strict=False, assign=True)  # strictness was checked by key_report
    if tied:
        model.tie_weights()
    device = model.get_input_embeddings().weight.device
    _materialize_buffers(model, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left without values after loading: {leftover[:REPORT_LIMIT]}")
    if dtype is not None:
        model.config.dtype = dtype
    return model.eval()


__all__ = [
    "DROPPED_REFERENCE_KEYS",
    "reference_rename_table",
    "rename_reference_key",
    "key_report",
    "load_reference_state_dict",
]
