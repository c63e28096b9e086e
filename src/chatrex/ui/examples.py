"""The bundled example scenes of the web demo (package data in ``chatrex/assets/examples``).

Three scenes of the synthetic shapes world (held-out "test" split seeds, so the tiny model never
trained on them), saved once as PNG with a ``examples.json`` manifest of their objects (category,
box xyxy px). Regenerate with ``python -m chatrex.ui.examples`` (needs `chatrex.data.synthetic`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

MANIFEST = "examples.json"
_BASE_SEED = 2026


def examples_dir() -> Path:
    """Folder of the bundled example PNGs and their manifest."""
    return Path(str(resources.files("chatrex").joinpath("assets", "examples")))


def example_manifest() -> list[dict]:
    """[{"file", "width", "height", "objects": [{"category", "box"}]}] of the bundled examples."""
    path = examples_dir() / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else []


def example_paths() -> list[Path]:
    """Absolute paths of the bundled example images (empty when none are bundled)."""
    return [examples_dir() / item["file"] for item in example_manifest()]


def _good_scene(scene) -> bool:
    # 3-5 shapes, each >= 32 px and all shapes different, so drawing around one and asking is unambiguous.
    shapes = [o.shape for o in scene.objects]
    return 3 <= len(shapes) <= 5 and len(set(shapes)) == len(shapes) and min(o.size_px for o in scene.objects) >= 32


def make_examples(out_dir: str | Path, count: int = 3) -> list[dict]:
    """Render `count` held-out scenes to `out_dir` as example_K.png + examples.json; returns the manifest."""
    from chatrex.data.synthetic import sample_scene, split_seed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, index = [], 0
    while len(manifest) < count:
        scene = sample_scene(split_seed(_BASE_SEED, index, "test"), min_objects=3, max_objects=5, obj_size=(32, 96))
        index += 1
        if not _good_scene(scene):
            continue
        name = f"example_{len(manifest)}.png"
        scene.image.save(out_dir / name, optimize=True)
        manifest.append({
            "file": name, "width": scene.width, "height": scene.height, "seed": scene.seed,
            "objects": [{"category": o.category, "shape": o.shape, "box": [round(float(v), 1) for v in o.box]}
                        for o in scene.objects],
        })
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":  # pragma: no cover - one-off asset generation
    for item in make_examples(examples_dir()):
        print(item["file"], [o["category"] for o in item["objects"]])
