"""`ChatRex`: the task-level API (detect, refer, caption regions, caption images, grounded chat).

    from chatrex.pipeline import ChatRex
    rex = ChatRex.from_pretrained(mllm="checkpoints/chatrex", upn="checkpoints/upn/upn_large.pth")
    result = rex.detect("photo.jpg", ["person", "pigeon"])   # DetectionResult, boxes xyxy px

When no boxes are given, UPN proposes them (fine-grained for detection/captions, coarse-grained for
chat; min score 0.3, NMS 0.8). Box k of the result's `boxes` is the model's `<objk>`.

Caching (per image content hash, LRU-bounded): the UPN proposals, the vision features (CLIP +
ConvNeXt maps), and the encoded prompt prefix — the merged embeddings of
``BOS + "USER: " + <image tokens> + "\\n<obj0>" + <object token> ...`` up to the last object, plus
the LLM's KV cache over it. Every question about the same image and box set then only encodes and
prefills its own text. The prefix is the same for any question and any chat history because the
image/object block always opens the first user turn (see `ChatRexProcessor.build_prompt`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatrex import embedded, prompts
from chatrex.errors import MissingWeightsError, TooManyBoxesError
from chatrex.images import ImageInput, load_image
from chatrex.constants import IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX
from chatrex.pipeline_cache import LRUCache, boxes_key, image_key
from chatrex.results import (
    NO_BOXES,
    USER_BOXES,
    ChatResult,
    ChatRexResult,
    DetectionResult,
    InputBoxes,
    RegionCaption,
    RegionCaptionResult,
    Timing,
    build_detections,
    region_caption_text,
)

FINE = "fine_grained_prompt"
COARSE = "coarse_grained_prompt"


@dataclass(frozen=True)
class ProposalSettings:
    """How UPN boxes are made when the caller gives none."""

    prompt_type: str = FINE
    min_score: float = 0.3
    nms_iou: float = 0.8


@dataclass
class _ImageState:
    """Vision features of one image: image tokens (1, T, hidden) and the 4 ConvNeXt maps."""

    features: torch.Tensor
    maps: list[torch.Tensor]
    size: tuple[int, int]


@dataclass
class _PrefixState:
    """Encoded prompt prefix of one (image, box set): ids up to the last sentinel, their merged
    embeddings (1, P, hidden), the LLM KV cache over them (None when KV caching is off), and the box memory
    (1, K, hidden) of `model.pointer_memory` (None for models with neither `object_pointer` nor
    `object_in_index_token`)."""

    ids: list[int]
    embeds: torch.Tensor
    kv: Any
    memory: torch.Tensor | None = None


class ChatRex:
    """UPN + ChatRex MLLM behind one object, with per-image caching.

    Args:
        model: a `ChatRexForConditionalGeneration` (device and dtype come from its weights).
        processor: the matching `ChatRexProcessor`.
        upn: a `UPNPredictor`, or None (then every call needs `boxes=`).
        max_new_tokens: generation budget per answer (greedy decoding).
        cache_size: images whose proposals / features are kept (LRU); 0 disables caching.
        prefix_cache_size: (image, box set) prompt prefixes kept with their KV cache (they are large:
            ~0.5 GB each for a 7B model in bf16); 0 disables prefix caching.
    """

    def __init__(self, model: Any, processor: Any, upn: Any = None, *, max_new_tokens: int = 512,
                 cache_size: int = 4, prefix_cache_size: int = 2, kv_cache: bool = True) -> None:
        self.model = model.eval()
        self.processor = processor
        self.upn = upn
        self.max_new_tokens = int(max_new_tokens)
        self.kv_cache = kv_cache
        self.max_objects = int(getattr(model.config, "max_objects", 100))
        self._proposals: LRUCache = LRUCache(cache_size * 2)
        self._images: LRUCache[_ImageState] = LRUCache(cache_size)
        self._prefixes: LRUCache[_PrefixState] = LRUCache(prefix_cache_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, mllm: str | Path | None = None, upn: str | Path | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None, *,
                        upn_config: str = "large", upn_options: dict[str, Any] | None = None,
                        **kwargs: Any) -> "ChatRex":
        """Load a ChatRex model folder and (optionally) a UPN checkpoint.

        Args:
            mllm: folder with config.json, tokenizer files and safetensors weights (official ChatRex-7B
                layout or ours). None: the embedded tiny model, when the package ships one.
            upn: UPN checkpoint (.pth / state dict / .safetensors). None: no proposals (pass boxes).
            device: torch device; default: an available accelerator, else CPU.
            dtype: LLM dtype ("bf16", "fp32", torch dtype); default bf16. UPN always runs in fp32.
            upn_config: UPN size preset of the checkpoint ("large", "small", "tiny").
            upn_options: extra `UPNPredictor` settings, e.g. {"short": 800, "max_size": 1333}.
            **kwargs: forwarded to `ChatRex(...)` (max_new_tokens, cache_size, ...).
        Raises:
            MissingWeightsError: nothing given and no embedded model; CheckpointError on bad weights.
        """
        from chatrex.model.loading import load_chatrex
        from chatrex.upn.predictor import UPNPredictor, default_device

        if mllm is None:  # the embedded tiny pair (package data), trained on the synthetic shapes world
            mllm = embedded.mllm_dir()
            found = embedded.upn() if upn is None else None
            if found is not None:
                upn, upn_config = found.weights, found.config
                upn_options = {**found.predictor_options, **(upn_options or {})}
            if mllm is not None:
                embedded.announce()
                if dtype is None:
                    dtype = torch.float32  # tiny: speed is no issue, and eval numbers were measured in fp32
        if mllm is None:
            raise MissingWeightsError(
                "no ChatRex model given and this build bundles no tiny model; pass "
                "mllm='path/to/ChatRex-7B' (a folder with config.json, tokenizer and *.safetensors, e.g. "
                "`git clone https://huggingface.co/IDEA-Research/ChatRex-7B`) and upn='path/to/upn_large.pth'"
            )
        device = torch.device(device) if device is not None else default_device()
        model, processor = load_chatrex(mllm, dtype=dtype if dtype is not None else torch.bfloat16, device=device)
        if processor is None:
            raise MissingWeightsError(f"{mllm} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                                      "copy them from the original model folder")
        predictor = None
        if upn is not None:
            if not Path(str(upn)).is_file():
                raise MissingWeightsError(f"UPN checkpoint not found: {upn}; download upn_large.pth from the "
                                          "ChatRex release and pass its path")
            predictor = UPNPredictor.from_checkpoint(upn, config=upn_config, device=device, **(upn_options or {}))
        return cls(model, processor, predictor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_cache(self) -> None:
        """Drop every cached proposal set, image feature and prompt prefix."""
        for cache in (self._proposals, self._images, self._prefixes):
            cache.clear()

    # ------------------------------------------------------------------ tasks
    def detect(self, image: ImageInput, categories: Sequence[str] | str, boxes: Any = None, *,
               proposals: ProposalSettings | None = None, max_new_tokens: int | None = None) -> DetectionResult:
        """Find `categories` (a list, or one "a; b" string) among the boxes.

        With `boxes=None`, fine-grained UPN proposals (min score 0.3, NMS 0.8 unless `proposals` says
        otherwise) are the candidates. Returns a `DetectionResult`: one `Detection(category, box xyxy px,
        score, index)` per (category, selected box); score = proposal score, 1.0 for user boxes.
        """
        cats = prompts.join_targets(categories).split("; ")
        return self._detect_like("detect", image, prompts.detection_prompt(cats), cats, boxes, proposals,
                                 max_new_tokens)

    def refer(self, image: ImageInput, expression: str, boxes: Any = None, *,
              proposals: ProposalSettings | None = None, max_new_tokens: int | None = None) -> DetectionResult:
        """Find the object(s) a referring expression describes; detections carry `category=expression`."""
        question = prompts.referring_prompt(expression)
        return self._detect_like("refer", image, question, [expression.strip()], boxes, proposals, max_new_tokens)

    def caption_region(self, image: ImageInput, boxes: Any, style: str = "category", *,
                       max_new_tokens: int | None = None) -> RegionCaptionResult:
        """One caption per box (xyxy px of `image`), in `style` "category" | "short" | "brief" | "sentence".

        All boxes are in every prompt (box k is <objk>); the image is encoded once for all of them.
        """
        if style not in prompts.REGION_STYLES:
            raise ValueError(f"unknown caption style {style!r}; choose one of {sorted(prompts.REGION_STYLES)}")
        start = time.perf_counter()
        img = load_image(image)
        inputs = self._user_boxes(boxes)
        if len(inputs) == 0:
            raise ValueError("caption_region needs at least one box [x1, y1, x2, y2] (pixels of the image)")
        regions, questions, vision_s, gen_s, hit = [], [], 0.0, 0.0, True
        for k in range(len(inputs)):
            question = prompts.region_prompt(k, style)
            raw, timing = self._run(img, question, inputs, None, max_new_tokens)
            answer = self._parse(raw, inputs)
            regions.append(RegionCaption(k, list(inputs.boxes[k]), region_caption_text(answer, k), raw, answer))
            questions.append(question)
            vision_s, gen_s, hit = vision_s + timing[0], gen_s + timing[1], hit and timing[2]
        total = time.perf_counter() - start
        return RegionCaptionResult(style, regions, inputs, img.size,
                                   Timing(0.0, vision_s, gen_s, total, hit), questions)

    def caption_image(self, image: ImageInput, detailed: bool = False, boxes: Any = None, *,
                      proposals: ProposalSettings | None = None,
                      max_new_tokens: int | None = None) -> ChatRexResult:
        """Grounded caption (brief one sentence, or detailed); `result.phrases` maps phrases to boxes."""
        return self._ask("caption_image", image, prompts.caption_prompt(detailed), boxes,
                         proposals or ProposalSettings(FINE), None, max_new_tokens)[0]

    def chat(self, image: ImageInput, question: str, history: Sequence[tuple[str, str]] | None = None,
             boxes: Any = None, *, proposals: ProposalSettings | None = None,
             max_new_tokens: int | None = None) -> ChatResult:
        """Grounded conversation turn. Prefixes "Answer the question in grounded format. " and uses
        coarse-grained proposals by default. Pass `result.history` back as `history` for the next turn;
        features, proposals and the prompt prefix of the image are reused from the cache."""
        sent = prompts.conversation_prompt(question)
        settings = proposals or ProposalSettings(COARSE)
        history = [(str(q), str(a)) for q, a in (history or [])]
        base, _ = self._ask("chat", image, sent, boxes, settings, history, max_new_tokens)
        return ChatResult(**_fields(base), history=[*history, (sent, base.raw)])

    def ask(self, image: ImageInput, question: str, boxes: Any = None, *,
            history: Sequence[tuple[str, str]] | None = None, proposals: ProposalSettings | None = None,
            max_new_tokens: int | None = None) -> ChatRexResult:
        """Send `question` as is (no task prompt); fine-grained proposals unless boxes are given."""
        return self._ask("ask", image, question, boxes, proposals or ProposalSettings(FINE),
                         [(str(q), str(a)) for q, a in (history or [])], max_new_tokens)[0]

    # ------------------------------------------------------------------ shared steps
    def _detect_like(self, task: str, image: ImageInput, question: str, categories: list[str], boxes: Any,
                     proposals: ProposalSettings | None, max_new_tokens: int | None) -> DetectionResult:
        base, found = self._ask(task, image, question, boxes, proposals or ProposalSettings(FINE), None,
                                max_new_tokens)
        detections, warnings = build_detections(base.answer, categories, base.boxes)
        fields = _fields(base)
        fields["warnings"] = [*fields["warnings"], *warnings]
        return DetectionResult(**fields, categories=categories, detections=detections,
                               proposals=found)

    def _ask(self, task: str, image: ImageInput, question: str, boxes: Any, settings: ProposalSettings,
             history: list[tuple[str, str]] | None, max_new_tokens: int | None) -> tuple[ChatRexResult, Any]:
        """One question → (result, the UPN `Proposals` used or None)."""
        start = time.perf_counter()
        img = load_image(image)
        key = image_key(img)
        t0 = time.perf_counter()
        inputs, warnings, found = self._resolve_boxes(img, key, boxes, settings)
        proposals_s = time.perf_counter() - t0 if boxes is None else 0.0
        raw, (vision_s, gen_s, hit) = self._run(img, question, inputs, history, max_new_tokens, key)
        timing = Timing(proposals_s, vision_s, gen_s, time.perf_counter() - start, hit)
        answer = self._parse(raw, inputs)
        return ChatRexResult(task, question, raw, answer, inputs, img.size, timing, warnings), found

    def _parse(self, raw: str, inputs: InputBoxes):
        from chatrex.grounding import parse_answer

        return parse_answer(raw, inputs.boxes)

    def _user_boxes(self, boxes: Any) -> InputBoxes:
        from chatrex.model.processing import as_box_array

        arr = as_box_array(boxes, "boxes")
        if len(arr) > self.max_objects:
            raise TooManyBoxesError(
                f"{len(arr)} boxes given but the model names at most {self.max_objects} (<obj0>..<obj"
                f"{self.max_objects - 1}>); pass at most {self.max_objects} boxes"
            )
        return InputBoxes([[float(v) for v in b] for b in arr.tolist()], [1.0] * len(arr), USER_BOXES)

    def _resolve_boxes(self, img, key: str, boxes: Any,
                       settings: ProposalSettings) -> tuple[InputBoxes, list[str], Any]:
        """(input boxes, warnings, UPN Proposals or None): user boxes as given, else cached/fresh UPN
        proposals capped at `max_objects` (UPN output is best first)."""
        if boxes is not None:
            return self._user_boxes(boxes), [], None
        if self.upn is None:
            raise MissingWeightsError(
                "no boxes were given and no UPN is loaded to propose them; pass boxes=[[x1, y1, x2, y2], ...] "
                "or build ChatRex with upn='path/to/upn_large.pth'"
            )
        pkey = (key, settings.prompt_type, float(settings.min_score), float(settings.nms_iou))
        found = self._proposals.get(pkey)
        if found is None:
            found = self.upn.predict([img], prompt_type=settings.prompt_type, min_score=settings.min_score,
                                     nms_iou=settings.nms_iou)[0]
            self._proposals.put(pkey, found)
        warnings = []
        n = len(found.boxes)
        if n > self.max_objects:  # UPN output is sorted best first: keep the top max_objects
            warnings.append(f"UPN gave {n} proposals; kept the {self.max_objects} best (the model names at most "
                            f"{self.max_objects}); raise min_score to get fewer")
        if n == 0:
            warnings.append(f"UPN found no box with score >= {settings.min_score}; the model saw no boxes")
        kept = min(n, self.max_objects)
        source = settings.prompt_type if n else NO_BOXES
        return InputBoxes([list(map(float, b)) for b in found.boxes[:kept]],
                          [float(s) for s in found.scores[:kept]], source), warnings, found

    # ------------------------------------------------------------------ model steps
    def _run(self, img, question: str, inputs: InputBoxes, history: list[tuple[str, str]] | None,
             max_new_tokens: int | None, key: str | None = None) -> tuple[str, tuple[float, float, bool]]:
        """Answer `question` about `img` with `inputs`; returns (raw text, (vision s, generate s, cache hit))."""
        key = key or image_key(img)
        t0 = time.perf_counter()
        prefix, hit = self._prefix(img, key, inputs)
        t1 = time.perf_counter()
        raw = self._generate(prefix, question, len(inputs), history, max_new_tokens)
        return raw, (t1 - t0, time.perf_counter() - t1, hit)

    @torch.inference_mode()
    def _image_state(self, img, key: str) -> tuple[_ImageState, bool]:
        state = self._images.get(key)
        if state is not None:
            return state, True
        pixel_values, pixel_values_aux, size = self.processor.preprocess_image(img)
        vision_dtype = next(self.model.vision_tower.parameters()).dtype
        features, maps = self.model.encode_images(pixel_values.to(self.device, vision_dtype),
                                                  pixel_values_aux.to(self.device, vision_dtype))
        state = _ImageState(features, list(maps), size)
        self._images.put(key, state)
        return state, False

    @torch.inference_mode()
    def _prefix(self, img, key: str, inputs: InputBoxes) -> tuple[_PrefixState, bool]:
        pkey = (key, boxes_key(inputs.boxes))
        state = self._prefixes.get(pkey)
        if state is not None:
            return state, True
        image, hit = self._image_state(img, key)
        objects = None
        if len(inputs):
            canvas, _ = self.processor.prepare_boxes(inputs.boxes, image.size)
            objects = self.model.encode_objects(image.maps, [canvas.to(self.device)])[0]  # (N, hidden)
        ids = self.processor.tokenize(self.processor.build_prompt("", len(inputs)))
        prefix_ids = ids[: _last_sentinel(ids) + 1]
        embeds, _, _, _ = self.model.prepare_inputs_embeds(
            torch.tensor([prefix_ids], device=self.device), None, image.features, [objects])
        kv = None
        if self.kv_cache and self._prefixes.maxsize > 0:
            out = self.model(inputs_embeds=embeds, use_cache=True)
            kv = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        state = _PrefixState(prefix_ids, embeds, kv, self.model.pointer_memory([objects]))
        self._prefixes.put(pkey, state)
        return state, hit

    @torch.inference_mode()
    def _generate(self, prefix: _PrefixState, question: str, n_boxes: int,
                  history: list[tuple[str, str]] | None, max_new_tokens: int | None) -> str:
        ids = self.processor.tokenize(self.processor.build_prompt(question, n_boxes, history))
        cut = _last_sentinel(ids) + 1
        if ids[:cut] != prefix.ids:  # cannot happen with the built-in templates; stay correct anyway
            raise RuntimeError("prompt prefix changed between questions; clear_cache() and report this")
        tail = torch.tensor([ids[cut:]], device=self.device)
        embeds = torch.cat([prefix.embeds, self.model.embed_text(tail, prefix.memory)], dim=1)  # (1, E, hidden)
        tok = self.processor.tokenizer
        kwargs = dict(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
            max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=self.processor.pad_token_id,
        )
        if prefix.kv is not None:
            kwargs["cache"] = copy.deepcopy(prefix.kv)  # generate appends to it: keep ours clean
        if prefix.memory is not None:
            kwargs["object_memory"] = prefix.memory
        new_ids = self.model.generate(**kwargs)
        from chatrex.model.modeling import decode_answer

        return decode_answer(tok, new_ids[0].tolist())


def register_auto_classes() -> None:
    """Register ChatRex with transformers' Auto classes (config, model, processor); idempotent.

    Kept here for callers of the pipeline; the work is `chatrex.model.register_auto_classes`.
    """
    from chatrex.model import register_auto_classes as register_model

    register_model()


def _last_sentinel(ids: Sequence[int]) -> int:
    """Index of the last image/object sentinel in `ids` (the end of the cacheable prefix)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in (IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX):
            return i
    raise ValueError("prompt holds no <image> placeholder; ChatRex prompts always start with the image")


def _fields(result: ChatRexResult) -> dict[str, Any]:
    """The base-class fields of a result, for building a subclass from it."""
    return {name: getattr(result, name) for name in
            ("task", "question", "raw", "answer", "boxes", "image_size", "timing", "warnings")}


register_auto_classes()

__all__ = ["ChatRex", "ProposalSettings", "register_auto_classes"]
