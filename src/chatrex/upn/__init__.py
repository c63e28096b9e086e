"""UPN (Universal Proposal Network): model, checkpoint loading, preprocessing and predictor.

Imports are lazy (module ``__getattr__``) so ``import chatrex.upn`` stays cheap; add a public name by
appending one ``"Name": "chatrex.upn.module"`` entry to ``_EXPORTS``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # model (config.py / model.py / checkpoint.py)
    "UPNConfig": "chatrex.upn.config",
    "UPN": "chatrex.upn.model",
    "UPNOutput": "chatrex.upn.model",
    "UPNEncoding": "chatrex.upn.model",
    "PROMPT_TYPES": "chatrex.upn.model",
    "load_upn": "chatrex.upn.checkpoint",
    # predictors (predictor.py)
    "UPNPredictor": "chatrex.upn.predictor",
    "UPNWrapper": "chatrex.upn.predictor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatrex.upn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
