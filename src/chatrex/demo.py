"""`chatrex demo`: every task type on bundled example scenes with the embedded model (or yours).

Prints the grounded answers and writes one overlay PNG per task. The example scenes are held-out
scenes of the synthetic "shapes" world (`chatrex/assets/examples/`), the world the embedded tiny models
are trained on; with `--mllm/--upn` the same tasks run on real weights and `--image` files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence




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
    """(name, PIL image, categories present) for the bundled example scenes (held-out synthetic scenes
    shipped in `chatrex/assets/examples/`, listed with their objects in examples.json)."""
    import json
    from importlib import resources

    from PIL import Image

    folder = resources.files("chatrex").joinpath("assets", "examples")
    scenes = []
    for entry in json.loads(folder.joinpath("examples.json").read_text()):
        with folder.joinpath(entry["file"]).open("rb") as f:
            image = Image.open(f).convert("RGB")
        cats = sorted({obj["category"] for obj in entry["objects"]})
        scenes.append((Path(entry["file"]).stem, image, cats))
    return scenes


def run_proposals(predictor, images, out: Path) -> list[Path]:
    """UPN fine- and coarse-grained proposals on each image, drawn with their <objK> indices."""
    from chatrex.viz import draw_proposals

    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    for name, image, _ in images:
        for prompt in ("fine_grained_prompt", "coarse_grained_prompt"):
            found = predictor.predict(image, prompt)[0]
            short = prompt.split("_")[0]
            print(f"  {name}: {len(found)} {short}-grained proposals "
                  f"(scores {', '.join(f'{s:.2f}' for s in found.scores[:6])}{', …' if len(found) > 6 else ''})")
            written.append(_save(draw_proposals(image, found.boxes, found.scores), out / f"{name}_{short}.png"))
    return written


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
    from chatrex import embedded
    from chatrex.errors import MissingWeightsError
    from chatrex.images import load_image

    start = time.perf_counter()
    out = Path(args.out)
    if args.image:
        images = [(Path(p).stem, load_image(p), []) for p in args.image]
    else:
        images = example_scenes()
    if args.mllm is None and embedded.mllm_dir() is None:
        # This build ships the tiny UPN but not (yet) the tiny ChatRex: show what runs, say what is missing.
        found = embedded.upn() if args.upn is None else None
        predictor = embedded.upn_predictor(args.device) if found is not None else None
        if predictor is None:
            raise MissingWeightsError("this build bundles no embedded model; pass --mllm path/to/ChatRex-7B "
                                      "--upn path/to/upn_large.pth")
        embedded.announce()
        print("chatrex: note: the embedded tiny ChatRex is not bundled in this build yet, so the demo shows "
              "UPN proposals only; pass --mllm path/to/ChatRex-7B --upn path/to/upn_large.pth for every task",
              file=sys.stderr)
        if found.note:
            print(f"chatrex: note: embedded UPN: {found.note}", file=sys.stderr)
        written = run_proposals(predictor, images, out)
    else:
        from chatrex.pipeline import ChatRex

        rex = ChatRex.from_pretrained(mllm=args.mllm, upn=args.upn, device=args.device, dtype=args.dtype,
                                      upn_config=args.upn_config, max_new_tokens=args.max_new_tokens)
        written = run_proposals(rex.upn, images, out) if rex.upn is not None else []
        written += run_demo(rex, images, out)
    print(f"\nwrote {len(written)} overlays to {out.resolve()} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
