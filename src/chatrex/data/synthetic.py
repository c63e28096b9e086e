"""The synthetic "shapes" world: vocabulary, seeded scene sampling and the default renderer.

A scene is 1-8 coloured shapes (circle, square, triangle, star, hexagon in 8 colours = 40 categories,
"<colour> <shape>") on a plain, gradient or lightly textured mid-tone background. Everything is drawn
from one `numpy.random.Generator` seeded by the scene seed, so the same seed gives the same pixels.

Boxes are `xyxy` pixels of the scene image: the tight bbox of the pixels whose shape coverage is
>= 50 % (measured on the anti-aliased mask, before other shapes are drawn on top). Placement rejects
a new shape whose box has IoU > `max_iou` with a placed one, covers more than half of the smaller box,
or touches a placed shape of the same colour (so every shape stays visible and separable).

The language side (phrases, captions, referring expressions) lives in `chatrex.data.language`; a
second renderer of the same world for held-out evaluation in `chatrex.data.render_alt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
CATEGORIES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 40, ids 1..40 in COCO order
SIZE_WORDS = ("small", "medium", "large")
BACKGROUNDS = ("plain", "gradient", "texture")
RENDERERS = ("default", "alt")

# Saturated colours; backgrounds are low-saturation mid-tones (see `_background`), so each colour,
# white and black included, differs from every background pixel by >= 60 in RGB distance.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 175, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 225, 30),
    "purple": (150, 45, 205),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (12, 12, 12),
}
# Height / width of each shape's box (the shapes are not stretched to squares).
ASPECT = {"circle": 1.0, "square": 1.0, "triangle": 0.87, "star": 0.95, "hexagon": 0.87}
SIZE_SMALL_MAX, SIZE_MEDIUM_MAX = 32, 60  # size_px < 32 small, < 60 medium, else large


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. box: xyxy float pixels (tight); size_px: max(box side); index: position in Scene.objects."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]
    size_px: float
    size_word: str
    position_word: str
    category: str
    phrase: str
    brief: str
    sentence: str
    index: int

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class Scene:
    """A rendered scene: PIL RGB image, objects (drawing order = index order), seed, renderer, background."""

    image: Image.Image = field(repr=False, compare=False)
    objects: tuple[SceneObject, ...]
    width: int
    height: int
    seed: int
    renderer: str
    background: str

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 xyxy pixels, in object order."""
        return np.array([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    @property
    def categories(self) -> list[str]:
        return [o.category for o in self.objects]

    def counts(self) -> dict[str, list[int]]:
        """category -> object indices (ascending), for the categories present."""
        out: dict[str, list[int]] = {}
        for o in self.objects:
            out.setdefault(o.category, []).append(o.index)
        return out

    def caption(self, detailed: bool = False, box_index: Sequence[int] | None = None) -> str:
        """Grounded caption in the answer grammar; `box_index[i]` is object i's input-box index (default i)."""
        from chatrex.data.language import grounded_caption

        return grounded_caption(self, detailed=detailed, box_index=box_index)

    def referring_expressions(self) -> list[tuple[str, list[int]]]:
        """Unambiguous referring expressions and the object indices each names ("the largest circle", ...)."""
        from chatrex.data.language import referring_expressions

        return referring_expressions(self)


# ------------------------------------------------------------------------------------------ renderer style
MaskFn = Callable[[str, int, int, np.random.Generator], np.ndarray]
BackgroundFn = Callable[[np.random.Generator, int, int], tuple[np.ndarray, str]]
ColourFn = Callable[[str, np.random.Generator], tuple[int, int, int]]
SizeFn = Callable[[np.random.Generator, float, float], float]


@dataclass(frozen=True)
class RenderStyle:
    """What a renderer decides: image size range, object size law, shape masks, background, colour."""

    name: str
    size_range: tuple[int, int]
    mask: MaskFn
    background: BackgroundFn
    colour: ColourFn
    object_size: SizeFn


def unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of `shape` scaled to touch all four sides of the unit box [0, 1]^2 (not for circles)."""
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "star":  # 5 points, inner radius 0.45 of the outer (fat enough to read at 12 px)
        pts = [(math.cos(math.radians(-90 + 36 * k)) * (1 if k % 2 == 0 else 0.45),
                math.sin(math.radians(-90 + 36 * k)) * (1 if k % 2 == 0 else 0.45)) for k in range(10)]
    elif shape == "hexagon":  # flat top and bottom
        pts = [(math.cos(math.radians(60 * k)), math.sin(math.radians(60 * k))) for k in range(6)]
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]


def _default_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) float32 coverage in [0, 1], drawn at 2x and box-downsampled (anti-aliasing)."""
    s = 2
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([0, 0, w * s - 1, h * s - 1], fill=255)
    else:
        draw.polygon([(x * (w * s - 1), y * (h * s - 1)) for x, y in unit_polygon(shape)], fill=255)
    return np.asarray(canvas.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def _tint(rng: np.random.Generator, lo: float = 100, hi: float = 160, spread: float = 10) -> np.ndarray:
    """A low-saturation mid-tone RGB (3,) float32."""
    return (rng.uniform(lo, hi) + rng.uniform(-spread, spread, 3)).astype(np.float32)


def _default_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """(h, w, 3) float32 background and its kind; values stay in mid-tones (contrast with white/black)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if kind == "plain":
        img = np.broadcast_to(_tint(rng), (h, w, 3)).copy()
    elif kind == "gradient":
        a, b = _tint(rng, 100, 130), _tint(rng, 130, 160)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = a + (b - a) * t[..., None]
    else:  # light texture: smooth blotches (coarse noise, upsampled) + fine grain
        base = _tint(rng, 110, 150)
        coarse = rng.normal(0, 8, (max(h // 24, 2), max(w // 24, 2))).astype(np.float32)
        coarse = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
        img = base + coarse[..., None] + rng.normal(0, 3, (h, w, 3)).astype(np.float32)
        img = np.clip(img, 90, 170)
    return img, kind


def _default_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    return COLOUR_RGB[colour]


def _loguniform_size(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform sizes: as many 12-24 px shapes as 48-96 px ones."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))


DEFAULT_STYLE = RenderStyle("default", (160, 320), _default_mask, _default_background, _default_colour, _loguniform_size)


def get_style(renderer: "str | RenderStyle") -> RenderStyle:
    """"default" | "alt" -> its RenderStyle; a RenderStyle passes through (custom renderers, tests)."""
    if isinstance(renderer, RenderStyle):
        return renderer
    if renderer == "default":
        return DEFAULT_STYLE
    if renderer == "alt":
        from chatrex.data.render_alt import ALT_STYLE

        return ALT_STYLE
    raise ValueError(f"unknown renderer {renderer!r}; choose one of {RENDERERS}")


# ------------------------------------------------------------------------------------------ placement
def _iou_and_cover(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of `box` (4,) with `others` (M, 4) and intersection / area of the smaller box."""
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    a = np.prod(box[2:] - box[:2])
    b = np.prod(others[:, 2:] - others[:, :2], axis=1)
    return inter / (a + b - inter), inter / np.minimum(a, b)


def _tight_box(alpha: np.ndarray, x0: int, y0: int) -> np.ndarray | None:
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(xs) == 0:
        return None
    return np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], dtype=np.float32)


def _place(rng, style, shape, colour, w, h, obj_size, placed, max_iou, tries=40):
    """Try random sizes/positions; return (alpha, x0, y0, box) or None when nothing fits."""
    for _ in range(tries):
        size = min(max(style.object_size(rng, *obj_size), obj_size[0]), obj_size[1])
        ow = max(int(round(size)), 2)
        oh = max(int(round(size * ASPECT[shape])), 2)
        if ow >= w or oh >= h:
            continue
        alpha = style.mask(shape, ow, oh, rng)
        mh, mw = alpha.shape
        if mw >= w or mh >= h:
            continue
        x0, y0 = int(rng.integers(0, w - mw + 1)), int(rng.integers(0, h - mh + 1))
        box = _tight_box(alpha, x0, y0)
        if box is None or max(box[2] - box[0], box[3] - box[1]) < obj_size[0]:
            continue
        if placed:
            boxes = np.stack([p[0] for p in placed])
            iou, cover = _iou_and_cover(box, boxes)
            same = np.array([p[1] == colour for p in placed])
            touch = cover > 0
            if (iou > max_iou).any() or (cover > 0.5).any() or (touch & same).any():
                continue
        return alpha, x0, y0, box
    return None


def _composite(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, rgb: Sequence[float]) -> None:
    """Alpha-blend a flat colour into img (h, w, 3) float32 in place."""
    mh, mw = alpha.shape
    region = img[y0 : y0 + mh, x0 : x0 + mw]
    a = alpha[..., None]
    region[...] = region * (1 - a) + np.asarray(rgb, dtype=np.float32) * a


# ------------------------------------------------------------------------------------------ sampling
def sample_scene(seed: int, *, min_objects: int = 1, max_objects: int = 8,
                 size_range: tuple[int, int] | None = None, obj_size: tuple[float, float] = (12, 96),
                 max_iou: float = 0.3, renderer: "str | RenderStyle" = "default") -> Scene:
    """Draw one scene, deterministic in (seed, arguments).

    size_range: (min, max) image side in px (None: the renderer's, 160-320 default / 200-400 alt);
    width and height are drawn independently. obj_size: (min, max) of each shape's larger box side.
    The object count is uniform in [min_objects, max_objects]; a shape that finds no free spot after
    40 tries is dropped, but never below `min_objects` (the sampler retries with a smaller size).
    """
    from chatrex.data.language import describe_object

    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 < obj_size[0] <= obj_size[1]:
        raise ValueError(f"obj_size must be (min, max) with 0 < min <= max, got {obj_size}")
    style = get_style(renderer)
    lo, hi = size_range or style.size_range
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img, kind = style.background(rng, w, h)
    n = int(rng.integers(min_objects, max_objects + 1))
    placed: list[tuple[np.ndarray, str, str]] = []
    for k in range(n):
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[int(rng.integers(len(COLOURS)))]
        got = _place(rng, style, shape, colour, w, h, obj_size, placed, max_iou)
        if got is None and k < min_objects:  # guarantee the minimum with the smallest size
            got = _place(rng, style, shape, colour, w, h, (obj_size[0], obj_size[0]), placed, max_iou, 400)
        if got is None:
            continue
        alpha, x0, y0, box = got
        _composite(img, alpha, x0, y0, style.colour(colour, rng))
        placed.append((box, colour, shape))
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
    objects = tuple(describe_object(i, shape, colour, box, w, h) for i, (box, colour, shape) in enumerate(placed))
    return Scene(image, objects, w, h, int(seed), style.name, kind)


SPLITS = {"train": 0, "val": 1, "test": 2}


def split_seed(seed: int, index: int, split: str = "train") -> int:
    """Scene seed of item `index` of a split; the three splits never share a scene seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if not 0 <= index < 2**32:
        raise ValueError(f"index must be in [0, 2**32), got {index}")
    return 3 * (int(seed) * 2**32 + int(index)) + SPLITS[split]


def scene_stream(seed: int, n: int, split: str = "train", **kwargs) -> Iterator[Scene]:
    """Yield `n` scenes of `split` (kwargs go to `sample_scene`)."""
    for i in range(n):
        yield sample_scene(split_seed(seed, i, split), **kwargs)


class SyntheticDataset:
    """Indexable, deterministic set of `n` scenes; item i of a split is always the same scene."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", **scene_kwargs) -> None:
        split_seed(seed, 0, split)  # validates split
        self.n, self.seed, self.split, self.scene_kwargs = int(n), int(seed), split, scene_kwargs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Scene:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes")
        return sample_scene(split_seed(self.seed, index % self.n, self.split), **self.scene_kwargs)

    def __iter__(self) -> Iterator[Scene]:
        return (self[i] for i in range(self.n))


_PROMPT_MIN_SIZE = {"fine_grained_prompt": 12.0, "coarse_grained_prompt": 24.0}
_PROMPT_ALIASES = {"fine": "fine_grained_prompt", "coarse": "coarse_grained_prompt"}


def upn_targets(scene: Scene, prompt_type: str) -> np.ndarray:
    """(N, 4) float32 xyxy px of the objects UPN should propose: size_px >= 12 (fine) / >= 24 (coarse)."""
    name = _PROMPT_ALIASES.get(prompt_type, prompt_type)
    if name not in _PROMPT_MIN_SIZE:
        raise ValueError(f"unknown prompt_type {prompt_type!r}; use 'fine'/'coarse' or the full names")
    keep = [o.box for o in scene.objects if o.size_px >= _PROMPT_MIN_SIZE[name]]
    return np.array(keep, dtype=np.float32).reshape(-1, 4)
