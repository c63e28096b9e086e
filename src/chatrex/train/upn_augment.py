"""Domain randomization for UPN training: a `RenderStyle` of the shapes world that varies what the
default renderer keeps fixed, so the detector learns shapes rather than one generator's look.

Half of the scenes keep the default renderer's appearance; the other half get, independently:
- image sides drawn from a wider range (160-400 px);
- backgrounds from a broader family: the default ones, periodic patterns (bands / checkers at a
  random angle and period), random half-plane splits, blotches and pixel noise of random strength —
  always mid-tone so white and black shapes keep their contrast;
- shapes rotated by a random angle and slightly stretched, colours jittered within their name;
- object sizes log-uniform or uniform over the same 12-96 px range.

Everything is drawn from the scene's own ``numpy`` generator, so scenes stay deterministic in their
seed. Used only by the trainer (``UPNTrainConfig.style = "randomized"``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from chatrex.data.synthetic import COLOUR_RGB, DEFAULT_STYLE, RenderStyle

__all__ = ["RANDOMIZED_STYLE", "randomized_background", "randomized_mask"]


def _mid_tone(rng: np.random.Generator, lo: float = 95.0, hi: float = 165.0, spread: float = 14.0) -> np.ndarray:
    """A low-saturation mid-tone RGB (3,) float32."""
    return (rng.uniform(lo, hi) + rng.uniform(-spread, spread, 3)).astype(np.float32)


def _coords(rng: np.random.Generator, w: int, h: int, angle: float | None = None) -> np.ndarray:
    """(h, w) coordinate along a direction (random unless ``angle`` radians is given), in px."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi) if angle is None else angle
    return xx * math.cos(angle) + yy * math.sin(angle)


def randomized_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """(h, w, 3) float32 background in [80, 180] and its kind."""
    if rng.random() < 0.5:
        return DEFAULT_STYLE.background(rng, w, h)
    kind = ("bands", "checker", "split", "blotches", "noise")[int(rng.integers(5))]
    a, b = _mid_tone(rng), _mid_tone(rng)
    if kind == "bands":
        t = _coords(rng, w, h) / rng.uniform(6, 70)
        duty = rng.uniform(0.3, 0.7)
        img = np.where(((t % 1.0) < duty)[..., None], a, b)
    elif kind == "checker":
        period, angle = rng.uniform(8, 60), rng.uniform(0, math.pi)
        u, v = _coords(rng, w, h, angle) / period, _coords(rng, w, h, angle + math.pi / 2) / period
        img = np.where(((np.floor(u) + np.floor(v)) % 2 == 0)[..., None], a, b)
    elif kind == "split":
        img = np.broadcast_to(a, (h, w, 3)).copy()
        for _ in range(int(rng.integers(1, 4))):
            t = _coords(rng, w, h)
            cut = rng.uniform(np.percentile(t, 20), np.percentile(t, 80))
            img = np.where((t > cut)[..., None], _mid_tone(rng), img)
    elif kind == "blotches":
        cells = int(rng.integers(4, 40))
        coarse = rng.normal(0, rng.uniform(6, 20), (max(h // cells, 2), max(w // cells, 2), 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((w, h), Image.BILINEAR))
                       for c in range(3)], -1)
        img = a + up
    else:
        img = a + rng.normal(0, rng.uniform(4, 20), (h, w, 3)).astype(np.float32)
    if rng.random() < 0.3:  # extra grain on top of any pattern
        img = img + rng.normal(0, rng.uniform(2, 8), (h, w, 3)).astype(np.float32)
    return np.clip(img, 80, 180).astype(np.float32), kind


def randomized_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """The default mask, slightly stretched and (half the time) rotated by up to 30 degrees."""
    if rng.random() < 0.5:
        return DEFAULT_STYLE.mask(shape, w, h, rng)
    stretch = rng.uniform(0.85, 1.0)
    w2, h2 = (max(int(round(w * stretch)), 2), h) if rng.random() < 0.5 else (w, max(int(round(h * stretch)), 2))
    alpha = DEFAULT_STYLE.mask(shape, w2, h2, rng)
    if shape != "circle" and rng.random() < 0.7:
        img = Image.fromarray((alpha * 255).astype(np.uint8), mode="L")
        img = img.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR, expand=True)
        alpha = np.asarray(img, dtype=np.float32) / 255.0
        ys, xs = np.nonzero(alpha > 0.02)  # crop the empty margin rotate(expand=True) leaves
        alpha = alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return np.ascontiguousarray(alpha)


def _colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.asarray(COLOUR_RGB[colour], dtype=np.float32)
    if rng.random() < 0.5:
        return tuple(int(v) for v in base)
    if colour == "white":
        base = base - rng.uniform(0, 30)
    elif colour == "black":
        base = base + rng.uniform(0, 35)
    else:
        base = base + rng.uniform(-25, 25, 3)
    return tuple(int(v) for v in np.clip(base, 0, 255))


def _size(rng: np.random.Generator, lo: float, hi: float) -> float:
    if rng.random() < 0.5:
        return DEFAULT_STYLE.object_size(rng, lo, hi)
    return float(rng.uniform(lo, hi))


RANDOMIZED_STYLE = RenderStyle("randomized", (160, 400), randomized_mask, randomized_background, _colour, _size)
