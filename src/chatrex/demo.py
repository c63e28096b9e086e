"""`chatrex demo`: every task type on bundled example scenes with the embedded model (or yours).

Prints the grounded answers and writes one overlay PNG per task. The example scenes come from the
synthetic "shapes" world (`chatrex.data.synthetic`, fixed seeds), the world the embedded tiny model was
trained on; with `--mllm/--upn` the same tasks run on real weights and `--image` files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

EXAMPLE_SEEDS = (7, 21, 42)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatrex demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for the overlay PNGs (default: current directory)")
    parser.add_argument("--mllm", default=None, help="ChatRex model folder (default: the embedded tiny model)")
    parser.add_argument("--upn", default=None, help="UPN checkpoint (default: the embedded tiny UPN)")
    parser.add_argument("--upn-config", default="large", help="UPN preset of --upn (large|small|tiny)")
    parser.add_argument("--image", action="append", default=None,
                        help="your own image(s) instead of the bundled scenes (repeatable)")
    parser.add_argument("--device", default=None, help="torch device (default: accelerator if any, else cpu)")
    parser.add_argument("--dtype", default=None, help="LLM dtype: bf16 | fp32 (default bf16)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    return parser


def example_scenes() -> list[tuple[str, object, list[str]]]:
    """(name, PIL image, categories present) for the bundled example scenes."""
    from chatrex.data.synthetic import sample_scene

    scenes = []
    for seed in EXAMPLE_SEEDS:
        scene = sample_scene(seed)
        cats = sorted({obj.category for obj in scene.objects})
        scenes.append((f"scene{seed}", scene.image, cats))
    return scenes


def _print_answer(title: str, result) -> None:
    print(f"  {title}: {result.raw}")
    for phrase in result.phrases:
        print(f"      {phrase.phrase!r} -> boxes {phrase.indices}")
    for warning in getattr(result, "warnings", []) or []:
        print(f"      warning: {warning}")


def run_demo(rex, images: list[tuple[str, object, list[str]]], out: Path) -> list[Path]:
    """Run detection, region captions, a grounded caption and a conversation on each image."""
    from chatrex.viz import draw_answer

    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    for name, image, cats in images:
        print(f"\n== {name} ({image.size[0]}x{image.size[1]})")
        targets = cats[:2] if cats else ["person"]
        det = rex.detect(image, targets)
        print(f"  detect {'; '.join(targets)}: {len(det.detections)} detections")
        for d in det.detections:
            print(f"      {d.category}: box {[round(v, 1) for v in d.box]} score {d.score:.2f} (<obj{d.index}>)")
        written.append(_save(draw_answer(image, det.boxes.boxes, det.answer), out / f"{name}_detect.png"))

        boxes = [d.box for d in det.detections][:2] or [[0, 0, image.size[0] / 2, image.size[1] / 2]]
        regions = rex.caption_region(image, boxes, style="brief")
        for region in regions.regions:
            print(f"  region <obj{region.index}> {[round(v, 1) for v in region.box]}: {region.caption}")

        caption = rex.caption_image(image)
        _print_answer("grounded caption", caption)
        written.append(_save(draw_answer(image, caption.boxes.boxes, caption.answer), out / f"{name}_caption.png"))

        turn = rex.chat(image, f"Where is the {targets[0]}?")
        _print_answer("chat", turn)
        written.append(_save(draw_answer(image, turn.boxes.boxes, turn.answer), out / f"{name}_chat.png"))
    return written


def _save(image, path: Path) -> Path:
    image.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from chatrex.images import load_image
    from chatrex.pipeline import ChatRex

    start = time.perf_counter()
    rex = ChatRex.from_pretrained(mllm=args.mllm, upn=args.upn, device=args.device, dtype=args.dtype,
                                  upn_config=args.upn_config, max_new_tokens=args.max_new_tokens)
    if args.image:
        images = [(Path(p).stem, load_image(p), []) for p in args.image]
    else:
        images = example_scenes()
    written = run_demo(rex, images, Path(args.out))
    print(f"\nwrote {len(written)} overlays to {Path(args.out).resolve()} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
