"""RoIAlign with torchvision.ops.roi_align semantics, in pure PyTorch.

torchvision averages, per output bin, a grid of bilinear samples. Bilinear weights and the
"sample outside the map contributes 0" rule both factor into a y part and an x part, so each RoI's
result is ``Ry @ V @ Cxᵀ / count`` with Ry (oh, H) and Cx (ow, W) built for all RoIs at once
(adaptive grids padded to the largest grid with a validity mask). The two matrix products run per
RoI on the crop of the map the RoI actually touches, so the work is about C·h·w·7 multiply-adds per
RoI (h×w = the RoI's rows × columns) and nothing of size (K, C, samples) is ever materialized.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["roi_align", "roi_align_mean"]

# Largest crop (elements) contracted at once; bigger crops are split over channels (bounds the copy).
_MAX_CROP_ELEMENTS = 2**24
# Crops up to this many elements are copied and contracted with two plain GEMMs (see _contract).
_SMALL_CROP_ELEMENTS = 2**20


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def _as_rois(boxes: Tensor | Sequence[Tensor], input: Tensor) -> Tensor:
    """(K, 5) [batch_idx, x1, y1, x2, y2] or a per-image list of (K_i, 4) xyxy -> (K, 5) in input's dtype."""
    if isinstance(boxes, (list, tuple)):
        parts = []
        for b, bx in enumerate(boxes):
            if bx.dim() != 2 or bx.shape[-1] != 4:
                raise ValueError(f"boxes[{b}] must be (K_i, 4) xyxy, got {tuple(bx.shape)}")
            idx = torch.full_like(bx[:, :1], b, dtype=input.dtype, device=input.device)
            parts.append(torch.cat([idx, bx.to(device=input.device, dtype=input.dtype)], dim=1))
        return torch.cat(parts) if parts else input.new_zeros(0, 5)
    if boxes.dim() != 2 or boxes.shape[-1] != 5:
        raise ValueError(f"boxes must be (K, 5) [batch_idx, x1, y1, x2, y2] or a list of (K_i, 4), got {tuple(boxes.shape)}")
    return boxes.to(device=input.device, dtype=input.dtype)


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, n_bins: int, size: int) -> tuple[Tensor, Tensor]:
    """Interpolation matrix along one axis for every RoI.

    start, bin_size (K,) in feature px (input dtype); grid (K,) int64 samples per bin (<= 0 -> none).
    Returns (weights (K, n_bins, size), support (K, 2) int64 [first, last+1) of rows/cols touched).
    weights[k, p, j] = Σ_i valid · bilinear weight of pixel j for sample i of bin p (no 1/count).
    """
    k, dtype, device = start.shape[0], start.dtype, start.device
    g_max = max(int(grid.max()), 1)
    p = torch.arange(n_bins, device=device, dtype=dtype)[None, :, None]
    i = torch.arange(g_max, device=device)[None, None, :]
    g = grid.clamp(min=1).to(dtype)[:, None, None]
    b = bin_size[:, None, None]
    # Same operation order as torchvision: start + p*bin + ((i + .5)*bin)/grid, in the input dtype.
    coord = start[:, None, None] + p * b + ((i.to(dtype) + 0.5) * b) / g  # (K, n_bins, g_max)
    valid = (i < grid[:, None, None]) & (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0)
    low = c.floor().clamp(max=size - 1).to(torch.int64)
    at_end = low >= size - 1  # the last row/col is used alone
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(c), c - low.to(dtype))
    w_high = frac * valid
    w_low = (1 - frac) * valid
    weights = coord.new_zeros(k, n_bins, size)
    weights.scatter_add_(2, low, w_low)
    weights.scatter_add_(2, high, w_high)
    big = torch.iinfo(torch.int64).max
    first = torch.where(valid, low, big).flatten(1).amin(1)
    last = torch.where(valid, high, -1).flatten(1).amax(1) + 1
    return weights, torch.stack([first, last], dim=1)


def _contract(crop: Tensor, ry: Tensor, cx: Tensor) -> Tensor:
    """crop (C, h, w), ry (oh, h), cx (ow, w) -> (C, oh, ow) = ry @ crop @ cxᵀ (two GEMMs)."""
    c, h, w = crop.shape
    if crop.numel() > _SMALL_CROP_ELEMENTS:
        # Large crops: batched matmuls read the strided crop in place (no copy of the crop).
        return torch.matmul(ry, torch.matmul(crop, cx.T))  # (C, h, ow) -> (C, oh, ow)
    # Small crops: one copy, then two plain GEMMs (C tiny batched matmuls cost more than the copy).
    t = (crop.reshape(c * h, w) @ cx.T).view(c, h, -1)  # (C, h, ow)
    t = t.transpose(0, 1).reshape(h, -1)  # (h, C*ow)
    return (ry @ t).view(ry.shape[0], c, -1).transpose(0, 1)  # (oh, C, ow) -> (C, oh, ow)


def _roi_geometry(
    input: Tensor, rois: Tensor, oh: int, ow: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> tuple[list[int], Tensor, Tensor, Tensor, Tensor, Tensor]:
    """rois (K, 5) in input's dtype -> (batch index per RoI, ry (K, oh, H), rows (K, 2), cx (K, ow, W),
    cols (K, 2), count (K,)): torchvision's per-RoI sampling geometry, all in the input dtype."""
    n, _, h, w = input.shape
    k = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, j] * spatial_scale - offset for j in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k,), sampling_ratio, dtype=torch.int64, device=input.device)
    else:
        grid_h, grid_w = bin_h.ceil().to(torch.int64), bin_w.ceil().to(torch.int64)
    bad = (grid_h * grid_w < 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"RoIs {bad[:5]} are inverted on one axis only (sampling grid {grid_h[bad[0]].item()}x"
            f"{grid_w[bad[0]].item()}); torchvision cannot process them either: fix x1<=x2, y1<=y2"
        )
    batch_idx = rois[:, 0].to(torch.int64).tolist()
    if min(batch_idx) < 0 or max(batch_idx) >= n:
        raise ValueError(f"box batch indices must lie in [0, {n}), got {sorted(set(batch_idx))}")
    ry, rows = _axis_weights(y1, bin_h, grid_h, oh, h)
    cx, cols = _axis_weights(x1, bin_w, grid_w, ow, w)
    return batch_idx, ry, rows, cx, cols, (grid_h * grid_w).clamp(min=1).to(input.dtype)


def _pool(input: Tensor, batch_idx: list[int], ry: Tensor, rows: Tensor, cx: Tensor, cols: Tensor) -> Tensor:
    """(K, C, ry.shape[1], cx.shape[1]) = ry[k] @ input[b_k] @ cx[k]ᵀ on the crop each RoI touches."""
    c = input.shape[1]
    out = input.new_zeros(len(batch_idx), c, ry.shape[1], cx.shape[1])
    for r, (b, (r0, r1), (c0, c1)) in enumerate(zip(batch_idx, rows.tolist(), cols.tolist())):
        if r1 <= r0 or c1 <= c0:
            continue  # no valid sample: the output stays 0
        step = max(1, _MAX_CROP_ELEMENTS // ((r1 - r0) * (c1 - c0)))
        for ch in range(0, c, step):
            crop = input[b, ch : ch + step, r0:r1, c0:c1]
            out[r, ch : ch + step] = _contract(crop, ry[r, :, r0:r1], cx[r, :, c0:c1])
    return out


def _prepare(input: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got {tuple(input.shape)}")
    return _as_rois(boxes, input)


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Average of bilinear samples per bin, exactly as torchvision.ops.roi_align (CPU kernel).

    input (N, C, H, W); boxes (K, 5) [batch_idx, x1, y1, x2, y2] or a list of N tensors (K_i, 4) xyxy,
    in input-image pixels (multiplied by ``spatial_scale`` to get feature pixels). ``aligned=False``
    clamps RoI width/height to >= 1 feature px; ``aligned=True`` shifts by -0.5 px and does not clamp.
    ``sampling_ratio <= 0`` uses ceil(roi_size / output_size) samples per bin along each axis (computed
    in the input dtype; 0 samples -> zeros). Samples with y < -1, y > H, x < -1 or x > W contribute 0
    but are counted. Returns (K, C, oh, ow) in input's dtype.

    Raises ValueError where torchvision fails: an inverted RoI (aligned=True, adaptive grid) whose two
    sample counts have opposite signs.
    """
    rois = _prepare(input, boxes)
    oh, ow = _pair(output_size)
    if rois.shape[0] == 0:
        return input.new_zeros(0, input.shape[1], oh, ow)
    batch_idx, ry, rows, cx, cols, count = _roi_geometry(input, rois, oh, ow, spatial_scale, sampling_ratio, aligned)
    return _pool(input, batch_idx, ry, rows, cx, cols) / count[:, None, None, None]


def roi_align_mean(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``roi_align(...).mean((2, 3))`` without building the bins: (K, C) in input's dtype.

    The mean over bins of ry @ V @ cxᵀ is (Σ_bins ry) @ V @ (Σ_bins cx)ᵀ, one weighted sum per
    channel instead of two GEMMs: about output_size² times less work (ChatRex's object encoder).
    """
    rois = _prepare(input, boxes)
    oh, ow = _pair(output_size)
    if rois.shape[0] == 0:
        return input.new_zeros(0, input.shape[1])
    batch_idx, ry, rows, cx, cols, count = _roi_geometry(input, rois, oh, ow, spatial_scale, sampling_ratio, aligned)
    pooled = _pool(input, batch_idx, ry.sum(1, keepdim=True), rows, cx.sum(1, keepdim=True), cols)
    return pooled.flatten(1) / (count[:, None] * (oh * ow))
