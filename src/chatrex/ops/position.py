"""Sine position embeddings: feature-map positions (UPN), box coordinates (DINO decoder, MLLM objects).

All three share one rule: a coordinate v becomes features ``f_i = v / T**(2*floor(i/2)/n)`` for
i = 0..n-1, and the output interleaves ``sin(f_i)`` at even i with ``cos(f_i)`` at odd i.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["box_sine_embedding", "object_box_embedding", "sine_position_embedding_2d"]


def _inverse_frequencies(n: int, temperature: float, like: Tensor, dtype: torch.dtype) -> Tensor:
    """(n,) divisors T**(2*floor(i/2)/n) in `dtype` on `like`'s device."""
    i = torch.arange(n, dtype=dtype, device=like.device)
    return temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / n)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """(..., n) angles -> (..., n) with sin at even positions and cos at odd positions."""
    n = angles.shape[-1]
    even = torch.arange(n, device=angles.device) % 2 == 0
    return torch.where(even, angles.sin(), angles.cos())


def sine_position_embedding_2d(
    mask: Tensor,
    num_pos_feats: int = 128,
    temperature_h: float = 20.0,
    temperature_w: float = 20.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """UPN's PositionEmbeddingSineHW for a padded feature map.

    mask (B, H, W) bool, True = padding (padding sits at the bottom/right). Positions are the 1-based
    cumulative counts of valid pixels along rows (y) and columns (x); with ``normalize`` they are divided
    by the last row/column's count (+ eps) and multiplied by ``scale``. Returns (B, 2*num_pos_feats, H, W)
    in ``dtype`` (default float32): the first num_pos_feats channels encode y (temperature_h), the last
    encode x (temperature_w), each interleaved sin (even channel) / cos (odd channel).
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, H, W) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    dtype = torch.float32 if dtype is None else dtype
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=dtype)  # (B, H, W)
    x = not_mask.cumsum(2, dtype=dtype)
    if normalize:
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
    pos_y = _interleave_sin_cos(y[..., None] / _inverse_frequencies(num_pos_feats, temperature_h, mask, dtype))
    pos_x = _interleave_sin_cos(x[..., None] / _inverse_frequencies(num_pos_feats, temperature_w, mask, dtype))
    return torch.cat([pos_y, pos_x], dim=-1).permute(0, 3, 1, 2)  # (B, H, W, 2n) -> (B, 2n, H, W)


def box_sine_embedding(
    boxes: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """DINO's gen_sineembed_for_position: normalized points or boxes -> sine features.

    boxes (..., 2) normalized (x, y) or (..., 4) normalized (cx, cy, w, h). Each coordinate c gives
    num_pos_feats interleaved features of ``c * scale``; blocks are concatenated in the order [y, x] or
    [y, x, w, h]. Returns (..., 2*num_pos_feats) or (..., 4*num_pos_feats) in boxes' dtype.
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"boxes last dim must be 2 (xy) or 4 (cxcywh), got {tuple(boxes.shape)}")
    dim_t = _inverse_frequencies(num_pos_feats, temperature, boxes, boxes.dtype)
    order = [1, 0] if boxes.shape[-1] == 2 else [1, 0, 2, 3]  # y, x (, w, h)
    blocks = [_interleave_sin_cos((boxes[..., k] * scale)[..., None] / dim_t) for k in order]
    return torch.cat(blocks, dim=-1)


def object_box_embedding(
    boxes_cxcywh: Tensor, dim: int, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """ChatRex object-encoder box embedding (added to each RoI feature).

    boxes_cxcywh (K, 4) normalized (cx, cy, w, h), not clipped. Components are taken in the order
    (cy, cx, w, h); each gives d = dim // 4 values ``a_i = scale*c / T**(2*(i//2)/d)`` laid out as
    [sin a0, cos a1, sin a2, cos a3, ...]. Returns (K, dim) in the input dtype.
    """
    if dim % 4 != 0 or dim <= 0:
        raise ValueError(f"dim must be a positive multiple of 4 (one block per cy, cx, w, h), got {dim}")
    if boxes_cxcywh.shape[-1] != 4:
        raise ValueError(f"boxes_cxcywh must be (K, 4) cxcywh, got {tuple(boxes_cxcywh.shape)}")
    dim_t = _inverse_frequencies(dim // 4, temperature, boxes_cxcywh, boxes_cxcywh.dtype)
    blocks = [_interleave_sin_cos((boxes_cxcywh[..., k] * scale)[..., None] / dim_t) for k in (1, 0, 2, 3)]
    return torch.cat(blocks, dim=-1)
