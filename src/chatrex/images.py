"""Image loading: path / PIL image / numpy array → RGB ``PIL.Image``, with typed errors.

Every predictor goes through :func:`load_image`, so all of them agree on:
- EXIF orientation is applied (``ImageOps.exif_transpose``): boxes come back in the frame a viewer
  shows, and ``image.size`` is the transposed size.
- Transparency (RGBA, LA, P with a transparent colour, ...) is composited on **white**. Transparent
  pixels often hold arbitrary (usually black) colour; white is what viewers and browsers show.
- 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) is scaled to 8 bits with ``round(v / 257)``
  (65535 → 255), never clipped. ``F`` (float) images are clipped to [0, 255] as Pillow does.
- CMYK, YCbCr, 1-bit, L, P, LAB, HSV go through Pillow's own conversion to RGB.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from chatrex.errors import InvalidImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# Decompression-bomb guard: the same order of magnitude as Pillow's default (~179 MP, 13k × 13k).
DEFAULT_MAX_PIXELS = 178_956_970

_TRANSPARENT_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WHITE = (255, 255, 255)


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return ``image`` as a loaded RGB ``PIL.Image`` in its display orientation.

    Accepts a path (``str`` / ``os.PathLike``), a ``PIL.Image`` (never modified; a new image is
    returned), or a numpy array: (H, W) or (H, W, C) with C in {1, 3, 4} (RGB / RGBA order), dtype
    uint8, uint16 (scaled by 1/257), bool, or float in [0, 1]. Raises ``InvalidImageError`` for a
    missing, unreadable or empty image, an unsupported array, or more than ``max_pixels`` pixels.
    """
    if isinstance(image, (str, os.PathLike)):
        return _load_path(Path(image), max_pixels)
    if isinstance(image, Image.Image):
        _check_size(image.size, max_pixels, "the image")
        return _to_rgb(_exif_transpose(image, "the image"))
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    raise InvalidImageError(
        f"cannot read an image from {type(image).__name__}; pass a file path, a PIL.Image or a numpy "
        "array (H, W) / (H, W, 3) of uint8"
    )


def _load_path(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise InvalidImageError(f"image file not found: {path} (check the path)")
    if path.is_dir():
        raise InvalidImageError(f"{path} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning; Pillow still raises beyond 2× its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _check_size(opened.size, max_pixels, str(path))
                oriented = _exif_transpose(opened, str(path))
                return _to_rgb(oriented)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{path} is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(
            f"cannot decode {path} as an image ({type(exc).__name__}: {exc}); the file is corrupt, "
            "truncated or not an image — re-export it as JPEG or PNG"
        ) from None


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"{name} is empty ({w}×{h} pixels); pass an image with at least 1×1 pixel")
    if w * h > max_pixels:
        raise InvalidImageError(
            f"{name} has {w}×{h} = {w * h:,} pixels, above the limit of {max_pixels:,} (decompression-bomb "
            "guard); downscale it first or pass a larger max_pixels if you trust the file"
        )


def _exif_transpose(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation tag; always returns a new, fully decoded image."""
    try:
        out = ImageOps.exif_transpose(image)
        out = image.copy() if out is None or out is image else out
        out.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"cannot decode {name} ({type(exc).__name__}: {exc}); the data is corrupt or truncated") from None
    return out


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _wide_gray_to_rgb(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidImageError(f"cannot convert an image in mode {mode!r} to RGB ({exc}); save it as an RGB JPEG/PNG") from None


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """I;16 / I;16B / I (16- or 32-bit integer) and F (float) grayscale → 8-bit RGB."""
    values = np.asarray(image)
    if image.mode == "F":
        gray = np.clip(np.nan_to_num(values.astype(np.float64)), 0, 255).round()
    else:
        # 16-bit range: 0 → 0, 65535 → 255, rounding to nearest (not clipping to 255).
        gray = (np.clip(values.astype(np.float64), 0, 65535) / 257.0).round()
    return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(
            f"unsupported array shape {array.shape}; expected (H, W) grayscale or (H, W, 3|4) RGB/RGBA "
            "(channels last — transpose CHW arrays with a.transpose(1, 2, 0))"
        )
    _check_size((array.shape[1], array.shape[0]), max_pixels, "the array")
    pixels = _array_to_uint8(array)
    if pixels.ndim == 2:
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if pixels.shape[2] == 4:
        return _to_rgb(Image.fromarray(pixels, mode="RGBA"))
    return Image.fromarray(pixels, mode="RGB")


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    dtype = array.dtype
    if dtype == np.uint8:
        return np.ascontiguousarray(array)
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if dtype == np.uint16:
        return (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise InvalidImageError(
                "float image arrays must hold finite values in [0, 1]; for 0-255 data pass "
                "array.astype(np.uint8)"
            )
        return (array.astype(np.float64) * 255.0).round().astype(np.uint8)
    raise InvalidImageError(
        f"unsupported array dtype {dtype}; use uint8 (0-255), uint16 (0-65535), bool, or float in [0, 1]"
    )
