"""Multi-level RoI object encoder (the reference's `MultiLevelROIVisualPrompt`; no parameters).

For K boxes (xyxy, pixels of the square high-res canvas) and the four ConvNeXt stage maps:
    F   = concat_ch[s0, up(s1), up(s2), up(s3)]      all at s0's size, float32 (bilinear, align_corners=False)
    roi = mean_7x7( roi_align(F, boxes, 7, spatial_scale = s0_side / canvas, sampling_ratio=-1, aligned=False) )
    pe  = sine embedding of (cx, cy, w, h) / canvas   (order cy, cx, w, h; interleaved sin/cos)
    out = roi + pe                                    (K, sum(dims)) -> `mm_object_projector` later
RoIAlign treats every channel on its own, so it runs level by level and the (K, C_l) results are
concatenated: the same numbers as aligning the concatenated map, without holding the full
2880-channel 192x192 map (~425 MB fp32) at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chatrex.ops.boxes import box_xyxy_to_cxcywh
from chatrex.ops.position import object_box_embedding
from chatrex.ops.roi_align import roi_align

ROI_OUTPUT_SIZE = 7


def normalized_cxcywh(boxes_xyxy: torch.Tensor, canvas: float) -> torch.Tensor:
    """(K, 4) xyxy canvas pixels -> (K, 4) float32 (cx, cy, w, h) / canvas, never written in place.

    Float32 order of the reference: divide x1, y1, x2, y2 by the canvas, then w = x2 - x1,
    cx = x1 + w / 2 (not (x1 + x2) / 2). No clipping: outside or inverted boxes stay as they are.
    """
    # The division makes a new tensor, so the caller's boxes are never touched (the reference's were).
    return box_xyxy_to_cxcywh(boxes_xyxy.to(torch.float32) / float(canvas))


class MultiLevelRoIEncoder(nn.Module):
    """Parameter-free object feature extractor. `canvas_size` is the high-res input side (pixels)."""

    def __init__(self, canvas_size: int, output_size: int = ROI_OUTPUT_SIZE, add_pos_embedding: bool = True) -> None:
        super().__init__()
        self.canvas_size = int(canvas_size)
        self.output_size = int(output_size)
        self.add_pos_embedding = add_pos_embedding

    def roi_features(self, maps: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """RoI 7x7 mean of every level. maps: 4 x (B, C_l, H_l, W_l); boxes: B x (K_b, 4) xyxy canvas px.

        Returns (sum K_b, sum C_l) float32, rows in image order then box order.
        """
        size = maps[0].shape[-2:]  # s0 grid, e.g. 192x192 for a 768 canvas
        scale = maps[0].shape[-1] / self.canvas_size  # 0.25: the ConvNeXt stem has stride 4
        rois = [b.reshape(-1, 4).to(device=maps[0].device, dtype=torch.float32) for b in boxes]
        if sum(r.shape[0] for r in rois) == 0:
            return maps[0].new_zeros((0, sum(m.shape[1] for m in maps)), dtype=torch.float32)
        per_level = []
        for i, level in enumerate(maps):
            level = level.to(torch.float32)
            if i > 0:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            # (sum K, C_l, 7, 7) -> mean over the bins -> (sum K, C_l)
            pooled = roi_align(level, rois, self.output_size, spatial_scale=scale, sampling_ratio=-1, aligned=False)
            per_level.append(pooled.mean(dim=(2, 3)))
            del level, pooled
        return torch.cat(per_level, dim=1)

    def box_embedding(self, boxes: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 4) xyxy canvas px -> ((K, 4) normalized cxcywh, (K, dim) sine embedding)."""
        cxcywh = normalized_cxcywh(boxes, self.canvas_size)
        return cxcywh, object_box_embedding(cxcywh, dim)

    def forward(self, maps: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """maps: the 4 ConvNeXt stage maps (B, C_l, H_l, W_l); boxes: B tensors (K_b, 4) xyxy canvas px.

        Returns (sum K_b, sum C_l) float32 object features (RoI mean + box embedding).
        """
        if len(boxes) != maps[0].shape[0]:
            raise ValueError(f"got box lists for {len(boxes)} images but feature maps for {maps[0].shape[0]}")
        features = self.roi_features(maps, boxes)
        if self.add_pos_embedding and features.shape[0] > 0:
            all_boxes = torch.cat([b.reshape(-1, 4) for b in boxes]).to(features.device)
            _, pos = self.box_embedding(all_boxes, features.shape[1])
            features = features + pos
        return features


__all__ = ["MultiLevelRoIEncoder", "normalized_cxcywh", "ROI_OUTPUT_SIZE"]
