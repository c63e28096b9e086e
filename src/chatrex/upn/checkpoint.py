"""Load (and save) UPN weights in the reference state-dict layout, strictly, with a readable report.

Accepted inputs: a `.pth`/`.pt` file holding ``{"model": state_dict}`` or a bare state dict
(read with ``torch.load(weights_only=True)``), a `.safetensors` file, or an in-memory mapping of
tensors (also ``{"model": ...}``). A ``module.`` prefix on every key is stripped.

Strict means: every parameter must be present with the right shape and no key may be left over.
Two benign gaps are filled instead of failing, because they carry no information:
- `relative_position_index` buffers (deterministic from the window size);
- aliases of the shared box MLP (`bbox_embed.{i}` / `transformer.decoder.bbox_embed.{i}`) when at
  least one alias is present. Aliases that are present must agree.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from chatrex.errors import CheckpointError, ConfigError, MissingWeightsError
from chatrex.upn.config import _PRESETS, UPNConfig
from chatrex.upn.model import UPN
from chatrex.upn.swin import _relative_position_index

__all__ = ["load_upn", "read_state_dict", "save_upn"]

_MAX_LINES = 12  # per section of the key report


def read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """A flat {key: tensor} dict from a path or mapping (see module doc); `module.` prefix stripped."""
    if checkpoint is None:
        raise MissingWeightsError("no UPN checkpoint given; pass a .pth/.safetensors path or a state dict")
    if isinstance(checkpoint, (str, os.PathLike)):
        obj: Any = _read_file(Path(checkpoint))
        source = str(checkpoint)
    elif isinstance(checkpoint, Mapping):
        obj, source = checkpoint, "the given mapping"
    else:
        raise CheckpointError(f"cannot load UPN weights from a {type(checkpoint).__name__}; pass a path to a "
                              ".pth/.pt/.safetensors file or a dict of tensors")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source} is not a state dict of tensors: {len(bad)} non-tensor entries, e.g. "
                              f"{bad[:5]}; pass the model weights (the reference keeps them under 'model')")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise MissingWeightsError(f"UPN checkpoint not found: {path}; download upn_large.pth or pass the right path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises several internal error types
            raise CheckpointError(f"could not read {path} as safetensors: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise CheckpointError(f"could not read {path} with torch.load(weights_only=True): {exc}. If it holds "
                              "more than tensors, re-save only the state dict (torch.save(model.state_dict()))") from exc


def _resolve_config(config: str | UPNConfig) -> UPNConfig:
    if isinstance(config, UPNConfig):
        return config
    if isinstance(config, str):
        return UPNConfig.from_name(config)
    raise ConfigError(f"config must be a preset name {sorted(_PRESETS)} or a UPNConfig, got {type(config).__name__}")


def _alias_groups(model: UPN) -> list[list[str]]:
    """State-dict keys that name the same tensor (the shared box MLP), grouped."""
    groups: dict[int, list[str]] = defaultdict(list)
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups[id(tensor)].append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _fill_benign_gaps(state: dict[str, Tensor], model: UPN, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fill missing relative_position_index buffers and missing aliases; check present ones."""
    state = dict(state)
    for key, ref in expected.items():
        if key.endswith("relative_position_index"):
            index = _relative_position_index(model.config.window_size)
            if key not in state:
                state[key] = index
            elif state[key].shape == index.shape and not torch.equal(state[key].cpu(), index):
                raise CheckpointError(f"{key} differs from the Swin relative-position index for window "
                                      f"{model.config.window_size}; the checkpoint uses another window size?")
    for keys in _alias_groups(model):
        present = [k for k in keys if k in state]
        for k in present[1:]:
            if state[k].shape == state[present[0]].shape and not torch.equal(state[k], state[present[0]]):
                raise CheckpointError(f"{k} and {present[0]} are aliases of the one shared box MLP but hold "
                                      "different values; the checkpoint is inconsistent")
        for k in keys:
            if present and k not in state:
                state[k] = state[present[0]]
    return state


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", key)


def _grouped(keys: list[str]) -> list[str]:
    """Collapse numbered keys into patterns with counts; at most _MAX_LINES lines."""
    counts = Counter(_pattern(k) for k in keys)
    lines = [f"    {p}" + (f"  ({n} keys)" if n > 1 else "") for p, n in counts.items()]
    if len(lines) > _MAX_LINES:
        lines = lines[:_MAX_LINES] + [f"    ... and {len(lines) - _MAX_LINES} more patterns"]
    return lines


def _matching_presets(raw: Mapping[str, Tensor]) -> list[str]:
    """Presets that would load `raw` (the original checkpoint keys) strictly: the hint for `config=`."""
    found = []
    for name in _PRESETS:
        with torch.device("meta"):
            model = UPN(UPNConfig.from_name(name))
        expected = model.state_dict()
        try:
            state = _fill_benign_gaps(dict(raw), model, expected)
        except CheckpointError:
            continue
        if set(state) == set(expected) and all(tuple(v.shape) == tuple(expected[k].shape) for k, v in state.items()):
            found.append(name)
    return found


def key_report(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], config_desc: str,
               raw: Mapping[str, Tensor] | None = None) -> str | None:
    """Readable description of how `state` differs from `expected` (None when they match).

    `raw` is the checkpoint as read (before benign gaps were filled); it drives the hint.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return None
    lines = [f"UPN checkpoint does not match the model built from {config_desc} "
             f"({len(state)} checkpoint entries, {len(expected)} expected):"]
    if missing:
        lines += [f"  missing ({len(missing)}):"] + _grouped(missing)
    if unexpected:
        lines += [f"  unexpected ({len(unexpected)}):"] + _grouped(unexpected)
    if mismatched:
        lines.append(f"  shape mismatch ({len(mismatched)}):")
        for k in mismatched[:_MAX_LINES]:
            lines.append(f"    {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        if len(mismatched) > _MAX_LINES:
            lines.append(f"    ... and {len(mismatched) - _MAX_LINES} more")
    lines.append("  hint: " + _hint(state if raw is None else raw, expected, missing, unexpected, mismatched))
    return "\n".join(lines)


def _hint(raw, expected, missing, unexpected, mismatched) -> str:  # noqa: ANN001
    prefixes = {k.split(".", 1)[0] for k in raw}
    if len(prefixes) == 1 and not any(k in expected for k in raw):
        return (f"every key starts with '{next(iter(prefixes))}.'; strip that prefix (reference keys start with "
                "backbone./input_proj./transformer./bbox_embed.)")
    presets = _matching_presets(raw) if (mismatched or len(missing) + len(unexpected) > 2) else []
    if presets:
        return f"the checkpoint matches preset {presets[0]!r}; pass config={presets[0]!r}"
    if mismatched or (missing and unexpected):
        return "wrong config preset? pass config= a preset or a UPNConfig whose sizes match the checkpoint"
    if missing:
        return "the checkpoint is incomplete (truncated or a partial export); missing weights would stay random"
    return "extra keys: the checkpoint holds modules this UPN does not build (training-only heads?)"


def load_upn(checkpoint: str | os.PathLike | Mapping[str, Any], config: str | UPNConfig = "large",
             device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UPN:
    """Build `UPN(config)` and load `checkpoint` strictly; returns the model in eval mode.

    checkpoint: path to .pth/.pt (``{"model": sd}`` or a bare sd) or .safetensors, or a dict of
    tensors. config: preset name ("large", "small", "tiny") or a UPNConfig. device: default CPU.
    dtype: default float32 (whatever the checkpoint stores). Raises MissingWeightsError (no file),
    CheckpointError (unreadable, or missing / unexpected / shape-mismatched keys, with a report).
    """
    cfg = _resolve_config(config)
    raw = read_state_dict(checkpoint)
    with torch.device("meta"):
        model = UPN(cfg)  # no allocation or random init; storage comes with to_empty + load below
    expected = model.state_dict()
    state = _fill_benign_gaps(raw, model, expected)
    desc = f"config {config!r}" if isinstance(config, str) else "the given UPNConfig"
    report = key_report(state, expected, desc, raw=raw)
    if report is not None:
        raise CheckpointError(report)
    model.to_empty(device=torch.device("cpu") if device is None else device)
    model.load_state_dict(state, strict=True)  # copies into the fresh storage (aliases included)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


def save_upn(model: UPN, path: str | os.PathLike) -> None:
    """Write the weights in the reference layout (every alias key, int64 index buffers included).

    `.safetensors` paths use safetensors (aliases are written as separate copies, which safetensors
    requires); anything else is ``torch.save({"model": state_dict})`` like the reference `.pth`.
    """
    state = model.state_dict()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        seen: set[int] = set()
        out = {}
        for k, v in state.items():
            v = v.detach().cpu().contiguous()
            if v.data_ptr() in seen:
                v = v.clone()  # an alias of a tensor already written
            seen.add(v.data_ptr())
            out[k] = v
        save_file(out, str(path))
    else:
        torch.save({"model": {k: v.detach().cpu() for k, v in state.items()}}, path)
