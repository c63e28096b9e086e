"""`ChatRexForConditionalGeneration`: CLIP + ConvNeXt towers, a RoI object encoder and any decoder-only LLM.

Module tree = the reference checkpoint layout (chatrex_reference.md §2): `model` (LLM body), `lm_head`,
`vision_tower.vision_tower` (CLIP), `vision_tower_aux` (ConvNeXt), `mm_projector`, `mm_object_projector`,
`box_encoder` (no parameters). The prompt's sentinels (-200 image, -300 object) are replaced by
vision embeddings in `prepare_inputs_embeds`; forward and generate share it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from chatrex.errors import TooManyBoxesError
from chatrex.model.checkpoint import load_reference_state_dict
from chatrex.model.configuration import ChatRexConfig
from chatrex.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX
from chatrex.model.convnext import ConvNextBlock, ConvNextTower
from chatrex.model.objects import MultiLevelRoIEncoder
from chatrex.model.vision import CLIPVisionTower, build_projector, fuse_image_features

LAYER_SCALE_INIT = 1e-6
# transformers renamed `past_key_values` to `cache` during 5.x; follow whichever this version uses.
_OUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_BASE_CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MM_KEYS = ("pixel_values", "pixel_values_aux", "gt_boxes", "num_boxes", "image_features", "object_features")


class ChatRexPreTrainedModel(PreTrainedModel):
    config_class = ChatRexConfig
    config: ChatRexConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "CLIPEncoderLayer", "ConvNextBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Older transformers versions stored CLIP's position ids in the state dict.
    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ConvNextBlock) and not getattr(module.ramma, "_is_hf_initialized", False):
            with torch.no_grad():
                module.ramma.fill_(LAYER_SCALE_INIT)


class ChatRexForConditionalGeneration(ChatRexPreTrainedModel, GenerationMixin):
    """ChatRex / RexSeek multimodal LLM. Inputs are what `ChatRexProcessor` produces:

    `input_ids` (B, L) with sentinels, left padded; `attention_mask` (B, L); `pixel_values` (B, 3, low, low);
    `pixel_values_aux` (B, 3, high, high); `gt_boxes` (B, Nmax, 4) float xyxy in high-res canvas pixels;
    `num_boxes` (B,) boxes used per row (optional). Precomputed `image_features` (B or 1, T, hidden) and
    `object_features` (list of (K_b, hidden)) may replace the pixel inputs.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ChatRexConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.model = AutoModel.from_config(config.text_config)
        self.lm_head = nn.Linear(hidden, config.text_config.vocab_size, bias=False)
        self.vision_tower = CLIPVisionTower(config.vision_config, config.vision_feature_layer)
        self.vision_tower_aux = ConvNextTower(config.convnext_dims, config.convnext_depths)
        self.mm_projector = build_projector(config.mm_hidden_size, hidden)
        self.mm_object_projector = build_projector(config.object_hidden_size, hidden)
        self.box_encoder = MultiLevelRoIEncoder(config.high_res_size)
        if getattr(config, "object_pointer", False):  # see ChatRexConfig: logit of <objK> += (W h) . m_K
            self.object_pointer = nn.Linear(hidden, hidden, bias=False)
        self._llm_cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.post_init()

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model

    @classmethod
    def from_reference_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], config: ChatRexConfig, dtype: torch.dtype | None = None
    ) -> "ChatRexForConditionalGeneration":
        """Build the model and load a reference-layout state dict strictly (no second random init).

        Keys go through `chatrex.model.checkpoint.reference_rename_table` (identity up to the installed
        CLIP's `vision_model.` level; CLIP's optional `position_ids` buffer is dropped). Missing / unexpected / wrong-shape keys raise `CheckpointError`
        with a readable report. `dtype` casts floating tensors; None keeps each stored dtype. Returns the
        model in eval mode on the device of the given tensors.
        """
        return load_reference_state_dict(cls, state_dict, config, dtype=dtype)

    # ------------------------------------------------------------------ vision encoders
    def encode_images(
        self, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, low, low) and (B, 3, high, high) -> (image tokens (B, T, hidden), 4 ConvNeXt maps).

        The maps feed `encode_objects`; cache both per image to ask many questions about it.
        """
        clip = self.vision_tower(pixel_values)  # (B, T, Dc)
        maps = self.encode_highres(pixel_values_aux)
        fused = fuse_image_features(clip, maps[-1])  # (B, T, Dc + Dx)
        return self.mm_projector(fused.to(self.mm_projector[0].weight.dtype)), maps

    def encode_highres(self, pixel_values_aux: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, high, high) -> the 4 ConvNeXt stage maps (B, C_i, high/4/2^i, high/4/2^i)."""
        stem = self.vision_tower_aux.vision_stem[0].weight
        return self.vision_tower_aux(pixel_values_aux.to(stem.dtype))

    def encode_objects(self, maps: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """ConvNeXt maps (B or 1 images) + B box tensors (K_b, 4) xyxy canvas px -> B tensors (K_b, hidden).

        With maps of one image and several box tensors, every box set is read from that one image.
        The box tensors are never modified.
        """
        counts = [int(b.reshape(-1, 4).shape[0]) for b in boxes]
        if maps[0].shape[0] == 1 and len(boxes) > 1:
            features = self.box_encoder(list(maps), [torch.cat([b.reshape(-1, 4) for b in boxes])])
        else:
            features = self.box_encoder(list(maps), list(boxes))  # (sum K, sum C) float32
        projector_dtype = self.mm_object_projector[0].weight.dtype
        return list(self.mm_object_projector(features.to(projector_dtype)).split(counts))

    # ------------------------------------------------------------------ sequence assembly
    def box_lists(self, gt_boxes: Any, num_boxes: torch.Tensor | None, batch: int) -> list[torch.Tensor]:
        """Normalize `gt_boxes` (None, (B, Nmax, 4) with optional `num_boxes`, or a list) to B (K_b, 4) tensors."""
        if gt_boxes is None:
            boxes = [torch.zeros(0, 4) for _ in range(batch)]
        elif isinstance(gt_boxes, torch.Tensor):
            if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4 or gt_boxes.shape[0] not in (batch, 0):
                raise ValueError(f"gt_boxes must be (B={batch}, Nmax, 4) xyxy, got {tuple(gt_boxes.shape)}")
            if gt_boxes.shape[0] == 0:
                boxes = [gt_boxes.new_zeros(0, 4) for _ in range(batch)]
            elif num_boxes is None:
                boxes = list(gt_boxes.unbind(0))
            else:
                boxes = [gt_boxes[b, : int(n)] for b, n in enumerate(num_boxes.reshape(-1).tolist())]
        else:
            boxes = [torch.as_tensor(b).reshape(-1, 4) for b in gt_boxes]
        if len(boxes) != batch:
            raise ValueError(f"got boxes for {len(boxes)} prompts but input_ids has {batch} rows")
        for b, rows in enumerate(boxes):
            if rows.shape[0] > self.config.max_objects:
                raise TooManyBoxesError(
                    f"prompt {b} has {rows.shape[0]} boxes but the model names at most {self.config.max_objects}; "
                    f"keep the {self.config.max_objects} highest-scoring boxes"
                )
        return boxes

    @staticmethod
    def check_object_counts(input_ids: torch.Tensor, counts: Sequence[int]) -> None:
        """Raise ValueError unless row b of `input_ids` has exactly counts[b] object sentinels (-300)."""
        sentinels = (input_ids == OBJECT_TOKEN_INDEX).sum(1).tolist()
        for b, (have, want) in enumerate(zip(sentinels, counts)):
            if have != want:
                raise ValueError(
                    f"prompt {b} has {have} object placeholders (<objfeat> / {OBJECT_TOKEN_INDEX}) but {want} boxes "
                    "were given; pass one box per placeholder (and num_boxes for padded batches)"
                )

    def multimodal_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_aux: torch.Tensor | None = None,
        gt_boxes: Any = None,
        num_boxes: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        object_features: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the encoders that are needed, then `prepare_inputs_embeds`. Counts are checked first."""
        return self._multimodal(input_ids, attention_mask, labels, pixel_values, pixel_values_aux, gt_boxes,
                                num_boxes, image_features, object_features)[:4]

    def _multimodal(self, input_ids, attention_mask, labels, pixel_values, pixel_values_aux, gt_boxes, num_boxes,
                    image_features, object_features) -> tuple:
        """`multimodal_embeddings` + the per-row object features it used (list of (K_b, hidden) or None)."""
        batch = input_ids.shape[0]
        has_image = bool((input_ids == IMAGE_TOKEN_INDEX).any())
        if object_features is None:
            boxes = self.box_lists(gt_boxes, num_boxes, batch)
            self.check_object_counts(input_ids, [b.shape[0] for b in boxes])
        else:
            boxes = None
        need_objects = boxes is not None and any(b.shape[0] for b in boxes)
        maps = None
        if image_features is None and has_image:
            if pixel_values is None or pixel_values_aux is None:
                raise ValueError("input_ids hold an image placeholder (-200): pass pixel_values and pixel_values_aux")
            image_features, maps = self.encode_images(pixel_values, pixel_values_aux)
        if need_objects:
            if maps is None:
                if pixel_values_aux is None:
                    raise ValueError("boxes were given without pixel_values_aux: pass it or object_features")
                maps = self.encode_highres(pixel_values_aux)
            object_features = self.encode_objects(maps, boxes)
        elif boxes is not None:
            object_features = [None] * batch
        return (*self.prepare_inputs_embeds(input_ids, attention_mask, image_features, object_features, labels),
                object_features)

    def pointer_memory(self, object_features: Sequence[torch.Tensor | None] | None) -> torch.Tensor | None:
        """Per-row object tokens (K_b, hidden) -> the memory of the pointer head / `object_in_index_token`
        (B, K_max, hidden), rows rescaled to unit RMS, zero rows past K_b (their `<objK>` get nothing added);
        None when the config uses neither, or without boxes. Pass it as `object_memory` to forward / generate
        when the prompt is given as `inputs_embeds` (the pipeline's cached prefix)."""
        if not self.uses_object_memory or not object_features:
            return None
        rows = [o for o in object_features if o is not None and o.shape[0] > 0]
        if not rows:
            return None
        ref = rows[0]
        width = max(o.shape[0] for o in rows)
        memory = ref.new_zeros(len(object_features), width, ref.shape[-1])
        for b, o in enumerate(object_features):
            if o is not None and o.shape[0] > 0:
                o = o.to(memory.dtype)
                memory[b, : o.shape[0]] = o * torch.rsqrt(o.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(o.dtype)
        return memory

    @property
    def uses_object_memory(self) -> bool:
        return bool(getattr(self.config, "object_pointer", False) or getattr(self.config, "object_in_index_token", False))

    def _object_offset(self) -> int:
        offset = self.config.object_token_offset
        if offset is None:
            raise ValueError("object_pointer / object_in_index_token need config.object_token_offset "
                             "(the token id of <obj0>)")
        return int(offset)

    def embed_text(self, input_ids: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, L, hidden) of sentinel-free ids (B, L); with `object_in_index_token` and a
        memory (`pointer_memory`), each `<objK>` (K < the row's boxes) gets box K's memory row added, rescaled
        to the token's own norm. For decoding steps and the pipeline's question tail; `prepare_inputs_embeds`
        does the same on full prompts (where a prefix index, followed by its object slot, gets nothing)."""
        text = self.get_input_embeddings()(input_ids)
        if memory is None or not getattr(self.config, "object_in_index_token", False):
            return text
        return self._add_objects_to_index_tokens(text, input_ids, memory, torch.ones_like(input_ids, dtype=torch.bool))

    def _add_objects_to_index_tokens(self, text: torch.Tensor, input_ids: torch.Tensor, memory: torch.Tensor,
                                     eligible: torch.Tensor) -> torch.Tensor:
        """text (B, L, hidden) + memory rows at the `<objK>` positions where `eligible` (B, L); see `embed_text`."""
        memory = memory.to(device=text.device, dtype=text.dtype)
        k = input_ids - self._object_offset()
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(input_ids)
        rows = rows.clamp(max=memory.shape[0] - 1)  # a memory of one row serves every row
        hit = eligible & (k >= 0) & (k < memory.shape[1])
        if not bool(hit.any()):
            return text
        add = memory[rows[hit], k[hit]]  # (n, hidden), RMS 1 (or 0 past the row's boxes)
        scale = text[hit].norm(dim=-1, keepdim=True) / add.shape[-1] ** 0.5
        text = text.clone()
        text[hit] = text[hit] + add * scale
        return text

    def _pointer_logits(self, logits: torch.Tensor, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """logits (B, T, V) + the pointer scores on the `<obj0>` .. `<obj{K-1}>` columns; hidden (B, T, hidden)
        final (normed) states; memory (B or 1, K, hidden) from `pointer_memory`."""
        offset = self._object_offset()
        memory = memory.to(device=hidden.device, dtype=hidden.dtype)
        k = min(memory.shape[1], self.config.max_objects)
        scores = self.object_pointer(hidden) @ memory[:, :k].transpose(1, 2) / hidden.shape[-1] ** 0.5  # (B, T, K)
        pad = (offset, logits.shape[-1] - offset - k)
        return logits + F.pad(scores.to(logits.dtype), pad)

    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        object_features: Sequence[torch.Tensor | None] | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace sentinels by vision embeddings, re-padding on the LEFT to the longest merged row.

        input_ids (B, L): each row has at most one -200 (-> all T rows of image_features[b], or of
        image_features[0] when it holds one image) and K_b -300 (-> object_features[b][k] in order).
        Returns inputs_embeds (B, E, hidden), attention_mask (B, E), position_ids (B, E) =
        cumsum(mask) - 1 clamped at 0 (a padded row gets the numbers of the unpadded one), and labels
        (B, E) with IGNORE_INDEX at image / object / padding positions (None when labels is None).
        """
        batch, length = input_ids.shape
        device = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        is_img, is_obj = input_ids == IMAGE_TOKEN_INDEX, input_ids == OBJECT_TOKEN_INDEX
        is_text = ~(is_img | is_obj)
        n_img = is_img.sum(1)
        if bool((n_img > 1).any()):
            raise ValueError(f"one image placeholder (-200) per prompt is supported, got {n_img.tolist()}")
        objects = [o for o in (object_features or []) if o is not None and o.shape[0] > 0]
        self.check_object_counts(input_ids, [0 if o is None else o.shape[0] for o in (object_features or [None] * batch)])
        if bool(n_img.any()) and image_features is None:
            raise ValueError("input_ids hold an image placeholder (-200) but no image features were given")
        tokens = image_features.shape[1] if image_features is not None else 1

        embed = self.get_input_embeddings()
        text = embed(input_ids.masked_fill(~is_text, 0))  # (B, L, hidden); sentinel rows are overwritten
        if objects and getattr(self.config, "object_in_index_token", False):
            before_slot = torch.zeros_like(is_obj)
            before_slot[:, :-1] = is_obj[:, 1:]  # a prefix index token: its slot follows it
            text = self._add_objects_to_index_tokens(text, input_ids, self.pointer_memory(object_features),
                                                     is_text & ~before_slot)
        start, merged = merged_slots(input_ids, tokens)
        rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, length)

        embeds = text.new_zeros(batch, merged, text.shape[-1])
        embeds[rows[is_text], start[is_text]] = text[is_text]
        if objects:
            embeds[rows[is_obj], start[is_obj]] = torch.cat(objects).to(device=device, dtype=text.dtype)
            if getattr(self.config, "index_in_object_slot", False):
                self._add_index_to_slots(embeds, input_ids, is_obj, start, text)
        new_mask = mask.new_zeros(batch, merged)
        new_mask[rows[~is_img], start[~is_img]] = mask[~is_img]
        if bool(n_img.any()):
            img_rows = rows[is_img]  # (n,) rows that have an image, in order
            slots = start[is_img].unsqueeze(1) + torch.arange(tokens, device=device)  # (n, T)
            source = image_features if image_features.shape[0] == batch else image_features.expand(batch, -1, -1)
            feats = source.to(device=device, dtype=text.dtype)[img_rows]  # (n, T, hidden)
            embeds[img_rows.unsqueeze(1).expand_as(slots), slots] = feats
            new_mask[img_rows.unsqueeze(1).expand_as(slots), slots] = 1
        position_ids = (new_mask.long().cumsum(1) - 1).clamp(min=0)
        new_labels = None
        if labels is not None:
            new_labels = torch.full((batch, merged), IGNORE_INDEX, dtype=labels.dtype, device=device)
            keep = is_text & mask.bool()
            new_labels[rows[keep], start[keep]] = labels.to(device)[keep]
        return embeds, new_mask, position_ids, new_labels

    @staticmethod
    def _add_index_to_slots(embeds: torch.Tensor, input_ids: torch.Tensor, is_obj: torch.Tensor,
                            start: torch.Tensor, text: torch.Tensor) -> None:
        """config.index_in_object_slot: slot += embedding of the text token just before it (its `<objK>`),
        rescaled to the slot's own norm, so the index is as loud as the features (object features were
        measured at ~10x the norm of a token embedding, which drowned the index).

        embeds (B, E, hidden) merged, in place; is_obj / start / text (B, L[, hidden]) in input positions.
        A slot at the start of a row or after another sentinel gets nothing added.
        """
        rows, cols = torch.nonzero(is_obj, as_tuple=True)
        prev = (cols - 1).clamp(min=0)
        ok = (cols > 0) & (input_ids[rows, prev] >= 0)
        rows, cols, prev = rows[ok], cols[ok], prev[ok]
        feats, index = embeds[rows, start[rows, cols]], text[rows, prev]  # (n, hidden) each
        scale = feats.norm(dim=-1, keepdim=True) / index.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        embeds[rows, start[rows, cols]] = feats + index * scale

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_aux: torch.Tensor | None = None,
        gt_boxes: torch.Tensor | None = None,
        num_boxes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        image_features: torch.Tensor | None = None,
        object_features: Sequence[torch.Tensor] | None = None,
        cache: Any = None,
        logits_to_keep: int | torch.Tensor = 0,
        object_memory: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (B, E, vocab) for the merged sequence; `loss` when `labels` (input_ids layout) are given.

        object_memory: the pointer head's memory (`pointer_memory`) when the boxes are not in this call
        (decoding steps, a cached prefix); built from this call's object tokens otherwise."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None and input_ids is not None and bool((input_ids < 0).any()):
            inputs_embeds, attention_mask, merged_positions, labels, objects = self._multimodal(
                input_ids, attention_mask, labels, pixel_values, pixel_values_aux, gt_boxes, num_boxes,
                image_features, object_features,
            )
            if object_memory is None:
                object_memory = self.pointer_memory(objects)
            input_ids = None
            position_ids = merged_positions if position_ids is None else position_ids
        elif inputs_embeds is None and object_memory is not None and getattr(self.config, "object_in_index_token", False):
            inputs_embeds, input_ids = self.embed_text(input_ids, object_memory), None  # a decoding step
        kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, use_cache=use_cache, return_dict=True, **{self._llm_cache_kw: cache}, **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        if object_memory is not None and getattr(self.config, "object_pointer", False):
            logits = self._pointer_logits(logits, hidden[:, keep, :], object_memory)
        loss = None
        if labels is not None:
            # Position t predicts token t + 1; float32 for a stable softmax under bf16.
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **{_OUT_CACHE: getattr(outputs, _BASE_CACHE, None)},
        )

    @torch.no_grad()
    def generate(self, inputs: Any = None, gen_config: Any = None, tokenizer: Any = None, **kwargs: Any) -> Any:
        """Greedy / sampled decoding over the merged prompt; returns the NEW token ids (B, n).

        `model.generate(**processor_outputs, max_new_tokens=..., do_sample=False, eos_token_id=..., pad_token_id=...)`
        -> ids. Seed-compatible `model.generate(inputs_dict, gen_config=GenerationConfig(...), tokenizer=tok)`
        -> the decoded answer (str; a list for B > 1): special tokens kept without spaces around them,
        stripped, a trailing EOS removed. The prompt embeddings are built once; then the KV cache runs.
        """
        seed_call = isinstance(inputs, Mapping)
        if seed_call:
            kwargs = {**inputs, **kwargs}
        elif inputs is not None:
            kwargs["input_ids"] = inputs
        if gen_config is not None:
            kwargs["generation_config"] = gen_config
        mm = {key: kwargs.pop(key, None) for key in _MM_KEYS}
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is not None and kwargs.get("inputs_embeds") is None:
            device = self.get_input_embeddings().weight.device
            embeds, mask, _, _, objects = self._multimodal(
                input_ids.to(device), kwargs.pop("attention_mask", None), None,
                **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in mm.items()},
            )
            kwargs["inputs_embeds"], kwargs["attention_mask"] = embeds, mask
            memory = self.pointer_memory(objects)
            if memory is not None and kwargs.get("object_memory") is None:
                kwargs["object_memory"] = memory  # generate hands it to every decoding step's forward
        if seed_call and tokenizer is not None:
            _fill_special_ids(kwargs, tokenizer)
        elif tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        output = super().generate(**kwargs)
        if not (seed_call and tokenizer is not None):
            return output
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        texts = [decode_answer(tokenizer, row) for row in sequences.tolist()]
        return texts[0] if len(texts) == 1 else texts


def _fill_special_ids(kwargs: dict, tokenizer: Any) -> None:
    """Seed calls give only a GenerationConfig: take EOS / pad from the tokenizer when it leaves them unset
    (set on a copy of the config; transformers warns when a config and loose ids are mixed)."""
    config = kwargs.get("generation_config")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if config is None:
        for key, value in (("eos_token_id", eos), ("pad_token_id", pad)):
            if kwargs.get(key) is None and value is not None:
                kwargs[key] = value
        return
    config = copy.deepcopy(config)
    for key, value in (("eos_token_id", eos), ("pad_token_id", pad)):
        if kwargs.get(key) is not None:
            setattr(config, key, kwargs.pop(key))
        elif getattr(config, key, None) is None and value is not None:
            setattr(config, key, value)
    kwargs["generation_config"] = config


def merged_slots(input_ids: torch.Tensor, image_tokens: int) -> tuple[torch.Tensor, int]:
    """Where each input position lands once the image sentinel (-200) becomes `image_tokens` embeddings.

    input_ids (B, L) -> (start (B, L): the first merged slot of every input position, rows shifted right so
    shorter rows are left padded; merged length E). Object sentinels and text take one slot each.
    """
    width = torch.where(input_ids == IMAGE_TOKEN_INDEX, image_tokens, 1)
    lengths = width.sum(1)
    merged = int(lengths.max())
    return (merged - lengths).unsqueeze(1) + width.cumsum(1) - width, merged


def decode_answer(tokenizer: Any, ids: Sequence[int]) -> str:
    """New ids -> answer text: cut at the first EOS, keep special tokens (no spaces around them), strip."""
    eos = tokenizer.eos_token_id
    ids = list(ids)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    try:
        text = tokenizer.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False)
    except TypeError:  # tokenizers that do not take the spacing option
        text = tokenizer.decode(ids, skip_special_tokens=False)
    text = text.strip()
    eos_text = tokenizer.eos_token
    if eos_text and text.endswith(eos_text):
        text = text[: -len(eos_text)].rstrip()
    return text


__all__ = ["ChatRexForConditionalGeneration", "ChatRexPreTrainedModel", "decode_answer", "merged_slots"]
