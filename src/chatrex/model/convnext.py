"""ConvNeXt trunk used as ChatRex's high-resolution vision tower (`vision_tower_aux`).

Only the stem and the four stages of a ConvNeXt (no final norm, no head), returning all four stage
maps. Parameter names follow the reference checkpoint: `vision_stem.{0,1}`,
`vision_stages.{i}.downsample.{0,1}` (stages 1-3), `vision_stages.{i}.blocks.{j}.{conv_dw,norm,mlp.fc1,
mlp.fc2,ramma}` — the layer-scale is called `ramma` (timm's `gamma`, renamed upstream so transformers'
legacy `gamma`->`weight` key fix-up leaves it alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW map (keys `weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H, W, C) so layer_norm normalizes the channels, then back.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNextMlp(nn.Module):
    """Linear C -> hidden -> C with exact (erf) GELU, applied on the last dim (NHWC)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNextBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm (NHWC) -> MLP x4 -> per-channel scale `ramma` -> residual."""

    def __init__(self, dim: int, mlp_ratio: int = 4, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ConvNextMlp(dim, mlp_ratio * dim)
        self.ramma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # (B, C, H, W)
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.mlp(self.norm(x))
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        # (C,) -> (1, C, 1, 1): scale each channel's branch before the residual.
        return shortcut + x * self.ramma.reshape(1, -1, 1, 1)


class ConvNextStage(nn.Module):
    """Optional downsample (LayerNorm2d + conv 2x2/2) followed by `depth` blocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, downsample: bool) -> None:
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=LAYER_NORM_EPS), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNextBlock(out_dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNextTower(nn.Module):
    """Stem (conv 4x4/4 + LayerNorm2d) and 4 stages; returns every stage's output map.

    Input (B, 3, S, S) normalized pixels; output [s0, s1, s2, s3] with s_i of shape
    (B, dims[i], S / (4 * 2**i), S / (4 * 2**i)). No final norm (the reference uses raw stage maps).
    """

    def __init__(self, dims: list[int], depths: list[int], in_channels: int = 3) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"dims {dims} and depths {depths} must have the same length")
        self.vision_stem = nn.Sequential(
            nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=LAYER_NORM_EPS)
        )
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            in_dim = dims[i - 1] if i > 0 else dims[0]
            stages.append(ConvNextStage(in_dim, dim, depth, downsample=i > 0))
        self.vision_stages = nn.ModuleList(stages)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.vision_stem(pixel_values)  # (B, dims[0], S/4, S/4)
        maps = []
        for stage in self.vision_stages:
            x = stage(x)
            maps.append(x)
        return maps


__all__ = ["ConvNextTower", "ConvNextBlock", "ConvNextStage", "LayerNorm2d"]
