"""Shared training utilities: seeding, a one-line progress bar, exact checkpoint/resume, bf16 autocast,
JSON-loaded frozen configs with CLI overrides, and warmup + cosine/linear LR schedules.

Used by the UPN and ChatRex trainers. Nothing here knows about a particular model.
Resume is *exact*: a checkpoint holds the model, optimizer and scheduler state, the step, and the
python / numpy / torch RNG states, so ``train N; save; resume M`` equals ``train N + M`` bit for bit
(on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
import torch

from chatrex.errors import CheckpointError, ConfigError

__all__ = [
    "seed_everything", "rng_states", "set_rng_states", "ProgressBar", "save_checkpoint",
    "load_checkpoint", "autocast_context", "TrainConfigBase", "lr_lambda", "build_scheduler",
    "parse_overrides",
]

C = TypeVar("C", bound="TrainConfigBase")


# ---------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, when present, CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Snapshot of the python / numpy / torch RNG states (tensors and plain objects only)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (after a checkpoint round trip)."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                             float(cached)))
    if "torch" in states:
        torch.set_rng_state(torch.as_tensor(states["torch"], dtype=torch.uint8))
    if "cuda_rng" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in states["cuda_rng"]])


def _rng_to_safe(states: Mapping[str, Any]) -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts (tensors, lists, numbers)."""
    out: dict[str, Any] = {}
    if "python" in states:
        version, internal, gauss = states["python"]
        out["python"] = [version, torch.tensor(internal, dtype=torch.int64), gauss]
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        out["numpy"] = [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                        int(has_gauss), float(cached)]
    for key in ("torch", "cuda_rng"):
        if key in states:
            out[key] = states[key]
    return out


def _rng_from_safe(states: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(states)
    if "python" in states:
        version, internal, gauss = states["python"]
        out["python"] = (version, tuple(int(v) for v in internal.tolist()), gauss)
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        out["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return out


# ---------------------------------------------------------------------------------------- progress
class ProgressBar:
    """One self-overwriting stderr line: ``step/total  loss  samples/s  ETA``.

    ``update(step, loss=..., samples=...)`` is called once per optimizer step; ``samples`` is how
    many samples that step consumed. Throughput and ETA are measured from construction (or the last
    :meth:`reset_clock`), so a resumed run reports its own speed. When the stream is not a TTY a full line is written every
    ``every`` steps instead (log files stay readable).
    """

    def __init__(self, total: int, desc: str = "train", stream: Any = None, every: int = 10) -> None:
        self.total = int(total)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, int(every))
        self._t0 = time.perf_counter()
        self._first: int | None = None
        self._samples = 0
        self._ema: float | None = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, step: int, loss: float, samples: int = 1, **extra: float) -> str:
        """Record one step (1-based ``step``) and redraw; returns the line that was drawn."""
        now = time.perf_counter()
        if self._first is None:
            self._first = step - 1
        self._samples += int(samples)
        self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
        elapsed = max(now - self._t0, 1e-9)
        rate = self._samples / elapsed
        steps_done = step - self._first
        eta = elapsed / max(steps_done, 1) * (self.total - step)
        parts = [f"{self.desc} {step}/{self.total}", f"loss {loss:.4f} (ema {self._ema:.4f})",
                 f"{rate:.2f} samples/s", f"ETA {_fmt_seconds(eta)}"]
        parts += [f"{k} {v:.4g}" for k, v in extra.items()]
        line = " | ".join(parts)
        if self._tty:
            self.stream.write("\r" + line + " " * 4)
            if step >= self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step >= self.total or steps_done == 1:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def reset_clock(self) -> None:
        """Restart the throughput clock (e.g. after a slow first-step setup)."""
        self._t0, self._first, self._samples = time.perf_counter(), None, 0

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None,
                    scheduler: Any = None, step: int = 0, rng: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a resumable checkpoint (``torch.save``; atomic via a temp file + rename).

    ``rng`` defaults to the current :func:`rng_states`. ``extra`` holds plain data (config dict,
    loss history, ...): anything ``torch.load(weights_only=True)`` can read back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "rng": _rng_to_safe(rng if rng is not None else rng_states()),
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None,
                    scheduler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file into ``model`` (strict) / optimizer / scheduler.

    Restores the RNG states when ``restore_rng``. Returns ``{"step": int, "extra": dict}``.
    Raises CheckpointError when the file is missing/unreadable or the model keys do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a file written "
                              "by the trainer (e.g. OUT/checkpoint.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised typed with the cause attached
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    result = model.load_state_dict(state["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {list(result.missing_keys)[:10]} "
            f"(of {len(result.missing_keys)}), unexpected {list(result.unexpected_keys)[:10]} "
            f"(of {len(result.unexpected_keys)}); was it written for a different config?")
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng"):
        set_rng_states(_rng_from_safe(state["rng"]))
    return {"step": int(state.get("step", 0)), "extra": state.get("extra", {}) or {}}


# ---------------------------------------------------------------------------------------- autocast
def autocast_context(device: str | torch.device, dtype: torch.dtype | str | None = None):
    """bf16 (or the given dtype) autocast on ``device`` when ``dtype`` is set, else a nullcontext.

    fp16 on CPU is refused (it is slow and inaccurate there): pass ``torch.bfloat16``.
    """
    if dtype is None or dtype in ("none", "fp32", "float32", torch.float32):
        return contextlib.nullcontext()
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}.get(dtype, None)
        if dtype is None:
            raise ConfigError("autocast dtype must be one of bf16/bfloat16/fp16/float16/fp32/none")
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype == torch.float16:
        raise ConfigError("fp16 autocast on CPU is not supported; use bf16 (torch.bfloat16)")
    return torch.autocast(device_type=device_type, dtype=dtype)


# ---------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class TrainConfigBase:
    """Base for frozen training configs loaded from JSON with ``key=value`` CLI overrides.

    Subclasses add fields (with defaults) and may override ``validate``. Tuples are stored for list
    values so configs stay hashable.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError when a field is out of range (subclasses extend)."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls: type[C], path: str | os.PathLike | None = None,
                  overrides: Mapping[str, Any] | Sequence[str] | None = None) -> C:
        """Read a JSON object from ``path`` (or start from defaults) and apply ``overrides``.

        ``overrides`` is a mapping or a list of ``"key=value"`` strings (values parsed as JSON when
        possible, else kept as strings).
        """
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read training config {path}: {exc}") from exc
            if not isinstance(data, dict):
                raise ConfigError(f"training config {path} must hold a JSON object")
        if overrides:
            data.update(parse_overrides(overrides) if not isinstance(overrides, Mapping)
                        else dict(overrides))
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-3", "bf16=true", "name=x"]`` -> ``{"lr": 0.001, "bf16": True, "name": "x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# ---------------------------------------------------------------------------------------- LR schedule
def lr_lambda(step: int, total: int, warmup: int = 0, kind: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (0-based): linear warmup for ``warmup`` steps, then ``kind``
    (``"cosine"``, ``"linear"`` or ``"constant"``) decay from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    raise ConfigError(f"unknown LR schedule {kind!r}; choose cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0,
                    kind: str = "cosine", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :func:`lr_lambda` (its state_dict round-trips through checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total, warmup, kind, min_ratio))
