"""Streaming loader for ChatRex checkpoint folders (official flat layout or ours), no remote code.

Peak memory ≈ one copy of the weights in the target dtype: the model is built with its parameters on the meta
device (buffers such as RoPE frequencies and CLIP position ids are computed for real, they are tiny), then every
tensor is read on its own from its safetensors shard, cast, and put in place of the meta parameter. No fp32 copy
of the model exists at any point of a bf16 load (only one tensor at a time in its stored dtype).

Keys use the reference layout (`model.*`, `lm_head.*`, `vision_tower.vision_tower.vision_model.*`,
`vision_tower_aux.*`, `mm_projector.*`, `mm_object_projector.*`), which is also our module tree, so the rename
table is the identity plus dropping CLIP's optional `position_ids` buffer. Loading is strict: after all shards,
missing / unexpected / mis-shaped keys raise `CheckpointError` with a readable report.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import torch
from torch import nn

from chatrex.errors import CheckpointError, ConfigError, MissingWeightsError

if TYPE_CHECKING:
    from chatrex.model.configuration import ChatRexConfig
    from chatrex.model.modeling import ChatRexForConditionalGeneration

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Keys older transformers versions saved for buffers we recompute (LLaVA-era Llama checkpoints carry
# `model.layers.N.self_attn.rotary_emb.inv_freq`), dropped on top of `checkpoint.rename_reference_key`.
EXTRA_DROPPED_KEYS = (r"(^|\.)rotary_emb\.inv_freq$",)
# Prefixes of the vision towers (kept in `vision_dtype` when one is given; everything else uses `dtype`).
VISION_PREFIXES = ("vision_tower.", "vision_tower_aux.")
_STAGE_BLOCK = re.compile(r"^vision_tower_aux\.vision_stages\.(\d+)\.blocks\.(\d+)\.norm\.weight$")


def rename_reference_key(key: str, table: tuple[tuple[str, str], ...] = ()) -> str | None:
    """Reference checkpoint key → our parameter name, or None for keys that hold no weights: the rules of
    `from_reference_state_dict` (`chatrex.model.checkpoint`, `table` from `reference_rename_table(model)`) plus
    `EXTRA_DROPPED_KEYS`."""
    from chatrex.model.checkpoint import rename_reference_key as reference_rename

    if any(re.search(p, key) for p in EXTRA_DROPPED_KEYS):
        return None
    return reference_rename(key, table)


@dataclass
class KeyReport:
    """What did not line up between a checkpoint and the model; `ok` when nothing."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 12) -> str:
        """Readable summary: counts per kind, keys grouped so a wrong prefix shows at a glance."""
        lines = []
        for title, keys in (("missing from the checkpoint", self.missing), ("unexpected in the checkpoint",
                                                                             self.unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {title}: " + ", ".join(sorted(keys)[:limit])
                             + (" ..." if len(keys) > limit else ""))
        if self.mismatched:
            shown = [f"{k} checkpoint {list(c)} vs model {list(m)}" for k, c, m in sorted(self.mismatched)[:limit]]
            lines.append(f"  {len(self.mismatched)} with the wrong shape: " + "; ".join(shown)
                         + (" ..." if len(self.mismatched) > limit else ""))
        return "\n".join(lines)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards named by `model.safetensors.index.json` (in order),
    else `model.safetensors`. Raises `MissingWeightsError` when there are none, `CheckpointError` when the index
    names a shard that is not there."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (needs a 'weight_map'): {exc}") from exc
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {absent}; download them again")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise MissingWeightsError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}; a ChatRex folder needs safetensors weights "
        "(convert .bin checkpoints to safetensors first)"
    )


# safetensors dtype tags → torch dtypes (the format stores little-endian raw arrays after a JSON header).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# Largest piece of a tensor read at once while casting (bounds the transient memory of a cast).
READ_CHUNK_BYTES = 16 * 1024**2


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(key → {"dtype", "shape", "data_offsets"}, byte offset where the data starts) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensor(f: BinaryIO, entry: dict[str, Any], data_start: int, dtype: torch.dtype | None = None,
                chunk_bytes: int = READ_CHUNK_BYTES) -> torch.Tensor:
    """Read one tensor from an open safetensors file with plain reads (no mmap, so no file pages in our RSS).

    A floating tensor is cast to `dtype` (None: stored dtype) piece by piece through a staging buffer of at most
    `chunk_bytes`, so only the result in the target dtype is ever whole in memory."""
    stored = SAFETENSORS_DTYPES.get(entry["dtype"])
    if stored is None:
        raise CheckpointError(f"unsupported safetensors dtype {entry['dtype']}; convert the checkpoint to bf16/fp32")
    shape = [int(d) for d in entry["shape"]]
    begin, end = (int(o) for o in entry["data_offsets"])
    out = torch.empty(shape, dtype=dtype if (dtype is not None and stored.is_floating_point) else stored)
    numel = out.numel()
    if end - begin != numel * stored.itemsize:
        raise CheckpointError(f"safetensors entry {entry} has {end - begin} bytes for shape {shape}")
    f.seek(data_start + begin)
    flat = out.view(-1)
    step = numel if out.dtype == stored else max(1, chunk_bytes // stored.itemsize)
    staging = flat if out.dtype == stored else torch.empty(min(step, numel), dtype=stored)
    for start in range(0, numel, step):
        n = min(step, numel - start)
        piece = flat[start:start + n] if out.dtype == stored else staging[:n]
        view = memoryview(piece.view(torch.uint8).numpy()) if n else memoryview(b"")
        if f.readinto(view) != len(view):
            raise CheckpointError(f"{getattr(f, 'name', 'file')} ends early: truncated download?")
        if out.dtype != stored:
            flat[start:start + n].copy_(piece)
    return out


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key → shape from the safetensors headers only (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        header, _ = read_safetensors_header(path)
        shapes.update({k: tuple(int(d) for d in v["shape"]) for k, v in header.items()})
    return shapes


def convnext_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """`convnext_dims` / `convnext_depths` read off the ConvNeXt block keys ({} when the checkpoint has none).

    Official flat configs do not record the ConvNeXt size (the remote code hard-codes ConvNeXt-L), so the
    checkpoint itself is the reliable source."""
    blocks: dict[int, set[int]] = defaultdict(set)
    widths: dict[int, int] = {}
    for key, shape in shapes.items():
        m = _STAGE_BLOCK.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage].add(block)
            widths[stage] = int(shape[0])
    if not blocks:
        return {}
    stages = sorted(blocks)
    return {"convnext_dims": [widths[s] for s in stages], "convnext_depths": [len(blocks[s]) for s in stages]}


def read_config(folder: str | Path, *, chat_template: str | None = None,
                shapes: dict[str, tuple[int, ...]] | None = None) -> "ChatRexConfig":
    """`ChatRexConfig` of a checkpoint folder: ours (nested, `model_type="chatrex"`) as is, or an official flat
    config mapped by `convert.chatrex_kwargs_from_official` (ConvNeXt sizes taken from `shapes` when given)."""
    from chatrex.model.configuration import ChatRexConfig
    from chatrex.model.convert import chatrex_kwargs_from_official, is_official_config

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise MissingWeightsError(f"no config.json in {folder}; is this a ChatRex model folder?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if is_official_config(raw):
        kwargs = chatrex_kwargs_from_official(raw, chat_template=chat_template, base_dir=folder)
        if "convnext_dims" not in raw and shapes:
            kwargs.update(convnext_from_shapes(shapes))
        return ChatRexConfig(**kwargs)
    config = ChatRexConfig.from_pretrained(str(folder))
    if chat_template is not None:
        config.chat_template = chat_template
    return config


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device and no init (buffers stay real, computed on CPU).

    Parameters are created with `torch.empty` (untouched pages, so no memory is committed) and moved to meta at
    registration; weight init is switched off so nothing ever writes them."""
    from transformers.initialization import no_init_weights

    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def empty_model(config: "ChatRexConfig") -> "ChatRexForConditionalGeneration":
    """A `ChatRexForConditionalGeneration` whose parameters are all on the meta device (fill with
    `load_tensor_into` or `materialize_`)."""
    from chatrex.model.modeling import ChatRexForConditionalGeneration

    with _parameters_on_meta():
        model = ChatRexForConditionalGeneration(config)
    return model.eval()


def load_tensor_into(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of parameter/buffer `name` (no copy; the old meta tensor is dropped)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=bool(old is not None and old.requires_grad))
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(name)


def _target_dtype(name: str, stored: torch.dtype, dtype: torch.dtype | None,
                  vision_dtype: torch.dtype | None) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    if vision_dtype is not None and name.startswith(VISION_PREFIXES):
        return vision_dtype
    return dtype if dtype is not None else stored


def stream_load_(model: nn.Module, files: list[Path], *, dtype: torch.dtype | None, device: torch.device | str,
                 vision_dtype: torch.dtype | None = None) -> KeyReport:
    """Fill a meta-initialised `model` from safetensors `files`, tensor by tensor; returns the key report.

    Shapes are checked from the header before a tensor is read, so a wrong tensor is never materialised; tensors
    are read in file order with plain reads (`read_tensor`)."""
    from chatrex.model.checkpoint import reference_rename_table

    table = reference_rename_table(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    report = KeyReport()
    for path in files:
        header, data_start = read_safetensors_header(path)
        with open(path, "rb") as f:
            for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # file order
                name = rename_reference_key(key, table)
                if name is None:
                    continue
                if name not in expected:
                    report.unexpected.append(key)
                    continue
                shape = tuple(int(d) for d in entry["shape"])
                if shape != expected[name]:
                    report.mismatched.append((key, shape, expected[name]))
                    continue
                stored = SAFETENSORS_DTYPES.get(entry["dtype"], torch.float32)
                t = read_tensor(f, entry, data_start, _target_dtype(name, stored, dtype, vision_dtype))
                load_tensor_into(model, name, t.to(device))
    _finish_(model, device)
    misshaped = {rename_reference_key(k, table) for k, _, _ in report.mismatched}
    report.missing = [k for k, v in model.state_dict(keep_vars=True).items()
                      if v.device.type == "meta" and k not in misshaped]
    return report


def _finish_(model: nn.Module, device: torch.device | str) -> None:
    """Re-tie shared weights (tied lm_head) and move the real buffers to `device`."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


@torch.no_grad()
def materialize_random_(model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                        std: float = 0.02, seed: int = 0) -> nn.Module:
    """Give every meta parameter real storage in `dtype`, filled in place (benchmarks, smoke tests).

    Biases → 0, 1-D `weight`s (norms) → 1, `ramma` layer scales → 0.1, everything else N(0, std). Each tensor is
    allocated directly in `dtype`, so a bf16 model never has an fp32 copy. Shared (tied) weights stay shared."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        t = torch.empty(param.shape, dtype=dtype, device=device)
        leaf = name.rpartition(".")[2]
        if leaf == "bias":
            t.zero_()
        elif leaf == "ramma":
            t.fill_(0.1)
        elif leaf == "weight" and t.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, std, generator=gen if t.device.type == "cpu" else None)
        load_tensor_into(model, name, t)
    _finish_(model, device)
    return model


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch.bfloat16`, "bf16"/"bfloat16", "fp32"/"float32", "fp16"/"float16", None → a torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def load_chatrex_model(path: str | Path, dtype: torch.dtype | str | None = torch.bfloat16,
                       device: torch.device | str | None = None, *, chat_template: str | None = None,
                       vision_dtype: torch.dtype | str | None = None) -> "ChatRexForConditionalGeneration":
    """Load a ChatRex folder (official flat config + shards, or ours) into `ChatRexForConditionalGeneration`.

    `dtype`: every floating tensor is cast to it while streaming (None keeps each tensor's stored dtype);
    `vision_dtype` overrides it for the two vision towers. `device` defaults to CPU. Raises `CheckpointError`
    listing missing / unexpected / mis-shaped keys, `MissingWeightsError` when the folder has no weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise MissingWeightsError(f"{folder} is not a folder; pass the ChatRex model folder (config.json + weights)")
    files = checkpoint_files(folder)
    config = read_config(folder, chat_template=chat_template, shapes=checkpoint_shapes(files))
    model = empty_model(config)
    report = stream_load_(model, files, dtype=resolve_dtype(dtype), device=torch.device(device or "cpu"),
                          vision_dtype=resolve_dtype(vision_dtype))
    if not report.ok:
        raise CheckpointError(f"checkpoint {folder} does not match the model built from its config.json:\n"
                              f"{report.format()}\nCheck that config.json belongs to these weights.")
    return model


def load_tokenizer(path: str | Path) -> Any | None:
    """The folder's tokenizer via `AutoTokenizer` (None when the folder has no tokenizer files)."""
    folder = Path(path)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_chatrex(path: str | Path, dtype: torch.dtype | str | None = torch.bfloat16,
                 device: torch.device | str | None = None, *, chat_template: str | None = None,
                 vision_dtype: torch.dtype | str | None = None) -> tuple["ChatRexForConditionalGeneration", Any]:
    """(model, processor) from a ChatRex folder; the processor is a `ChatRexProcessor` over the folder's tokenizer,
    or None when the folder has no tokenizer files. See `load_chatrex_model` for the arguments."""
    model = load_chatrex_model(path, dtype, device, chat_template=chat_template, vision_dtype=vision_dtype)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        return model, None
    from chatrex.model.processing import ChatRexProcessor

    return model, ChatRexProcessor(tokenizer, model.config)
