"""The embedded default models: a tiny UPN and a tiny ChatRex trained by `chatrex train` on the
synthetic "shapes" world, shipped as package data (`chatrex/assets/`).

Everything that falls back to them (the pipeline, every CLI command, the UI, `chatrex demo`) goes
through this module, so the file names and the notice live in one place.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

MLLM_DIR = "tiny_chatrex"  # folder: config.json, model.safetensors, tokenizer files, processor config
UPN_WEIGHTS = "tiny_upn.safetensors"
UPN_META = "tiny_upn.json"  # {"config": {UPNConfig fields}, "short": int, "max_size": int, ...}

NOTICE = (
    "using the embedded synthetic-world demo model (tiny UPN + tiny ChatRex trained by chatrex on generated "
    "shapes scenes: 5 shapes x 8 colours, nothing else). For real images pass the official weights, e.g. "
    "--mllm path/to/ChatRex-7B --upn path/to/upn_large.pth"
)


_announced = False


def announce() -> None:
    """Print the one-line notice (once per process) that the embedded demo model is in use."""
    global _announced
    if not _announced:
        print(f"chatrex: note: {NOTICE}", file=sys.stderr)
        _announced = True


@dataclass(frozen=True)
class EmbeddedUPN:
    """Where the embedded UPN lives and how it must be run (its config and resize rule)."""

    weights: Path
    config: Any  # UPNConfig
    short: int
    max_size: int
    note: str = ""  # e.g. why this model is preliminary; printed with the notice

    @property
    def predictor_options(self) -> dict[str, int]:
        return {"short": self.short, "max_size": self.max_size}


def _asset(name: str) -> Path:
    return Path(str(resources.files("chatrex").joinpath("assets", name)))


def mllm_dir() -> Path | None:
    """The embedded ChatRex model folder, or None when this build ships none."""
    path = _asset(MLLM_DIR)
    return path if (path / "config.json").is_file() else None


def upn() -> EmbeddedUPN | None:
    """The embedded UPN (weights + config + resize rule), or None when this build ships none."""
    weights, meta_path = _asset(UPN_WEIGHTS), _asset(UPN_META)
    if not (weights.is_file() and meta_path.is_file()):
        return None
    from chatrex.upn.config import UPNConfig

    meta = json.loads(meta_path.read_text())
    return EmbeddedUPN(weights, UPNConfig.from_dict(meta["config"]), int(meta["short"]), int(meta["max_size"]),
                       str(meta.get("note", "")))


def upn_predictor(device: Any = None):
    """A `UPNPredictor` on the embedded UPN, or None when this build ships none."""
    found = upn()
    if found is None:
        return None
    from chatrex.upn.predictor import UPNPredictor

    return UPNPredictor.from_checkpoint(found.weights, config=found.config, device=device,
                                        **found.predictor_options)
