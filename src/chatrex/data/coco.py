"""COCO-format export of synthetic scenes, and a small COCO reader for the evaluators.

The annotation file is plain COCO detection (images, annotations with `bbox` xywh px, `area`,
`iscrowd` 0, categories with ids 1..40 in `CATEGORIES` order), so pycocotools and any COCO tool read
it. Extra keys carry what ChatRex evaluation needs and COCO has no place for:

- annotation: "phrase", "brief", "sentence" (region captions), "size_px", "object_index";
- "refs": [{"id", "image_id", "expression", "ann_ids"}] referring expressions (RefCOCO-like);
- "captions": [{"image_id", "brief", "detailed"}] grounded captions whose `<objK>` index the image's
  annotations in ascending id order (= scene object order);
- image: "seed", "renderer", "background".

`load_coco` reads such a file (or any COCO detection / RefCOCO-style file with "refs") into a
`CocoData` without needing pycocotools; `CocoData.to_pycocotools()` gives a `pycocotools.coco.COCO`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from chatrex.data.synthetic import CATEGORIES, Scene, scene_stream
from chatrex.errors import InvalidImageError


def scenes_to_coco(scenes: Iterable[Scene], image_dir: str | os.PathLike, categories: Sequence[str] = CATEGORIES,
                   start_image_id: int = 1) -> dict[str, Any]:
    """Write every scene's image as `image_dir/{image_id:06d}.png` and return the COCO dict.

    file_name is relative to image_dir. Category ids are 1-based positions in `categories` (a scene
    object whose category is missing raises ValueError). Annotation ids start at 1.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    cat_id = {name: i + 1 for i, name in enumerate(categories)}
    out: dict[str, Any] = {
        "info": {"description": "chatrex synthetic shapes world", "version": "1"},
        "licenses": [],
        "images": [], "annotations": [], "refs": [], "captions": [],
        "categories": [{"id": cat_id[c], "name": c, "supercategory": c.split()[-1]} for c in categories],
    }
    for image_id, scene in enumerate(scenes, start=start_image_id):
        name = f"{image_id:06d}.png"
        scene.image.save(image_dir / name, format="PNG", compress_level=1)
        out["images"].append({"id": image_id, "file_name": name, "width": scene.width, "height": scene.height,
                              "seed": scene.seed, "renderer": scene.renderer, "background": scene.background})
        ann_ids = []
        for obj in scene.objects:
            if obj.category not in cat_id:
                raise ValueError(f"category {obj.category!r} of scene {scene.seed} is not in the category list")
            x1, y1, x2, y2 = obj.box
            ann_id = len(out["annotations"]) + 1
            ann_ids.append(ann_id)
            out["annotations"].append({
                "id": ann_id, "image_id": image_id, "category_id": cat_id[obj.category],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "phrase": obj.phrase, "brief": obj.brief, "sentence": obj.sentence,
                "size_px": obj.size_px, "object_index": obj.index,
            })
        for expression, objs in scene.referring_expressions():
            out["refs"].append({"id": len(out["refs"]) + 1, "image_id": image_id, "expression": expression,
                                "ann_ids": [ann_ids[o] for o in objs]})
        out["captions"].append({"image_id": image_id, "brief": scene.caption(), "detailed": scene.caption(True)})
    return out


def write_synthetic_coco(out_dir: str | os.PathLike, n: int, seed: int = 0, renderer: str = "default",
                         split: str = "test", **scene_kwargs) -> Path:
    """Render `n` scenes of `split` to `out_dir/images/*.png` + `out_dir/annotations.json`; returns the json path."""
    out_dir = Path(out_dir)
    scenes = scene_stream(seed, n, split=split, renderer=renderer, **scene_kwargs)
    data = scenes_to_coco(scenes, out_dir / "images")
    data["info"].update({"seed": seed, "split": split, "renderer": renderer, "image_dir": "images"})
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(data))
    return path


@dataclass
class CocoData:
    """A loaded COCO file. Boxes in `anns_by_image` stay COCO xywh px; `boxes_xyxy(image_id)` converts."""

    path: Path
    image_dir: Path
    data: dict[str, Any] = field(repr=False)
    images: dict[int, dict] = field(repr=False)
    anns_by_image: dict[int, list[dict]] = field(repr=False)
    category_names: dict[int, str] = field(repr=False)
    refs: list[dict] = field(repr=False)

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.images)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def load_image(self, image_id: int) -> Image.Image:
        path = self.image_path(image_id)
        if not path.is_file():
            raise InvalidImageError(f"image {path} listed in {self.path} does not exist; pass image_dir= "
                                    "pointing at the folder holding the images")
        with Image.open(path) as im:
            return im.convert("RGB")

    def boxes_xyxy(self, image_id: int) -> list[list[float]]:
        """xyxy px boxes of the image's annotations, in annotation id order."""
        return [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in self.anns_by_image.get(image_id, [])]

    def categories_of(self, image_id: int) -> list[str]:
        return [self.category_names[a["category_id"]] for a in self.anns_by_image.get(image_id, [])]

    def to_pycocotools(self):
        """A `pycocotools.coco.COCO` built from the same dict (pycocotools is imported here, lazily)."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.data
        coco.createIndex()
        return coco


def load_coco(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> CocoData:
    """Read a COCO annotation json. image_dir defaults to info.image_dir next to the file (our export),
    else the json's folder. Annotations of each image are sorted by id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} not found; create one with "
                                "chatrex.data.coco.write_synthetic_coco(out_dir, n)")
    data = json.loads(path.read_text())
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a COCO detection file: keys {missing} are missing")
    if image_dir is None:
        image_dir = path.parent / data.get("info", {}).get("image_dir", "")
    anns: dict[int, list[dict]] = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        anns.setdefault(a["image_id"], []).append(a)
    return CocoData(path=path, image_dir=Path(image_dir), data=data,
                    images={im["id"]: im for im in data["images"]}, anns_by_image=anns,
                    category_names={c["id"]: c["name"] for c in data["categories"]}, refs=list(data.get("refs", [])))


def main(argv: Sequence[str] | None = None) -> int:
    """`chatrex data --out DIR [-n 300] [--seed 0] [--renderer default|alt] [--split test]`: a held-out
    synthetic set in COCO format (images/*.png + annotations.json) for `chatrex eval`."""
    import argparse

    parser = argparse.ArgumentParser(prog="chatrex data", description=main.__doc__.split(":", 1)[0])
    parser.add_argument("--out", required=True, help="output folder (images/ + annotations.json)")
    parser.add_argument("-n", type=int, default=300, help="number of scenes (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--renderer", choices=["default", "alt"], default="default",
                        help="alt: the second renderer (other sizes, backgrounds, drawing) for held-out checks")
    parser.add_argument("--split", choices=["train", "val", "test"], default="test")
    args = parser.parse_args(argv)
    path = write_synthetic_coco(args.out, args.n, seed=args.seed, renderer=args.renderer, split=args.split)
    print(f"wrote {args.n} scenes ({args.renderer} renderer, {args.split} split) -> {path}")
    return 0
