"""`ChatRexProcessor`: image + boxes + question -> the tensors `ChatRexForConditionalGeneration` takes.

Everything here reproduces the reference preprocessing bit for bit (chatrex_reference.md §5,
mllm_tiny/README.md §5-§7):

* image: RGB -> pad to a square S = max(W, H) with the CLIP-mean colour (122, 116, 104), centred ->
  PIL bicubic resize to `high_res_size` -> /255 -> CLIP mean/std = `pixel_values_aux` (1, 3, high, high);
  `pixel_values` (1, 3, low, low) is a bilinear downsample of that *normalised* tensor (a reference quirk).
* boxes: xyxy in original-image pixels -> xyxy on the high-res square canvas, float32, same op order.
* prompt: "<image>\\n<obj0><objfeat>...<obj{N-1}><objfeat>\\n" + question, wrapped in the chat template;
  "<image>" -> -200 and each "<objfeat>" -> -300 sentinels, other text pieces tokenized one by one.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from chatrex.errors import ConfigError, TooManyBoxesError
from chatrex.images import load_image
from chatrex.model.constants import (
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_OBJECT_FEATURE_TOKEN,
    IMAGE_TOKEN_INDEX,
    MAX_OBJECTS,
    OBJECT_TOKEN_INDEX,
    SPECIAL_TOKENS,
)
from chatrex.model.templates import build_prompt, build_user_text, get_template

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The reference pads with int(255 * mean) per channel = (122, 116, 104).
PAD_FILL = tuple(int(m * 255) for m in CLIP_MEAN)
PROCESSOR_CONFIG_NAME = "processor_config.json"
_SENTINEL_SPLIT = re.compile(f"({re.escape(DEFAULT_IMAGE_TOKEN)}|{re.escape(DEFAULT_OBJECT_FEATURE_TOKEN)})")
_SENTINEL_OF = {DEFAULT_IMAGE_TOKEN: IMAGE_TOKEN_INDEX, DEFAULT_OBJECT_FEATURE_TOKEN: OBJECT_TOKEN_INDEX}


@dataclass(frozen=True)
class ProcessorConfig:
    """The few sizes the processor needs (a subset of `ChatRexConfig`).

    low_res_size: CLIP input side; high_res_size: ConvNeXt input side = box canvas side (pixels);
    max_objects: most boxes per prompt; chat_template: "vicuna", "chatml" or a format string with "{input}";
    num_image_tokens: image embeddings per prompt (informational; the model expands the -200 sentinel).
    """

    low_res_size: int
    high_res_size: int
    max_objects: int = MAX_OBJECTS
    chat_template: str = "vicuna"
    num_image_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("low_res_size", "high_res_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int (pixels), got {value!r}")
        if isinstance(self.max_objects, bool) or not isinstance(self.max_objects, int):
            raise ConfigError(f"max_objects must be an int, got {self.max_objects!r}")
        if not 0 <= self.max_objects <= MAX_OBJECTS:
            raise ConfigError(f"max_objects must be in 0..{MAX_OBJECTS} (object tokens in the vocabulary), got {self.max_objects}")
        get_template(self.chat_template)  # raises ConfigError for an unusable template

    @classmethod
    def from_config(cls, config: Any) -> "ProcessorConfig":
        """Read the fields from a `ChatRexConfig`, a `ProcessorConfig`, a dict or any object with those attributes."""
        if isinstance(config, cls):
            return config
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        missing = [k for k in ("low_res_size", "high_res_size") if get(k) is None]
        if missing:
            raise ConfigError(f"processor config lacks {missing}; pass a ChatRexConfig or give low_res_size/high_res_size")
        tokens = get("num_image_tokens")
        return cls(
            low_res_size=int(get("low_res_size")),
            high_res_size=int(get("high_res_size")),
            max_objects=int(get("max_objects", MAX_OBJECTS)),
            chat_template=get("chat_template", "vicuna") or "vicuna",
            num_image_tokens=None if tokens is None else int(tokens),
        )


class ChatRexInputs(dict):
    """Model inputs (a plain dict of tensors, so `model(**inputs)` works) plus `kept_indices`.

    `kept_indices`: for a single sample, the original indices of the boxes that became <obj0>, <obj1>, ...;
    for a batch, one such list per sample.
    """

    kept_indices: list

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ChatRexInputs":
        """A copy on `device`; floating tensors are cast to `dtype` when given (ids and masks keep theirs)."""
        moved = ChatRexInputs()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
            moved[key] = value
        moved.kept_indices = getattr(self, "kept_indices", [])
        return moved


# ---------------------------------------------------------------------------------------------- tokens
def ensure_special_tokens(tokenizer: Any) -> int:
    """Add <obj0>..<obj99>, <ground>, </ground>, <objects>, </objects> where missing; return how many were added.

    One `add_tokens(missing, special_tokens=True)` call in the reference order, so a base tokenizer gets the
    reference ids (<obj0> = first new id). Raises ConfigError if a token still does not encode to one id.
    When tokens were added, the model's embeddings must be resized to `len(tokenizer)`.
    """
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in SPECIAL_TOKENS if tok not in vocab]
    added = int(tokenizer.add_tokens(missing, special_tokens=True)) if missing else 0
    for tok in SPECIAL_TOKENS:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(
                f"tokenizer encodes {tok!r} as {ids}, not one id; it must hold the ChatRex special tokens "
                "as added special tokens (load the tokenizer shipped with the model)"
            )
    return added


def tokenize_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Reference piecewise tokenization: [BOS if any] + pieces split on "<image>"/"<objfeat>".

    Delimiters become the -200 / -300 sentinels; every other non-empty piece is encoded on its own with
    `add_special_tokens=False` (so each piece gets the tokenizer's prefix-space behaviour).
    """
    ids: list[int] = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    for piece in _SENTINEL_SPLIT.split(prompt):
        if not piece:
            continue
        if piece in _SENTINEL_OF:
            ids.append(_SENTINEL_OF[piece])
        else:
            ids.extend(int(i) for i in tokenizer.encode(piece, add_special_tokens=False))
    return ids


# ---------------------------------------------------------------------------------------------- images
def load_rgb(image: Any) -> np.ndarray:
    """A path, PIL image or array -> RGB uint8 array (H, W, 3), through `chatrex.images.load_image`.

    Shared with every predictor, so boxes from UPN and from the caller live in the same frame: EXIF
    orientation applied, transparency composited on white. Raises InvalidImageError.
    """
    return np.asarray(load_image(image), dtype=np.uint8)


def square_pad(width: int, height: int) -> tuple[int, int, int]:
    """(side S, pad_left, pad_top) of the centred square canvas the reference pastes the image into."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def resize_bilinear_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of (B, C, H, W) float32 to (B, C, size, size).

    Same maths as `F.interpolate(x, (size, size), mode="bilinear", align_corners=False)`, with the rounding
    of the torch CPU build that produced the reference fixtures: source index `(d + 0.5) * scale - 0.5` and
    weights rounded step by step in float32, then `fma(x00, w0, x01 * w1)` along W and `fma(r0, h0, r1 * h1)`
    along H (fma emulated exactly in float64). Plain `F.interpolate` rounds differently per build (this
    project's CPU torch fuses the index instead: a weight can differ by 1 ulp, outputs by ~3e-6 relative);
    this function is bit-exact to the fixtures on any device and machine.
    """

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        src = (torch.arange(size, dtype=torch.float32) + 0.5) * scale - 0.5  # float32, separately rounded
        src = src.clamp_min(0.0)
        i0 = src.floor().long().clamp_max(n_in - 1)
        i1 = (i0 + 1).clamp_max(n_in - 1)
        w1 = (src - i0.float()).clamp(0.0, 1.0)
        return i0.to(x.device), i1.to(x.device), (1.0 - w1).to(x.device), w1.to(x.device)

    def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # a*b of two float32 values is exact in float64; one rounding of the sum, then to float32.
        return (a.double() * b.double() + c.double()).float()

    x = x.float()
    h0i, h1i, h0, h1 = axis(x.shape[-2])
    w0i, w1i, w0, w1 = axis(x.shape[-1])
    rows0, rows1 = x[..., h0i, :], x[..., h1i, :]  # (B, C, size, W)
    r0 = fma(rows0[..., w0i], w0, rows0[..., w1i] * w1)  # (B, C, size, size)
    r1 = fma(rows1[..., w0i], w0, rows1[..., w1i] * w1)
    return fma(r0, h0[:, None], r1 * h1[:, None])


def image_to_tensors(rgb: np.ndarray, high_res_size: int, low_res_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB uint8 (H, W, 3) -> (pixel_values_aux (1,3,high,high), pixel_values (1,3,low,low)), float32."""
    height, width = rgb.shape[:2]
    side, pad_left, pad_top = square_pad(width, height)
    canvas = Image.new("RGB", (side, side), PAD_FILL)
    canvas.paste(Image.fromarray(rgb), (pad_left, pad_top))
    resized = np.asarray(canvas.resize((high_res_size, high_res_size), Image.BICUBIC))
    # The reference rescales in float64 then casts, and normalises in float32 (bit-exact order).
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    aux = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]  # (1, 3, high, high)
    return aux, resize_bilinear_reference(aux, low_res_size)


# ---------------------------------------------------------------------------------------------- boxes
def as_box_array(boxes: Any, what: str = "bbox") -> np.ndarray:
    """Lists / numpy / torch -> float64 array (N, 4); None or empty -> (0, 4). ValueError on bad shape or values."""
    if boxes is None:
        return np.zeros((0, 4), np.float64)
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a list of [x1, y1, x2, y2] boxes: {err}") from err
    if arr.size == 0:
        return np.zeros((0, 4), np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what} must have shape (N, 4) (xyxy pixels), got {arr.shape}; wrap a single box as [[x1, y1, x2, y2]]")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} holds NaN or infinite coordinates: {arr[~np.isfinite(arr).all(1)].tolist()}")
    return arr


def boxes_to_canvas(boxes_xyxy: np.ndarray, width: int, height: int, canvas_size: int) -> np.ndarray:
    """xyxy pixels of a W x H image -> xyxy pixels of the padded square canvas of side `canvas_size`, float32.

    The reference order (bit-exact): xyxy -> xywh in float64, cast to float32, add the pad (float32),
    multiply x, y, w, h by canvas/S (float32), then x2 = x1' + w'. Not clipped.
    """
    side, pad_left, pad_top = square_pad(width, height)
    xywh = np.array(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    xywh[:, 2:] -= xywh[:, :2]
    xywh = xywh.astype(np.float32)
    xywh[:, 0] += np.float32(pad_left)
    xywh[:, 1] += np.float32(pad_top)
    xywh *= np.float32(canvas_size / side)
    out = xywh.copy()
    out[:, 2:] = xywh[:, :2] + xywh[:, 2:]
    return out


def select_boxes(boxes: np.ndarray, scores: Any, max_objects: int) -> np.ndarray:
    """Indices of the boxes to keep (at most `max_objects`), in their original order.

    With more boxes than `max_objects`: the top `max_objects` by score (ties: earlier box first) are kept
    and stay in their original relative order, so <objK> numbering follows the caller's order (UPN output
    is already sorted by score, where both orders agree). Without scores that raises TooManyBoxesError.
    """
    count = len(boxes)
    if scores is not None:
        scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, np.float64).reshape(-1)
        if len(scores) != count:
            raise ValueError(f"got {len(scores)} scores for {count} boxes; give one score per box")
        if np.isnan(scores).any():
            raise ValueError("scores hold NaN; give a finite score per box")
    if count <= max_objects:
        return np.arange(count)
    if scores is None:
        raise TooManyBoxesError(
            f"{count} boxes given but the model has object tokens for at most {max_objects}; pass scores= to keep "
            f"the {max_objects} best, or keep fewer boxes (e.g. raise the proposal min_score)"
        )
    best = np.argsort(-scores, kind="stable")[:max_objects]
    return np.sort(best)


# ---------------------------------------------------------------------------------------------- processor
class ChatRexProcessor:
    """Turns (image, question, boxes) into ChatRex model inputs and model ids back into text.

    Args:
        tokenizer: a transformers tokenizer; the ChatRex special tokens are added if missing (then resize
            the model's embeddings to `len(tokenizer)`; `num_added_tokens` says how many).
        config: a `ChatRexConfig`, `ProcessorConfig`, dict or any object with low_res_size, high_res_size,
            max_objects and chat_template.
    """

    def __init__(self, tokenizer: Any, config: Any) -> None:
        self.tokenizer = tokenizer
        self.config = ProcessorConfig.from_config(config)
        self.num_added_tokens = ensure_special_tokens(tokenizer)
        if self.num_added_tokens:
            warnings.warn(
                f"added {self.num_added_tokens} ChatRex special tokens to the tokenizer; resize the model's "
                f"embeddings to {len(tokenizer)} rows",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ pieces
    @property
    def pad_token_id(self) -> int:
        """Id used for left padding: the tokenizer's pad id, else its EOS id, else 0."""
        for value in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    @property
    def eos_text(self) -> str:
        return self.tokenizer.eos_token or ""

    def preprocess_image(self, image: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """-> (pixel_values (1,3,low,low), pixel_values_aux (1,3,high,high), (width, height) of the image)."""
        rgb = load_rgb(image)
        aux, low = image_to_tensors(rgb, self.config.high_res_size, self.config.low_res_size)
        return low, aux, (rgb.shape[1], rgb.shape[0])

    def prepare_boxes(self, bbox: Any, size: tuple[int, int], scores: Any = None) -> tuple[torch.Tensor, list[int]]:
        """xyxy boxes in pixels of an image of `size` (W, H) -> (canvas xyxy float32 (N, 4), kept original indices)."""
        boxes = as_box_array(bbox)
        kept = select_boxes(boxes, scores, self.config.max_objects)
        canvas = boxes_to_canvas(boxes[kept], size[0], size[1], self.config.high_res_size)
        return torch.from_numpy(canvas), [int(i) for i in kept]

    def build_prompt(self, question: str, num_boxes: int, history: Iterable[Sequence[str]] | None = None) -> str:
        """The full prompt string; the image/object prefix goes into the first user turn only."""
        return build_prompt(question, num_boxes, self.config.chat_template, history=history, eos_text=self.eos_text)

    def tokenize(self, prompt: str) -> list[int]:
        """Prompt string -> ids with -200 / -300 sentinels (see `tokenize_prompt`)."""
        return tokenize_prompt(self.tokenizer, prompt)

    # ------------------------------------------------------------------ main entry points
    def process(
        self,
        image: Any,
        question: str,
        bbox: Any = None,
        scores: Any = None,
        history: Iterable[Sequence[str]] | None = None,
    ) -> ChatRexInputs:
        """One sample -> model inputs (seed-compatible keys).

        Args:
            image: file path, PIL image or HWC uint8 array.
            question: the user question; "<image>" / "<objfeat>" inside it are removed.
            bbox: xyxy boxes in pixels of `image` (list, numpy or tensor of shape (N, 4)); None = no boxes.
            scores: one score per box; needed only when N > max_objects (see `select_boxes`).
            history: earlier (question, answer) turns, oldest first.

        Returns:
            `ChatRexInputs` with input_ids (1, L) long, attention_mask (1, L) long, pixel_values (1,3,low,low),
            pixel_values_aux (1,3,high,high), gt_boxes (1, N, 4) float32 canvas xyxy ((1, 0, 4) for none);
            `.kept_indices` = original indices of the boxes bound to <obj0>, <obj1>, ...
        Raises:
            InvalidImageError, ValueError (bad boxes/scores), TooManyBoxesError (N > max_objects, no scores).
        """
        pixel_values, pixel_values_aux, size = self.preprocess_image(image)
        boxes, kept = self.prepare_boxes(bbox, size, scores)
        ids = torch.tensor([self.tokenize(self.build_prompt(question, len(kept), history))], dtype=torch.long)
        inputs = ChatRexInputs(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixel_values,
            pixel_values_aux=pixel_values_aux,
            gt_boxes=boxes[None],
        )
        inputs.kept_indices = kept
        return inputs

    def __call__(
        self,
        images: Any,
        questions: str | Sequence[str],
        bboxes: Sequence[Any] | None = None,
        scores: Sequence[Any] | None = None,
    ) -> ChatRexInputs:
        """A batch -> LEFT-padded model inputs.

        `images` and `questions` are lists of equal length B (a single image/str is a batch of one);
        `bboxes` / `scores` are per-sample lists (None = no boxes / no scores). Returns input_ids (B, L) padded
        on the left with `pad_token_id`, attention_mask (B, L) (0 on padding), pixel_values (B,3,low,low),
        pixel_values_aux (B,3,high,high), gt_boxes (B, Nmax, 4) zero-padded, num_boxes (B,) long;
        `.kept_indices` is one list per sample.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        questions = [questions] if isinstance(questions, str) else list(questions)
        images = list(images)
        batch = len(images)
        bboxes = [None] * batch if bboxes is None else list(bboxes)
        scores = [None] * batch if scores is None else list(scores)
        if not (len(questions) == len(bboxes) == len(scores) == batch) or batch == 0:
            raise ValueError(
                f"need one question, bbox list and score list per image: got {batch} images, {len(questions)} "
                f"questions, {len(bboxes)} bbox lists, {len(scores)} score lists"
            )
        samples = [self.process(im, q, b, s) for im, q, b, s in zip(images, questions, bboxes, scores)]
        return self._collate(samples)

    def _collate(self, samples: list[ChatRexInputs]) -> ChatRexInputs:
        length = max(s["input_ids"].shape[1] for s in samples)
        max_boxes = max(s["gt_boxes"].shape[1] for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        boxes = torch.zeros((len(samples), max_boxes, 4), dtype=torch.float32)
        for b, sample in enumerate(samples):
            n = sample["input_ids"].shape[1]
            ids[b, length - n :] = sample["input_ids"][0]  # left padding: real tokens at the end
            mask[b, length - n :] = 1
            boxes[b, : sample["gt_boxes"].shape[1]] = sample["gt_boxes"][0]
        out = ChatRexInputs(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.cat([s["pixel_values"] for s in samples]),
            pixel_values_aux=torch.cat([s["pixel_values_aux"] for s in samples]),
            gt_boxes=boxes,
            num_boxes=torch.tensor([s["gt_boxes"].shape[1] for s in samples], dtype=torch.long),
        )
        out.kept_indices = [s.kept_indices for s in samples]
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any) -> str:
        """Generated ids (list, 1-D tensor or (1, n)) -> answer text.

        Special tokens are kept with no spaces around them; the result is stripped and trailing EOS / pad
        texts are removed. Sentinels (-200 / -300) decode to "<image>" / "<objfeat>"; other negative ids are dropped.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise ValueError(f"decode takes one sequence of ids, got shape {arr.shape}; use batch_decode for (B, n)")
        ids = arr.tolist()
        return self._finish(self._decode_with_sentinels(ids))

    def batch_decode(self, sequences: Any) -> list[str]:
        """(B, n) ids (tensor or nested lists) -> B answer texts (see `decode`)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.detach().cpu().reshape(sequences.shape[0], -1).tolist()
        return [self.decode(list(seq)) for seq in sequences]

    def _decode_with_sentinels(self, ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids + [IMAGE_TOKEN_INDEX - 1]:  # a final dropped id flushes the last run
            if i >= 0:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_run(run))
                run = []
            parts.append({IMAGE_TOKEN_INDEX: DEFAULT_IMAGE_TOKEN, OBJECT_TOKEN_INDEX: DEFAULT_OBJECT_FEATURE_TOKEN}.get(i, ""))
        return "".join(parts)

    def _decode_run(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False)
        except TypeError:  # tokenizers that do not know the keyword
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _finish(self, text: str) -> str:
        text = text.strip()
        tails = [t for t in {self.tokenizer.eos_token, self.tokenizer.pad_token} if t]
        changed = True
        while changed and text:
            changed = False
            for tail in tails:
                if text.endswith(tail):
                    text, changed = text[: -len(tail)].rstrip(), True
        return text

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the tokenizer files and `processor_config.json` into `folder`; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        payload = {"processor_class": type(self).__name__, **asdict(self.config)}
        (folder / PROCESSOR_CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, tokenizer: Any = None, **ignored: Any) -> "ChatRexProcessor":
        """Load from a folder holding tokenizer files and `processor_config.json` (or a ChatRex `config.json`).

        Extra keyword arguments of the seed API (`trust_remote_code`, `device_map`) are accepted and ignored.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"processor folder {os.fspath(folder)!r} does not exist; pass a folder written by save_pretrained")
        config = _read_processor_config(folder)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(tokenizer, config)


def _read_processor_config(folder: Path) -> ProcessorConfig:
    for name in (PROCESSOR_CONFIG_NAME, "config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            if name == "config.json" and "low_res_size" not in data:
                continue
            fields = ("low_res_size", "high_res_size", "max_objects", "chat_template", "num_image_tokens")
            return ProcessorConfig.from_config({k: data[k] for k in fields if k in data})
    raise ConfigError(
        f"{os.fspath(folder)!r} has no {PROCESSOR_CONFIG_NAME} (nor a ChatRex config.json with low_res_size); "
        "write one with ChatRexProcessor.save_pretrained"
    )


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "ChatRexInputs", "ChatRexProcessor", "ProcessorConfig", "as_box_array", "boxes_to_canvas",
    "build_user_text", "ensure_special_tokens", "image_to_tensors", "load_rgb", "resize_bilinear_reference",
    "select_boxes", "tokenize_prompt",
]
