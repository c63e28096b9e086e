"""A second, different renderer of the same shapes world (`sample_scene(..., renderer="alt")`).

Used only for held-out evaluation ("learn the world, not the generator"). Same vocabulary, same
object size range (12-96 px larger box side) and overlap rules; what changes:

- images 200-400 px per side; object sizes uniform instead of log-uniform;
- shapes built as regular polygons on a circle (pointy-top hexagon, star inner ratio 0.5), rotated by
  up to +-20 degrees (squares, triangles, stars, hexagons), circles slightly squashed (0.88-1.0);
- anti-aliasing by 4x supersampling with a Lanczos filter (default: 2x, box filter);
- colours jittered within their name (white only darker, black only lighter);
- backgrounds: stripes, two-tone split, strong pixel noise (default: plain, gradient, light texture).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from chatrex.data.synthetic import COLOUR_RGB, RenderStyle, _tint

ALT_BACKGROUNDS = ("stripes", "two_tone", "noise")
_SIDES = {"square": (4, 45.0), "triangle": (3, -90.0), "hexagon": (6, -90.0)}  # (n, first vertex angle)


def _polygon(shape: str, rotation: float) -> np.ndarray:
    """(V, 2) vertices on the unit circle (star: alternating radius 1 / 0.5), rotated by `rotation` deg."""
    if shape == "star":
        ang = np.radians(-90 + 36 * np.arange(10) + rotation)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
    else:
        n, start = _SIDES[shape]
        ang = np.radians(start + 360 / n * np.arange(n) + rotation)
        rad = np.ones(n)
    return np.stack([np.cos(ang) * rad, np.sin(ang) * rad], axis=1)


def _alt_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage mask (mh, mw) whose larger side is max(w, h) (the requested size); 4x Lanczos AA."""
    size, s = max(w, h), 4
    if shape == "circle":
        mw, mh = size, max(int(round(size * rng.uniform(0.88, 1.0))), 2)
        if rng.random() < 0.5:
            mw, mh = mh, mw
        canvas = Image.new("L", (mw * s, mh * s), 0)
        ImageDraw.Draw(canvas).ellipse([0, 0, mw * s - 1, mh * s - 1], fill=255)
    else:
        pts = _polygon(shape, rng.uniform(-20, 20))
        pts = pts - pts.min(axis=0)
        pts = pts / pts.max() * (size - 1)  # the larger extent spans the requested size
        mw, mh = (int(math.ceil(v)) + 1 for v in pts.max(axis=0))
        canvas = Image.new("L", (mw * s, mh * s), 0)
        ImageDraw.Draw(canvas).polygon([(float(x) * s + s / 2, float(y) * s + s / 2) for x, y in pts], fill=255)
    small = canvas.resize((mw, mh), Image.LANCZOS)
    return np.clip(np.asarray(small, dtype=np.float32) / 255.0, 0.0, 1.0)


def _alt_background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    kind = ALT_BACKGROUNDS[int(rng.integers(len(ALT_BACKGROUNDS)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "stripes":
        a, b = _tint(rng, 100, 130, 12), _tint(rng, 135, 165, 12)
        angle, period = rng.uniform(0, math.pi), rng.uniform(16, 60)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        img = np.where(((t % 1.0) < 0.5)[..., None], a, b)
    elif kind == "two_tone":
        a, b = _tint(rng, 95, 125, 15), _tint(rng, 135, 165, 15)
        angle = rng.uniform(0, 2 * math.pi)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        side = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle) > 0
        img = np.where(side[..., None], a, b)
    else:  # strong per-pixel noise
        img = _tint(rng, 115, 145, 12) + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    return np.clip(img, 85, 175).astype(np.float32), kind


def _alt_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLOUR_RGB[colour], dtype=np.float32)
    if colour == "white":
        jitter = -rng.uniform(0, 25) * np.ones(3)
    elif colour == "black":
        jitter = rng.uniform(0, 30) * np.ones(3)
    else:
        jitter = rng.uniform(-20, 20, 3)
    return tuple(int(v) for v in np.clip(base + jitter, 0, 255))


def _uniform_size(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


ALT_STYLE = RenderStyle("alt", (200, 400), _alt_mask, _alt_background, _alt_colour, _uniform_size)
