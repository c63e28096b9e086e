"""`ChatRexConfig`: the transformers-facing config of the ChatRex / RexSeek multimodal LLM.

It nests two ordinary transformers configs (any decoder-only LLM as `text_config`, a CLIP vision
config as `vision_config`) plus the few sizes of the ConvNeXt tower and the two image resolutions.
Presets: `ChatRexConfig.from_name("chatrex-7b" | "rexseek-3b" | "tiny")`.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import CLIPVisionConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

from chatrex.errors import ConfigError
from chatrex.model.constants import MAX_OBJECTS

# Total stride of the ConvNeXt trunk's last stage (stem /4, then three /2 downsamples).
CONVNEXT_STRIDE = 32
CHAT_TEMPLATES = ("vicuna", "chatml")

_CLIP_L_336 = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=768,
)
_CONVNEXT_L = dict(convnext_dims=[192, 384, 768, 1536], convnext_depths=[3, 3, 27, 3])

PRESETS: dict[str, dict[str, Any]] = {
    # Vicuna-7B v1.5 + CLIP ViT-L/14-336 + LAION ConvNeXt-L (chatrex_reference.md §2).
    "chatrex-7b": dict(
        text_config=dict(
            model_type="llama", vocab_size=32104, hidden_size=4096, intermediate_size=11008,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=_CLIP_L_336, low_res_size=336, high_res_size=768, chat_template="vicuna", **_CONVNEXT_L,
    ),
    # Qwen2.5-3B (151665 tokens + 104 added fit in its 151936 embedding rows) + the same towers.
    "rexseek-3b": dict(
        text_config=dict(
            model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
            num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, hidden_act="silu",
            rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
            bos_token_id=151643, eos_token_id=151645,
        ),
        vision_config=_CLIP_L_336, low_res_size=336, high_res_size=768, chat_template="chatml", **_CONVNEXT_L,
    ),
    # Fixture-like sizes: fast random-weight tests and the embedded demo model.
    "tiny": dict(
        text_config=dict(
            model_type="llama", vocab_size=504, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=112, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            projection_dim=32,
        ),
        convnext_dims=[8, 16, 32, 64], convnext_depths=[1, 1, 2, 1], low_res_size=112, high_res_size=256,
        chat_template="vicuna",
    ),
}

# Flat LLaVA-style fields that mark an official ChatRex/RexSeek config.json.
_OFFICIAL_MARKERS = ("mm_hidden_size", "mm_vision_tower")
# Derived read-only properties: never stored, so dropped if a config file carries them.
_DERIVED = ("num_image_tokens", "mm_hidden_size", "object_hidden_size", "hidden_size", "patch_size")


def _as_config(value: Any, default_type: str, what: str) -> PretrainedConfig:
    """Turn a dict (with or without `model_type`) or a config object into a transformers config."""
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a dict or a transformers config, got {type(value).__name__}")
    value = dict(value)
    model_type = value.pop("model_type", default_type)
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{what}: unknown model_type {model_type!r}; use one transformers knows (e.g. 'llama', 'qwen2')")
    return CONFIG_MAPPING[model_type](**value)


class ChatRexConfig(PretrainedConfig):
    """Config of `ChatRexForConditionalGeneration`.

    Args:
        text_config: config (dict or object) of a decoder-only LLM (`model_type` "llama", "qwen2", ...).
        vision_config: CLIP vision config (dict or `CLIPVisionConfig`); `image_size` must equal `low_res_size`.
        convnext_dims / convnext_depths: the 4 stage widths / block counts of the high-res ConvNeXt tower.
        low_res_size: CLIP input side (pixels). high_res_size: ConvNeXt input side = box canvas side (pixels).
        vision_feature_layer: which CLIP hidden state feeds the projector (-2 = second to last).
        max_objects: most boxes per prompt (vocabulary has <obj0>..<obj{max_objects-1}>).
        chat_template: "vicuna", "chatml", or a format string containing "{input}".
        index_in_object_slot: add the embedding of the token before each object slot (its `<objK>`),
            rescaled to the slot's norm, to the slot's features. Off for the official models; the embedded tiny model uses it, because a small
            from-scratch LLM does not learn the two-hop "find the box, read the index before it" in a CPU budget
            (benchmarks/binding_toy.py), while with the index at the slot one content match suffices.
        object_pointer: a pointer head (`object_pointer.weight`, hidden x hidden) adds to the logit of each
            `<objK>` the score (W h_t) . m_K / sqrt(hidden) of the final hidden state h_t against box K's object
            token m_K (rescaled to unit RMS). Answering with box indices becomes one match per box, as in a
            DETR-style classifier, instead of an attention circuit the LLM must discover. Off for the official
            models; the embedded tiny model uses it (`benchmarks/binding_probe.py` measures why).
        object_in_index_token: every `<objK>` text token that is not a prefix index (not followed by an
            object slot) - the question's "<obj3>", an answer's "<obj3>" read back while decoding - gets box K's
            object token added (unit RMS, rescaled to the token's norm), so "what is <obj3>?" is answered by
            copying from the question token instead of finding slot 3 first. Off for the official models.
        object_token_offset: the token id of `<obj0>` (the `<objK>` ids must be contiguous); needed by
            `object_pointer` and `object_in_index_token`.
    """

    model_type = "chatrex"
    # Overrides the base classproperty: tells transformers which attributes are nested configs
    # (attention implementation and dtype are dispatched to them).
    sub_configs = {"text_config": AutoConfig, "vision_config": CLIPVisionConfig}

    def __init__(
        self,
        text_config: dict | PretrainedConfig | None = None,
        vision_config: dict | PretrainedConfig | None = None,
        convnext_dims: list[int] | None = None,
        convnext_depths: list[int] | None = None,
        low_res_size: int | None = None,
        high_res_size: int | None = None,
        vision_feature_layer: int = -2,
        max_objects: int = MAX_OBJECTS,
        chat_template: str = "vicuna",
        index_in_object_slot: bool = False,
        object_pointer: bool = False,
        object_in_index_token: bool = False,
        object_token_offset: int | None = None,
        **kwargs: Any,
    ) -> None:
        if text_config is None and any(k in kwargs for k in _OFFICIAL_MARKERS):
            # A flat LLaVA-style config.json of the official release: the converter maps it.
            from chatrex.model.convert import chatrex_kwargs_from_official

            flat = dict(kwargs, vision_feature_layer=vision_feature_layer, max_objects=max_objects)
            converted = dict(chatrex_kwargs_from_official(flat))
            self.__init__(**{k: v for k, v in converted.items() if k not in _DERIVED})
            return
        tiny = PRESETS["tiny"]
        # transformers builds configs with no arguments in places: fall back to the tiny sizes.
        text_config = copy.deepcopy(tiny["text_config"]) if text_config is None else text_config
        vision_config = copy.deepcopy(tiny["vision_config"]) if vision_config is None else vision_config
        self.text_config = _as_config(text_config, "llama", "text_config")
        self.vision_config = _as_config(vision_config, "clip_vision_model", "vision_config")
        self.convnext_dims = [int(d) for d in (convnext_dims or tiny["convnext_dims"])]
        self.convnext_depths = [int(d) for d in (convnext_depths or tiny["convnext_depths"])]
        self.low_res_size = int(low_res_size if low_res_size is not None else self.vision_config.image_size)
        self.high_res_size = int(high_res_size if high_res_size is not None else self._default_high_res())
        self.vision_feature_layer = int(vision_feature_layer)
        self.max_objects = int(max_objects)
        self.chat_template = chat_template
        self.index_in_object_slot = bool(index_in_object_slot)
        self.object_pointer = bool(object_pointer)
        self.object_in_index_token = bool(object_in_index_token)
        self.object_token_offset = None if object_token_offset is None else int(object_token_offset)
        for key in _DERIVED:
            kwargs.pop(key, None)
        # The top-level flag decides whether `lm_head.weight` is tied to the input embeddings.
        kwargs.setdefault("tie_word_embeddings", bool(getattr(self.text_config, "tie_word_embeddings", False)))
        super().__init__(**kwargs)
        self.validate_chatrex()

    def _default_high_res(self) -> int:
        # The ConvNeXt last stage must give the same grid as CLIP's patches.
        return (self.low_res_size // self.vision_config.patch_size) * CONVNEXT_STRIDE

    # ------------------------------------------------------------------ derived sizes
    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Image embeddings per prompt: (low_res_size // patch_size) ** 2."""
        return (self.low_res_size // self.patch_size) ** 2

    @property
    def mm_hidden_size(self) -> int:
        """Width of one fused image token before `mm_projector`: CLIP hidden + last ConvNeXt width."""
        return int(self.vision_config.hidden_size) + self.convnext_dims[-1]

    @property
    def object_hidden_size(self) -> int:
        """Width of one object feature before `mm_object_projector`: sum of the ConvNeXt widths."""
        return sum(self.convnext_dims)

    @property
    def hidden_size(self) -> int:
        """Hidden size of the LLM (the width of every embedding it receives)."""
        return int(self.text_config.hidden_size)

    # ------------------------------------------------------------------ validation
    def validate_chatrex(self) -> None:
        """Raise `ConfigError` when the sizes cannot fit together."""
        if len(self.convnext_dims) != 4 or len(self.convnext_depths) != 4:
            raise ConfigError(
                f"convnext_dims and convnext_depths need 4 entries each (one per stage), got "
                f"{self.convnext_dims} and {self.convnext_depths}"
            )
        if min(self.convnext_dims) <= 0 or min(self.convnext_depths) <= 0:
            raise ConfigError(f"ConvNeXt widths and depths must be positive: {self.convnext_dims}, {self.convnext_depths}")
        patch = self.patch_size
        if self.low_res_size <= 0 or self.low_res_size % patch:
            raise ConfigError(f"low_res_size {self.low_res_size} must be a positive multiple of the CLIP patch size {patch}")
        if int(self.vision_config.image_size) != self.low_res_size:
            raise ConfigError(
                f"vision_config.image_size ({self.vision_config.image_size}) must equal low_res_size "
                f"({self.low_res_size}): CLIP has one position embedding per patch"
            )
        if self.high_res_size <= 0 or self.high_res_size % CONVNEXT_STRIDE:
            raise ConfigError(f"high_res_size {self.high_res_size} must be a positive multiple of {CONVNEXT_STRIDE}")
        if self.high_res_size // CONVNEXT_STRIDE != self.low_res_size // patch:
            raise ConfigError(
                f"the ConvNeXt grid ({self.high_res_size}/{CONVNEXT_STRIDE} = {self.high_res_size // CONVNEXT_STRIDE}) must "
                f"equal the CLIP grid ({self.low_res_size}/{patch} = {self.low_res_size // patch}) so tokens can be "
                f"concatenated; set high_res_size={self._default_high_res()}"
            )
        self._validate_rest()

    def _validate_rest(self) -> None:
        layers = int(self.vision_config.num_hidden_layers)
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ConfigError(
                f"vision_feature_layer {self.vision_feature_layer} is outside the {layers + 1} CLIP hidden states"
            )
        if not 0 <= self.max_objects <= MAX_OBJECTS:
            raise ConfigError(f"max_objects must be in 0..{MAX_OBJECTS} (object tokens in the vocabulary), got {self.max_objects}")
        template = self.chat_template
        if not isinstance(template, str) or (template not in CHAT_TEMPLATES and "{input}" not in template):
            raise ConfigError(
                f"chat_template must be one of {CHAT_TEMPLATES} or a format string containing '{{input}}', got {template!r}"
            )
        offset, vocab = self.object_token_offset, int(getattr(self.text_config, "vocab_size", 0) or 0)
        if offset is not None and not (0 <= offset and (not vocab or offset + self.max_objects <= vocab)):
            raise ConfigError(f"object_token_offset {offset} + max_objects {self.max_objects} does not fit the "
                              f"LLM vocabulary of {vocab}; set it to the token id of <obj0>")
        if getattr(self.text_config, "is_encoder_decoder", False):
            raise ConfigError(f"text_config must be a decoder-only LLM, got {self.text_config.model_type!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ChatRexConfig":
        """A named preset ("chatrex-7b", "rexseek-3b", "tiny"); keyword overrides replace preset fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown ChatRex preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["ChatRexConfig", "PRESETS", "CONVNEXT_STRIDE"]
