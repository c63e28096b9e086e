"""Synthetic "shapes" world and training/eval data: scenes, ChatRex instruction samples, COCO export.

Light to import (numpy + PIL); nothing here imports torch.
"""

from chatrex.data.synthetic import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    SyntheticDataset,
    sample_scene,
    scene_stream,
    split_seed,
    upn_targets,
)

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "SyntheticDataset",
    "sample_scene",
    "scene_stream",
    "split_seed",
    "upn_targets",
]
