"""Shared helpers for tests that use the tiny MLLM parity fixture (../shared/golden/mllm_tiny).

`fixture_config()` rebuilds the fixture's ChatRexConfig from its config/*.json, `load_fixture_model()`
loads weights/model.safetensors strictly (fp32, eval), `load_fixture_tokenizer()` the tokenizer folder,
`load_case(name)` a case's (json, tensors), and `assert_close_rel` the README's tolerance rule.
Each helper skips the calling test when the fixture folder is absent (via `golden_root()`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("CHATREX_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))
CASES = ("cafe_12boxes", "install_portrait_3boxes", "install_0boxes")
REL_TOL = 1e-5  # README §8: max|a - b| <= 1e-5 * max|ref| per tensor


def golden_root() -> Path:
    """The mllm_tiny folder; skips the test when it is not there."""
    root = GOLDEN / "mllm_tiny"
    if not root.is_dir():
        pytest.skip(f"MLLM parity fixtures not found at {root} (set CHATREX_GOLDEN to the golden/ folder)")
    return root


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _template_name(instruction: str) -> str:
    # The fixture wrapped prompts with the Vicuna INSTRUCTION string; any other string is passed as is.
    return "vicuna" if instruction == "USER: {input} ASSISTANT:" else instruction


@functools.lru_cache(maxsize=1)
def _fixture_config_kwargs() -> dict[str, Any]:
    root = golden_root()
    fixture = _json(root / "config" / "fixture_config.json")
    model = _json(root / "config" / "model_config.json")
    clip = _json(root / "config" / "clip_vision_config.json")
    text_keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "rope_theta", "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    )
    text_config = {"model_type": "qwen2", **{k: model[k] for k in text_keys if k in model}}
    vision_keys = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
        "hidden_act", "layer_norm_eps", "num_channels", "projection_dim", "attention_dropout", "initializer_range",
        "initializer_factor",
    )
    vision_config = {"model_type": "clip_vision_model", **{k: clip[k] for k in vision_keys if k in clip}}
    return dict(
        text_config=text_config,
        vision_config=vision_config,
        convnext_dims=list(fixture["convnext"]["dims"]),
        convnext_depths=list(fixture["convnext"]["depths"]),
        low_res_size=int(clip["image_size"]),
        high_res_size=int(fixture["aux_size"]),
        vision_feature_layer=int(model["mm_vision_select_layer"]),
        chat_template=_template_name(fixture["template"]["INSTRUCTION"]),
    )


def fixture_config(**overrides: Any):
    """ChatRexConfig of the fixture model (Qwen2 LLM, tiny CLIP, tiny ConvNeXt, 112 / 256 px)."""
    from chatrex.model import ChatRexConfig

    kwargs = dict(_fixture_config_kwargs())
    kwargs.update(overrides)
    return ChatRexConfig(**kwargs)


def fixture_state_dict() -> dict[str, torch.Tensor]:
    """weights/model.safetensors as a reference-layout state dict (float32)."""
    return load_file(str(golden_root() / "weights" / "model.safetensors"))


def load_fixture_model(dtype: torch.dtype | None = None):
    """The fixture model loaded strictly through `from_reference_state_dict`, eval mode, float32 by default."""
    from chatrex.model import ChatRexForConditionalGeneration

    model = ChatRexForConditionalGeneration.from_reference_state_dict(fixture_state_dict(), fixture_config(), dtype=dtype)
    return model.eval()


@functools.lru_cache(maxsize=1)
def shared_fixture_model():
    """One fixture model per test session, for read-only use (do not change its weights or config)."""
    return load_fixture_model()


def load_fixture_tokenizer():
    """The fixture's fast tokenizer (vocab 504: base 400 + <obj0..99>, <ground>, </ground>, <objects>, </objects>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(golden_root() / "tokenizer"))


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(case json, case tensors). Tensors are fresh copies on every call (safe to pass to the model)."""
    root = golden_root() / "cases"
    return _json(root / f"{name}.json"), load_file(str(root / f"{name}.safetensors"))


def case_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs stored in a case (gt_boxes is absent for the 0-box case)."""
    keys = ("input_ids", "pixel_values", "pixel_values_aux", "gt_boxes")
    return {k: tensors[k].clone() for k in keys if k in tensors}


def unpack_int4_level(packed: torch.Tensor, channels: int, side: int) -> torch.Tensor:
    """roi_full_layout storage -> (1, C, S, S) float32: byte i holds v[2i] + 8 (low) and v[2i+1] + 8 (high)."""
    p = packed.to(torch.int16)
    v = torch.stack([(p & 15) - 8, (p >> 4) - 8], dim=1).reshape(1, channels, side, side)
    return v.to(torch.float32) * 0.25


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - b| / max|ref| (0 when both are all zero)."""
    expected = expected.to(torch.float64)
    diff = (actual.detach().to(torch.float64) - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, name: str, rel: float = REL_TOL) -> None:
    """Assert shapes match and max|a - b| <= rel * max|ref| (README §8)."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_rel_error(actual, expected)
    assert err <= rel, f"{name}: max|a-b| / max|ref| = {err:.3e} > {rel:.0e}"
