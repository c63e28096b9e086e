"""Typed results at the public boundary. Plain Python data (no tensors) so they pickle and JSON-dump.

Box format everywhere here: ``xyxy`` in pixels of the ORIGINAL image (after EXIF orientation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Proposals:
    """Object proposals for one image, best first.

    Attributes:
        boxes: ``[x1, y1, x2, y2]`` floats, xyxy pixels of the original image, clipped to it.
        scores: one float in [0, 1] per box (sigmoid of the UPN logit), non-increasing.
        image_size: ``(w, h)`` of the original image the boxes refer to.
        prompt_type: ``"fine_grained_prompt"`` or ``"coarse_grained_prompt"``.
    """

    boxes: list[list[float]]
    scores: list[float]
    image_size: tuple[int, int]
    prompt_type: str
    box_format: str = field(default="xyxy", init=False)

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"Proposals: {len(self.boxes)} boxes but {len(self.scores)} scores")
        if any(len(b) != 4 for b in self.boxes):
            raise ValueError("Proposals: every box must be [x1, y1, x2, y2]")
        if len(self.image_size) != 2:
            raise ValueError(f"Proposals: image_size must be (w, h), got {self.image_size!r}")
        if any(not math.isfinite(v) for b in self.boxes for v in b):
            raise ValueError("Proposals: box coordinates must be finite")

    def __len__(self) -> int:
        return len(self.boxes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain Python: ``{"boxes", "scores", "image_size", "prompt_type", "box_format"}``."""
        return {
            "boxes": [[float(v) for v in b] for b in self.boxes],
            "scores": [float(s) for s in self.scores],
            "image_size": [int(self.image_size[0]), int(self.image_size[1])],
            "prompt_type": self.prompt_type,
            "box_format": self.box_format,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Proposals":
        """Inverse of :meth:`to_dict` (extra keys such as ``"source"`` are ignored)."""
        if data.get("box_format", "xyxy") != "xyxy":
            raise ValueError(f"Proposals.from_dict: box_format must be 'xyxy', got {data['box_format']!r}")
        return cls(
            boxes=[[float(v) for v in b] for b in data["boxes"]],
            scores=[float(s) for s in data["scores"]],
            image_size=(int(data["image_size"][0]), int(data["image_size"][1])),
            prompt_type=str(data["prompt_type"]),
        )
