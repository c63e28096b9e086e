"""Low-resolution CLIP tower, image-token fusion and the MLP projectors.

Image tokens (chatrex_reference.md §3): CLIP `hidden_states[layer][:, 1:]` (B, T, Dc) concatenated on
channels with the flattened last ConvNeXt stage (B, T, Dx) -> (B, T, Dc + Dx) -> `mm_projector`.
Both grids are row-major with the same side, so token i of each tower covers the same image cell.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel


class CLIPVisionTower(nn.Module):
    """Holds a transformers `CLIPVisionModel` under `.vision_tower`, so the model's keys are
    `vision_tower.vision_tower.*` (the reference's `vision_tower.vision_tower.vision_model.*`; see
    `chatrex.model.checkpoint.reference_rename_table` for the installed transformers' spelling)."""

    def __init__(self, config: CLIPVisionConfig, feature_layer: int = -2) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)
        self.feature_layer = feature_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized pixels -> (B, (S/patch)^2, hidden) patch features (CLS dropped),
        in the dtype of `pixel_values` (the reference casts back to the input dtype)."""
        weight = self.vision_tower.get_input_embeddings().weight  # the patch conv: CLIP's dtype and device
        out = self.vision_tower(pixel_values.to(weight.dtype), output_hidden_states=True)
        # hidden_states[0] is the embedding output after pre_layrnorm; [-2] = output of the
        # second-to-last encoder layer, before post_layernorm. Index 0 along tokens is CLS.
        return out.hidden_states[self.feature_layer][:, 1:].to(pixel_values.dtype)


def build_projector(in_features: int, out_features: int) -> nn.Sequential:
    """LLaVA's "mlp2x_gelu": Linear -> exact GELU -> Linear (keys `0.*`, `2.*`)."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def flatten_last_stage(last_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major over the grid (the reference's view+transpose)."""
    return last_map.flatten(2).transpose(1, 2)


def fuse_image_features(clip_features: torch.Tensor, last_map: torch.Tensor) -> torch.Tensor:
    """Concatenate [CLIP (B, T, Dc) | ConvNeXt last stage (B, Dx, h, w) flattened] -> (B, T, Dc + Dx).

    Raises ValueError when the token counts differ (h * w must equal T).
    """
    flat = flatten_last_stage(last_map)
    if flat.shape[1] != clip_features.shape[1]:
        raise ValueError(
            f"the ConvNeXt last stage gives {flat.shape[1]} tokens but CLIP gives {clip_features.shape[1]}; "
            "the high-res input must be (low-res side / patch) * 32 pixels wide"
        )
    return torch.cat([clip_features, flat.to(clip_features.dtype)], dim=-1)


__all__ = ["CLIPVisionTower", "build_projector", "flatten_last_stage", "fuse_image_features"]
