"""UPN input transform: resize rule, PIL bilinear resize, ImageNet normalization, padded batching.

Reproduces the reference wrapper's chain (`RandomResize([800], max_size=1333)` → `ToTensor` →
`Normalize`) bit for bit, as pure functions on an RGB PIL image. Image loading (paths, EXIF,
mode conversion) lives in `chatrex.images`; this module assumes an RGB `PIL.Image`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SHORT = 800
DEFAULT_MAX_SIZE = 1333


def resize_size(w: int, h: int, short: int = DEFAULT_SHORT, max_size: int | None = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """The reference size rule. Takes the original ``(w, h)``; returns the resized ``(h, w)``.

    The short side becomes ``short`` unless the long side would then exceed ``max_size``, in which
    case the short side becomes ``int(round(max_size * short_side / long_side))``. The long side is
    ``int(s * long / short)`` (floored). An image whose short side already equals ``s`` keeps its size.
    Examples: 2246×1590 → (800, 1130); 3000×1000 → (444, 1332); 100×60 → (800, 1333).
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got w={w}, h={h}")
    s = short
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        # Same float expression as the reference: ratio * size compared with max_size.
        if hi / lo * s > max_size:
            # Clamped to >= 1: the reference would try a 0-px resize for aspect ratios > 2·max_size.
            s = max(1, int(round(max_size * lo / hi)))
    if (w <= h and w == s) or (h <= w and h == s):
        return h, w
    if w < h:
        return max(1, int(s * h / w)), s
    return s, max(1, int(s * w / h))


def normalize(uint8_hwc: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (3, H, W): ``(x / 255 - mean) / std`` in float32 (torchvision order)."""
    x = torch.from_numpy(np.array(uint8_hwc, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def resize_image(image: Image.Image, short: int = DEFAULT_SHORT, max_size: int | None = DEFAULT_MAX_SIZE) -> Image.Image:
    """PIL bilinear resize to :func:`resize_size` (PIL antialiases when downscaling, like the reference)."""
    h, w = resize_size(image.width, image.height, short, max_size)
    return image.resize((w, h), Image.BILINEAR)


def preprocess_image(
    image: Image.Image, short: int = DEFAULT_SHORT, max_size: int | None = DEFAULT_MAX_SIZE
) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB PIL image → (normalized float32 tensor (3, h, w), resized size ``(h, w)``).

    The caller converts to RGB first (`chatrex.images.load_image`); any other mode is an error here
    because the reference would silently mis-normalize it.
    """
    if image.mode != "RGB":
        raise ValueError(f"preprocess_image expects an RGB image, got mode {image.mode!r}; "
                         "load it with chatrex.images.load_image(...) first")
    resized = resize_image(image, short, max_size)
    pixels = normalize(np.asarray(resized, dtype=np.uint8))
    return pixels, (resized.height, resized.width)


def batch_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (3, h_i, w_i) tensors into ``pixel_values`` (B, 3, H, W) and ``pixel_mask`` (B, H, W).

    Each image sits at the top-left and is zero-padded at the bottom/right to the largest H and W of
    the batch (zeros in normalized space, no size-divisibility padding). ``pixel_mask`` is True on
    padding, False on real pixels. Note: UPN's Swin ignores the mask, so padding changes results;
    `UPNPredictor` therefore only batches images of equal resized size.
    """
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    ref = images[0]
    if any(t.dim() != 3 or t.shape[0] != ref.shape[0] for t in images):
        raise ValueError(f"every image must be (C, h, w) with C={ref.shape[0]}, got {[tuple(t.shape) for t in images]}")
    height = max(t.shape[1] for t in images)
    width = max(t.shape[2] for t in images)
    pixel_values = ref.new_zeros((len(images), ref.shape[0], height, width))
    pixel_mask = torch.ones((len(images), height, width), dtype=torch.bool, device=ref.device)
    for i, t in enumerate(images):
        pixel_values[i, :, : t.shape[1], : t.shape[2]] = t
        pixel_mask[i, : t.shape[1], : t.shape[2]] = False
    return pixel_values, pixel_mask
