"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

Two formulations of the sampling core compute the same numbers:

* ``"pytorch"`` (default): accumulates level by level and, for long query sequences, chunk by chunk
  of queries, so the largest temporary is one level's (N*M, D, P, q_chunk) samples. Measured on a
  19k-token encoder: ~6x less peak memory than the reference formulation and ~1.6x faster.
* ``"reference"``: the original formulation that stacks every level's samples into one
  (N*M, D, Lq, L*P) tensor before the weighted sum. Kept as the readable baseline the tests bind
  the default to.

`set_msda_implementation` is the one switch between them; a faster kernel (CUDA, Triton, ...) can be
added with `register_msda_implementation` from outside, so model code never tries imports itself.

Sampling convention everywhere: ``loc`` is normalized (x, y) with 0 = left/top edge and 1 =
right/bottom edge; the pixel looked up is ``loc * size - 0.5`` (bilinear, zeros outside), i.e.
``F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatrex.errors import ConfigError

__all__ = [
    "MultiScaleDeformableAttention",
    "get_msda_implementation",
    "ms_deform_attn_core",
    "ms_deform_attn_core_pytorch",
    "ms_deform_attn_core_reference",
    "register_msda_implementation",
    "set_msda_implementation",
]

CoreFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Upper bound on the elements of one level's sample tensor (N*M, D, q_chunk, P) in the default core;
# 2**25 float32 elements = 128 MiB. Larger query sets are processed in chunks of queries.
_MAX_SAMPLE_ELEMENTS = 2**25


def _level_sizes(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    """(L, 2) int tensor [H_l, W_l] -> list of Python (H_l, W_l) (one host sync, no per-level syncs)."""
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) [H, W], got shape {tuple(spatial_shapes.shape)}")
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def _check_core_inputs(value: Tensor, sizes: list[tuple[int, int]], locs: Tensor, weights: Tensor) -> None:
    n, s, m, _ = value.shape
    if s != sum(h * w for h, w in sizes):
        raise ValueError(f"value has {s} tokens but spatial_shapes {sizes} sum to {sum(h * w for h, w in sizes)}")
    if locs.dim() != 6 or locs.shape[0] != n or locs.shape[2] != m or locs.shape[3] != len(sizes) or locs.shape[5] != 2:
        raise ValueError(f"sampling_locations must be (N={n}, Lq, M={m}, L={len(sizes)}, P, 2), got {tuple(locs.shape)}")
    if weights.shape != locs.shape[:-1]:
        raise ValueError(f"attention_weights must be {tuple(locs.shape[:-1])}, got {tuple(weights.shape)}")


def ms_deform_attn_core_reference(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Deformable-attention sampling, original stacked formulation (memory-hungry, easy to read).

    value (N, S, M, D); spatial_shapes (L, 2) int [H_l, W_l]; sampling_locations (N, Lq, M, L, P, 2)
    normalized (x, y); attention_weights (N, Lq, M, L, P), already softmaxed over L*P.
    Returns (N, Lq, M*D), channels ordered head-major (m * D + d).
    """
    sizes = _level_sizes(spatial_shapes)
    _check_core_inputs(value, sizes, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(sizes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    a = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


def ms_deform_attn_core_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    max_sample_elements: int = _MAX_SAMPLE_ELEMENTS,
) -> Tensor:
    """Deformable-attention sampling, accumulated level by level (default; bounded memory).

    Same contract and numbers (up to float summation order) as `ms_deform_attn_core_reference`.
    Differences that matter for speed and memory, not for results:
    - every (level, point) sample is multiplied by its weight and added into one (N*M, D, q)
      accumulator, so the largest temporary is one level's (N*M, D, P, q) samples;
    - queries are processed in chunks so those samples never exceed ``max_sample_elements``;
    - values are laid out channels-last and grids as (N*M, P, q, 2) so that both `grid_sample` and
      the weighted sum run over contiguous memory (measured ~1.6x faster than the stacked form on CPU).
    """
    sizes = _level_sizes(spatial_shapes)
    _check_core_inputs(value, sizes, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if lq == 0:
        return value.new_zeros(n, 0, m * d)
    # (N, H*W, M, D) -> (N*M, D, H, W) stored channels-last, i.e. (N*M, H, W, D) in memory.
    levels = [
        v.view(n, h, w, m, d).permute(0, 3, 1, 2, 4).reshape(n * m, h, w, d).permute(0, 3, 1, 2)
        for v, (h, w) in zip(value.split([h * w for h, w in sizes], dim=1), sizes)
    ]
    chunk = max(1, min(lq, max_sample_elements // max(1, n * m * d * n_points)))
    chunks = []
    for q0 in range(0, lq, chunk):
        # (N, q, M, L, P, 2) -> (N*M, L, P, q, 2); (N, q, M, L, P) -> (N*M, L, P, q)
        # (contiguous copies: strided operands send grid_sample / addcmul down slow paths)
        grid = (2 * sampling_locations[:, q0 : q0 + chunk] - 1).permute(0, 2, 3, 4, 1, 5).flatten(0, 1).contiguous()
        attn = attention_weights[:, q0 : q0 + chunk].permute(0, 2, 3, 4, 1).flatten(0, 1).contiguous()
        acc = value.new_zeros(n * m, d, grid.shape[3])  # (N*M, D, q)
        for lvl, v in enumerate(levels):
            s = F.grid_sample(v, grid[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
            for p in range(n_points):  # s (N*M, D, P, q)
                acc.addcmul_(s[:, :, p], attn[:, None, lvl, p])
        chunks.append(acc)
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


_IMPLEMENTATIONS: dict[str, CoreFn] = {
    "pytorch": ms_deform_attn_core_pytorch,
    "reference": ms_deform_attn_core_reference,
}
_active = "pytorch"


def register_msda_implementation(name: str, fn: CoreFn) -> None:
    """Make another core (e.g. a compiled CUDA kernel) selectable by `set_msda_implementation(name)`.

    ``fn`` must follow the `ms_deform_attn_core` contract exactly; bind it to the default with a
    parity test before using it.
    """
    if not callable(fn):
        raise TypeError(f"implementation {name!r} must be callable, got {type(fn).__name__}")
    _IMPLEMENTATIONS[name] = fn


def set_msda_implementation(name: str) -> None:
    """Choose the core used by `ms_deform_attn_core` and every `MultiScaleDeformableAttention`."""
    global _active
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown MSDA implementation {name!r}; choose one of {sorted(_IMPLEMENTATIONS)}")
    _active = name


def get_msda_implementation() -> str:
    """Name of the core currently used by `ms_deform_attn_core`."""
    return _active


def ms_deform_attn_core(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Multi-scale deformable attention sampling with the active implementation.

    value (N, S, M, D) per-head values, levels concatenated row-major; spatial_shapes (L, 2) int64
    [H_l, W_l]; sampling_locations (N, Lq, M, L, P, 2) normalized (x, y) (0 = left/top edge,
    1 = right/bottom edge; points outside read zeros); attention_weights (N, Lq, M, L, P) already
    softmaxed. Returns (N, Lq, M*D) in value's dtype: Σ_l Σ_p a · bilinear(V_l, x·W_l − 0.5, y·H_l − 0.5).
    """
    core = _IMPLEMENTATIONS[_active]
    if value.dtype in (torch.float16, torch.bfloat16):
        # Reduced precision: sample in float32. A bf16 location has ~3 significant digits (≈1 px error on
        # a 283-wide level), and CPU bf16 grid_sample returned NaN/garbage here. Output cast back.
        out = core(value.float(), spatial_shapes, sampling_locations.float(), attention_weights.float())
        return out.to(value.dtype)
    return core(value, spatial_shapes, sampling_locations, attention_weights)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over L feature levels with M heads and P sampling points per level and head.

    Parameter names follow the reference state dict: ``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ConfigError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if min(n_levels, n_heads, n_points) < 1:
            raise ConfigError(f"n_levels, n_heads, n_points must be >= 1, got {n_levels}, {n_heads}, {n_points}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference initialisation (used for training from scratch).

        Offset bias: head k points in direction k·2π/M (cos, sin scaled so the larger component is 1),
        multiplied by the point index 1..P, at every level; offset weight, attention weight and bias 0;
        xavier-uniform value/output projections with zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (M, 2)
        dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float64)  # point index 1..P
        bias = dirs[:, None, None, :] * scale[None, None, :, None]  # (M, 1, P, 2)
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _sampling_locations(self, reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
        """reference_points (N, Lq, L, 2|4), offsets (N, Lq, M, L, P, 2) -> locations, same shape as offsets."""
        if reference_points.shape[-1] == 2:
            # Encoder: offsets are in pixels of level l -> divide by (W_l, H_l).
            wh = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) [W_l, H_l]
            return reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            # Decoder: offsets are relative to the reference box; a point index of P spans half the box.
            xy = reference_points[:, :, None, :, None, :2]
            wh = reference_points[:, :, None, :, None, 2:]
            return xy + offsets / self.n_points * wh * 0.5
        raise ValueError(f"reference_points last dim must be 2 (xy) or 4 (cxcywh), got {reference_points.shape[-1]}")

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """query (N, Lq, C); reference_points (N, Lq, L, 2) normalized xy or (N, Lq, L, 4) normalized
        cxcywh; value (N, S, C) flattened levels; spatial_shapes (L, 2) [H_l, W_l]; level_start_index
        is accepted for API compatibility and unused (levels come from spatial_shapes); padding_mask
        (N, S) bool, True = padding (those values read as 0). Returns (N, Lq, C).
        """
        n, lq, _ = query.shape
        m, n_levels, p = self.n_heads, self.n_levels, self.n_points
        if spatial_shapes.shape[0] != n_levels or reference_points.shape[2] != n_levels:
            raise ValueError(
                f"module has n_levels={n_levels}; got spatial_shapes {tuple(spatial_shapes.shape)} "
                f"and reference_points {tuple(reference_points.shape)}"
            )
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, v.shape[1], m, self.d_model // m)  # (N, S, M, D)
        offsets = self.sampling_offsets(query).view(n, lq, m, n_levels, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, n_levels * p).softmax(-1)
        weights = weights.view(n, lq, m, n_levels, p)
        locations = self._sampling_locations(reference_points, offsets, spatial_shapes)
        return self.output_proj(ms_deform_attn_core(v, spatial_shapes, locations, weights))
