"""Official ChatRex / RexSeek checkpoints → our native format (no remote code).

The official hub folders carry a *flat* LLaVA-style `config.json`: the LLM's fields (Llama or Qwen2) sit at the
top level next to `mm_*` fields, and the vision towers are named, not described (`mm_vision_tower` is a hub name;
the ConvNeXt-L sizes are hard-coded in `convnext.py`). This module turns such a config into `ChatRexConfig`
keyword arguments (`chatrex_kwargs_from_official`), and rewrites a whole folder into our format
(`convert_official`): nested config with `model_type="chatrex"`, safetensors shards in our key layout (the
names `save_pretrained` writes; see `loading.rename_reference_key`), tokenizer files and a processor config. The result
loads with `AutoModelForCausalLM.from_pretrained(dst)` once `chatrex.model` is imported.

Conversion streams tensor by tensor, so its peak memory is about one output shard, never the whole model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from chatrex.errors import CheckpointError, ConfigError

# Hub names of CLIP towers → vision config (transformers `CLIPVisionConfig` fields). Built here so nothing
# touches the hub. ViT-L/14-336 is the one ChatRex-7B and RexSeek-3B name.
_CLIP_L14 = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "num_channels": 3,
}
KNOWN_CLIP_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L14, "image_size": 224},
}

# ConvNeXt-L: what the official `convnext.py` hard-codes for `vision_tower_aux`.
CONVNEXT_LARGE_DIMS = (192, 384, 768, 1536)
CONVNEXT_LARGE_DEPTHS = (3, 3, 27, 3)

# Fields of the flat config that describe the multimodal part; consumed here, never passed through.
_MM_FIELDS = {
    "mm_vision_tower", "vision_tower", "mm_vision_select_layer", "mm_vision_select_feature", "mm_hidden_size",
    "object_hidden_size", "mm_projector_type", "use_mm_proj", "mm_use_im_start_end", "mm_use_im_patch_token",
    "image_size_aux", "high_res_size", "low_res_size", "convnext_dims", "convnext_depths", "max_objects",
    "vision_config", "chat_template", "vis_during_training_prob", "mm_vision_tower_aux", "vision_tower_aux",
}
# Fields that must not reach our config: they name the remote-code classes or a dtype we do not want to inherit.
_DROPPED_FIELDS = {
    "model_type", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_attn_implementation_used", "_attn_implementation", "text_config",
}
# Legacy LLM field names transformers 5 still accepts (they become `rope_parameters`).
_LEGACY_TEXT_FIELDS = {"rope_theta", "rope_scaling"}


def detect_text_model_type(flat: dict[str, Any]) -> str:
    """`"qwen2"` when `model_type` / `architectures` mention Qwen (RexSeek: `rexseek_qwen`), else `"llama"`."""
    hints = [str(flat.get("model_type", ""))] + [str(a) for a in flat.get("architectures") or []]
    return "qwen2" if any("qwen" in h.lower() for h in hints) else "llama"


def _text_fields(model_type: str) -> set[str]:
    """The LLM config's own fields (dataclass fields of e.g. `LlamaConfig` minus the generic base fields)."""
    from transformers import AutoConfig, PreTrainedConfig

    cls = type(AutoConfig.for_model(model_type))
    own = set(getattr(cls, "__dataclass_fields__", {})) - set(getattr(PreTrainedConfig, "__dataclass_fields__", {}))
    return own | _LEGACY_TEXT_FIELDS | {"bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read JSON config {path}: {exc}") from exc


def _local_vision_config(path: Path) -> dict[str, Any]:
    """A CLIP vision config from a local file or folder (a full `CLIPConfig` contributes its `vision_config`)."""
    cfg = _read_json(path / "config.json" if path.is_dir() else path)
    if "vision_config" in cfg and isinstance(cfg["vision_config"], dict):
        cfg = cfg["vision_config"]
    return {k: v for k, v in cfg.items() if k not in {"architectures", "transformers_version", "dtype", "torch_dtype"}}


def vision_config_from_official(flat: dict[str, Any], base_dir: str | Path | None = None) -> dict[str, Any]:
    """The CLIP vision config named by a flat config.

    Order: an explicit `vision_config` dict; a known hub name in `mm_vision_tower` (`KNOWN_CLIP_TOWERS`); a local
    JSON file / folder (relative paths resolve against `base_dir`, the checkpoint folder). Anything else is a
    `ConfigError`, because guessing the tower's size would load weights into the wrong shapes.
    """
    if isinstance(flat.get("vision_config"), dict):
        return dict(flat["vision_config"])
    name = flat.get("mm_vision_tower") or flat.get("vision_tower")
    if not name:
        raise ConfigError("official config has no `mm_vision_tower`; add it or pass `vision_config` (a CLIP dict)")
    name = str(name)
    if name in KNOWN_CLIP_TOWERS:
        return dict(KNOWN_CLIP_TOWERS[name])
    for candidate in (Path(name), Path(base_dir) / name if base_dir is not None else None):
        if candidate is not None and candidate.exists():
            return _local_vision_config(candidate)
    stem = name.rstrip("/").split("/")[-1]
    for hub_name, cfg in KNOWN_CLIP_TOWERS.items():  # local copies keep the hub folder name
        if hub_name.split("/")[-1] == stem:
            return dict(cfg)
    raise ConfigError(
        f"unknown vision tower {name!r}: known hub names are {sorted(KNOWN_CLIP_TOWERS)}; otherwise point "
        "`mm_vision_tower` at a local CLIP config.json or add a `vision_config` dict to config.json"
    )


def _convnext_from_official(flat: dict[str, Any], clip_hidden: int) -> tuple[list[int], list[int]]:
    """ConvNeXt dims/depths: explicit fields win; else dims follow the ConvNeXt (d/8, d/4, d/2, d) pattern with
    d = mm_hidden_size - CLIP hidden (ConvNeXt-L when absent), checked against object_hidden_size; depths default
    to ConvNeXt-L's (the loader replaces them with the depths found in the checkpoint)."""
    dims = flat.get("convnext_dims")
    if dims is None:
        mm_hidden = flat.get("mm_hidden_size")
        last = CONVNEXT_LARGE_DIMS[-1] if mm_hidden is None else int(mm_hidden) - clip_hidden
        if last <= 0 or last % 8:
            raise ConfigError(
                f"mm_hidden_size={mm_hidden} minus the CLIP hidden size {clip_hidden} gives ConvNeXt width {last}, "
                "which is not a ConvNeXt last-stage width; add `convnext_dims` to config.json"
            )
        dims = [last // 8, last // 4, last // 2, last]
    dims = [int(d) for d in dims]
    obj = flat.get("object_hidden_size")
    if obj is not None and int(obj) != sum(dims):
        raise ConfigError(f"object_hidden_size={obj} but the ConvNeXt widths {dims} sum to {sum(dims)}; "
                          "add the right `convnext_dims` to config.json")
    mm_hidden = flat.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != clip_hidden + dims[-1]:
        raise ConfigError(f"mm_hidden_size={mm_hidden} but CLIP hidden {clip_hidden} + ConvNeXt last width "
                          f"{dims[-1]} = {clip_hidden + dims[-1]}")
    depths = [int(d) for d in flat.get("convnext_depths") or CONVNEXT_LARGE_DEPTHS]
    if len(depths) != len(dims):
        raise ConfigError(f"convnext_depths {depths} and convnext_dims {dims} differ in length")
    return dims, depths


def _check_supported(flat: dict[str, Any]) -> None:
    """Reject flat fields that would change the architecture in ways this implementation does not build."""
    proj = flat.get("mm_projector_type", "mlp2x_gelu")
    if proj != "mlp2x_gelu":
        raise ConfigError(f"mm_projector_type={proj!r} is not supported: ChatRex uses 'mlp2x_gelu'")
    feature = flat.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ConfigError(f"mm_vision_select_feature={feature!r} is not supported: ChatRex uses 'patch' (no CLS)")
    if flat.get("mm_use_im_start_end"):
        raise ConfigError("mm_use_im_start_end=True (LLaVA <im_start>/<im_end> tokens) is not used by ChatRex")


def _chat_template(flat: dict[str, Any], text_type: str, override: str | None) -> str:
    if override is not None:
        return override
    ours = flat.get("chat_template")
    if isinstance(ours, str) and (ours in {"vicuna", "chatml"} or ("{input}" in ours and "{%" not in ours)):
        return ours  # our own field (a Jinja template from a tokenizer config is not)
    return "chatml" if text_type == "qwen2" else "vicuna"


def chatrex_kwargs_from_official(flat: dict[str, Any], *, chat_template: str | None = None,
                                 base_dir: str | Path | None = None) -> dict[str, Any]:
    """Map a flat official `config.json` (ChatRex-7B: Llama; RexSeek: `rexseek_qwen`) to `ChatRexConfig` kwargs.

    Returns `text_config` (LLM fields + `model_type` "llama"/"qwen2"), `vision_config` (CLIP, see
    `vision_config_from_official`), `convnext_dims`, `convnext_depths`, `low_res_size` (CLIP image size),
    `high_res_size` (32 × the CLIP patch grid, so the ConvNeXt last stage matches the CLIP grid: 768 for 336/14),
    `vision_feature_layer`, `max_objects`, `chat_template` ("vicuna" for Llama, "chatml" for Qwen2, or the
    `chat_template` argument), plus every unknown key unchanged. Raises `ConfigError` for unsupported layouts.
    """
    flat = dict(flat)
    _check_supported(flat)
    text_type = detect_text_model_type(flat)
    text_keys = _text_fields(text_type)
    text_config = {k: v for k, v in flat.items() if k in text_keys}
    text_config["model_type"] = text_type
    if text_type == "qwen2" and "hidden_act" not in text_config:
        text_config["hidden_act"] = "silu"
    vision = vision_config_from_official(flat, base_dir)
    clip_hidden, patch = int(vision.get("hidden_size", 768)), int(vision.get("patch_size", 32))
    low = int(flat.get("low_res_size") or vision.get("image_size", 224))
    high = int(flat.get("high_res_size") or flat.get("image_size_aux") or 32 * (low // patch))
    dims, depths = _convnext_from_official(flat, clip_hidden)
    kwargs = {k: v for k, v in flat.items() if k not in text_keys | _MM_FIELDS | _DROPPED_FIELDS}
    kwargs.update(
        text_config=text_config, vision_config=vision, convnext_dims=dims, convnext_depths=depths,
        low_res_size=low, high_res_size=high, vision_feature_layer=int(flat.get("mm_vision_select_layer", -2)),
        max_objects=int(flat.get("max_objects", 100)), chat_template=_chat_template(flat, text_type, chat_template),
    )
    return kwargs


def is_official_config(cfg: dict[str, Any]) -> bool:
    """True for a flat LLaVA-style config (LLM fields at the top level, no nested `text_config`)."""
    return "text_config" not in cfg and ("mm_vision_tower" in cfg or "mm_hidden_size" in cfg)


# ----------------------------------------------------------------------------------------------------------------
# Folder conversion
# ----------------------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer/generation files; `auto_map` entries (remote-code pointers) are removed from JSON files."""
    copied = []
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            continue
        if name.endswith(".json"):
            data = _read_json(src / name)
            data.pop("auto_map", None)
            (dst / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        else:
            shutil.copyfile(src / name, dst / name)
        copied.append(name)
    return copied


def _write_processor_config(src: Path, dst: Path, config: Any) -> None:
    """`preprocessor_config.json` (copied, or CLIP-style at the high resolution) + `processor_config.json` naming our
    processor without a remote-code `auto_map`."""
    if (src / "preprocessor_config.json").is_file():
        pre = _read_json(src / "preprocessor_config.json")
        pre.pop("auto_map", None)
    else:
        size = int(config.high_res_size)
        pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
               "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (dst / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    proc = {"processor_class": "ChatRexProcessor", "low_res_size": int(config.low_res_size),
            "high_res_size": int(config.high_res_size), "max_objects": int(config.max_objects),
            "prompt_template": config.chat_template}
    (dst / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")


def _shard_plan(keys: list[tuple[Path, str, str]], sizes: dict[str, int], max_shard_bytes: int) -> list[list[int]]:
    """Group tensor positions into shards of at most `max_shard_bytes` (a tensor bigger than that gets its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, (_, _, name) in enumerate(keys):
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += sizes[name]
    return shards


def _plan_tensors(files: list[Path], dtype: Any, table: tuple[tuple[str, str], ...]
                  ) -> tuple[list[tuple[Path, str, str]], dict[str, int]]:
    """(file, checkpoint key, our name) for every kept tensor, and the byte size each will have when written."""
    from chatrex.model.loading import SAFETENSORS_DTYPES, read_safetensors_header, rename_reference_key

    keys, sizes = [], {}
    for path in files:
        header, _ = read_safetensors_header(path)
        for key, entry in header.items():
            name = rename_reference_key(key, table)
            if name is None:
                continue
            stored = SAFETENSORS_DTYPES.get(entry["dtype"])
            if stored is None:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
            width = dtype.itemsize if (dtype is not None and stored.is_floating_point) else stored.itemsize
            keys.append((path, key, name))
            sizes[name] = numel * width
    return keys, sizes


def _write_shards(keys: list[tuple[Path, str, str]], sizes: dict[str, int], dst: Path, dtype: Any,
                  max_shard_bytes: int) -> None:
    """Write our shards + index, reading one tensor at a time (peak ≈ one output shard)."""
    from safetensors.torch import save_file

    from chatrex.model.loading import read_safetensors_header, read_tensor

    plan = _shard_plan(keys, sizes, max_shard_bytes)
    headers = {path: read_safetensors_header(path) for path in dict.fromkeys(p for p, _, _ in keys)}
    weight_map: dict[str, str] = {}
    for n, positions in enumerate(plan, start=1):
        fname = "model.safetensors" if len(plan) == 1 else f"model-{n:05d}-of-{len(plan):05d}.safetensors"
        shard: dict[str, Any] = {}
        for i in positions:
            path, key, name = keys[i]
            header, data_start = headers[path]
            with open(path, "rb") as f:
                shard[name] = read_tensor(f, header[key], data_start, dtype)
            weight_map[name] = fname
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        del shard
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_official(src_folder: str | Path, dst_folder: str | Path, dtype: Any = None, *,
                     chat_template: str | None = None, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Rewrite an official ChatRex / RexSeek folder (flat config.json + safetensors) into our format.

    Writes `config.json` (`model_type="chatrex"`, nested `text_config` / `vision_config`), safetensors shards in our
    key layout (cast to `dtype` when given, else stored dtypes kept) with an index when sharded, the tokenizer
    files, `generation_config.json` when present, and the processor configs. The keys are checked strictly against
    the model built from the config *before* anything is written (`CheckpointError` with the key report). Returns
    `dst_folder`, which then loads with `AutoModelForCausalLM.from_pretrained(dst)` (after `import chatrex.model`)
    or `chatrex.model.loading.load_chatrex`.
    """
    from chatrex.model.loading import (KeyReport, checkpoint_files, checkpoint_shapes, empty_model, read_config,
                                       resolve_dtype)

    src, dst = Path(src_folder), Path(dst_folder)
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"destination {dst} is not empty; choose a new folder")
    dtype = resolve_dtype(dtype)
    files = checkpoint_files(src)
    shapes = checkpoint_shapes(files)
    config = read_config(src, chat_template=chat_template, shapes=shapes)
    from chatrex.model.checkpoint import reference_rename_table

    model = empty_model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    keys, sizes = _plan_tensors(files, dtype, reference_rename_table(model))
    del model
    report = KeyReport(
        unexpected=[k for _, k, n in keys if n not in expected],
        mismatched=[(k, shapes[k], expected[n]) for _, k, n in keys if n in expected and shapes[k] != expected[n]],
        missing=[n for n in expected if n not in sizes and not _tied(config, n)],
    )
    if not report.ok:
        raise CheckpointError(f"{src} does not match the model built from its config.json; nothing was written:\n"
                              f"{report.format()}")
    dst.mkdir(parents=True, exist_ok=True)
    _write_shards(keys, sizes, dst, dtype, max_shard_bytes)
    config.architectures = ["ChatRexForConditionalGeneration"]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(dst))
    _copy_tokenizer_files(src, dst)
    _write_processor_config(src, dst, config)
    return dst


def _tied(config: Any, name: str) -> bool:
    """lm_head.weight may be absent when the LLM ties it to the input embedding."""
    text = getattr(config, "text_config", None)
    return name == "lm_head.weight" and bool(getattr(text, "tie_word_embeddings", False))


def main(argv: list[str] | None = None) -> int:
    """`chatrex convert SRC DST [--dtype bf16|fp16|fp32] [--chat-template NAME] [--max-shard-gb 2]`."""
    parser = argparse.ArgumentParser(prog="chatrex convert",
                                     description="Convert an official ChatRex/RexSeek folder to chatrex's format.")
    parser.add_argument("src", help="official model folder (config.json + safetensors + tokenizer)")
    parser.add_argument("dst", help="new, empty output folder")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="cast floating tensors (default: keep the stored dtypes)")
    parser.add_argument("--chat-template", default=None, help="'vicuna', 'chatml' or a format string with {input}")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output shard in GiB")
    args = parser.parse_args(argv)
    out = convert_official(args.src, args.dst, args.dtype, chat_template=args.chat_template,
                           max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
