"""The ChatRex multimodal LLM (`ChatRexForConditionalGeneration`, `ChatRexConfig`, ...).

Importing this package registers "chatrex" with transformers' Auto classes, so a saved folder loads
through `AutoModelForCausalLM.from_pretrained` without trust_remote_code. Other names load lazily
from the name -> module table below (`import chatrex` itself never imports this package).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "ChatRexConfig": "configuration",
    "ChatRexForConditionalGeneration": "modeling",
    "ChatRexPreTrainedModel": "modeling",
    "decode_answer": "modeling",
    "ConvNextTower": "convnext",
    "CLIPVisionTower": "vision",
    "MultiLevelRoIEncoder": "objects",
    "key_report": "checkpoint",
    "rename_reference_key": "checkpoint",
    "IMAGE_TOKEN_INDEX": "constants",
    "OBJECT_TOKEN_INDEX": "constants",
    "IGNORE_INDEX": "constants",
    "DEFAULT_IMAGE_TOKEN": "constants",
    "DEFAULT_OBJECT_FEATURE_TOKEN": "constants",
    "MAX_OBJECTS": "constants",
    "SPECIAL_TOKENS": "constants",
    "object_token": "constants",
    "ChatRexProcessor": "processing",
    "ChatRexInputs": "processing",
    "ProcessorConfig": "processing",
    "ensure_special_tokens": "processing",
    "tokenize_prompt": "processing",
    "apply_chat_template": "templates",
    "ChatTemplate": "templates",
}

_registered = False


def register_auto_classes() -> None:
    """Register ChatRex with AutoConfig / AutoModelForCausalLM (/ AutoModelForImageTextToText) and
    AutoProcessor once, so a saved folder loads through the Auto classes without trust_remote_code."""
    global _registered
    if _registered:
        return
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration import ChatRexConfig
    from .modeling import ChatRexForConditionalGeneration

    AutoConfig.register("chatrex", ChatRexConfig, exist_ok=True)
    AutoModelForCausalLM.register(ChatRexConfig, ChatRexForConditionalGeneration, exist_ok=True)
    image_text = getattr(transformers, "AutoModelForImageTextToText", None)
    if image_text is not None:
        image_text.register(ChatRexConfig, ChatRexForConditionalGeneration, exist_ok=True)
    from transformers import AutoProcessor

    from .processing import ChatRexProcessor

    AutoProcessor.register(ChatRexConfig, ChatRexProcessor, exist_ok=True)
    _registered = True


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chatrex.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


register_auto_classes()

__all__ = sorted(_LAZY) + ["register_auto_classes"]
