"""Task subcommands of the ``chatrex`` CLI: ``detect``, ``refer``, ``caption``, ``chat``.

Each command takes images (files, folders, globs), runs `chatrex.pipeline.ChatRex`, and writes into
``--out``: ``<stem>.json`` (the result's ``to_dict()`` plus ``image``, ``image_id`` and ``warnings``)
and ``<stem>.png`` (the answer drawn on the image). ``detect`` / ``refer`` also write COCO results with
``--coco FILE`` (plus ``coco_images.json`` in ``--out``: a COCO dataset stub with the images and
categories, so ``COCO(stub).loadRes(FILE)`` works). Answers naming boxes that do not exist become
``warnings`` in the JSON and are drawn nowhere. Errors are one line on stderr with exit code 1 (see
`chatrex.cli.main`). Heavy imports happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatrex.cli import _error, expand_images, unique_stems
from chatrex.errors import InvalidImageError, MissingWeightsError


# ----------------------------------------------------------------------------- shared helpers
def parse_box(text: str) -> list[float]:
    """"x1,y1,x2,y2" (pixels of the image) → [x1, y1, x2, y2]; argparse type."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r} must be four numbers x1,y1,x2,y2 (pixels)")
    return values


class Progress:
    """A plain stderr progress bar (`[#####-----] 3/10 name`), shown only for more than one item."""

    def __init__(self, total: int, stream=None, width: int = 24) -> None:
        self.total, self.stream, self.width, self.done = total, stream or sys.stderr, width, 0

    def step(self, label: str) -> None:
        self.done += 1
        if self.total <= 1:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:40]:<40}")
        self._open = self.done < self.total
        self.stream.write("" if self._open else "\n")
        self.stream.flush()

    def break_line(self) -> None:
        """End a half-drawn bar line so the next message starts on its own line."""
        if getattr(self, "_open", False):
            self.stream.write("\n")
            self._open = False


def _add_common(p: argparse.ArgumentParser, *, many_images: bool = True, boxes: bool = True) -> None:
    if many_images:
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--mllm", metavar="PATH", help="ChatRex model folder (config.json, tokenizer, *.safetensors)")
    p.add_argument("--upn", metavar="CKPT", help="UPN checkpoint; needed unless boxes are given")
    p.add_argument("--upn-config", default="large", choices=["large", "small", "tiny"], help="UPN size preset")
    p.add_argument("--upn-short", type=int, default=None,
                   help="UPN resize: short side in px (default: the model's rule, 800 for upn_large)")
    p.add_argument("--min-score", type=float, default=0.3, help="proposal score threshold (default 0.3)")
    p.add_argument("--nms", type=float, default=0.8, help="proposal NMS IoU, 0 disables (default 0.8)")
    if boxes:
        p.add_argument("--box", dest="boxes", type=parse_box, nargs="+", action="extend", metavar="X1,Y1,X2,Y2",
                       help="use these boxes (pixels, box k is <objk>) instead of UPN proposals")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: accelerator if any, else cpu)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="LLM dtype (default bf16)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default 512)")
    p.add_argument("--out", default="chatrex_out", help="output folder (created; default ./chatrex_out)")


def _load_pipeline(args: argparse.Namespace, needs_upn: bool):
    if needs_upn and not args.upn and args.mllm:  # without --mllm the embedded pair brings its own UPN
        raise MissingWeightsError("no boxes given and no UPN to propose them: pass --upn upn_large.pth "
                                  "(from the ChatRex release) or --box x1,y1,x2,y2")
    if args.mllm and not Path(args.mllm).is_dir():
        raise MissingWeightsError(f"--mllm {args.mllm} is not a folder; pass the ChatRex model folder")
    from chatrex.pipeline import ChatRex  # heavy: torch + transformers

    return ChatRex.from_pretrained(mllm=args.mllm, upn=args.upn, device=args.device, dtype=args.dtype,
                                   upn_config=args.upn_config,
                                   upn_options={"short": args.upn_short} if args.upn_short else None,
                                   max_new_tokens=args.max_new_tokens)


def _settings(args: argparse.Namespace, prompt_type: str):
    from chatrex.pipeline import ProposalSettings

    return ProposalSettings(prompt_type, args.min_score, args.nms)


def _write(out_dir: Path, stem: str, path: Path, result: Any, overlay, extra: dict | None = None) -> Path:
    record = {"image": str(path), **(extra or {}), **result.to_dict(), "warnings": list(result.problems)}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    overlay.save(out_dir / f"{stem}.png")
    return json_path


def _for_each_image(command: str, args: argparse.Namespace,
                    handle: Callable[[Path, str, Any, int], None]) -> int:
    """Expand the images, call handle(path, stem, PIL image, image_id) per image; returns #failures."""
    from chatrex.images import load_image

    paths = expand_images(args.images)
    stems = unique_stems(paths)
    numeric = all(p.stem.isdigit() for p in paths)  # COCO-style names: the number is the image id
    progress, failures = Progress(len(paths)), 0
    for i, (path, stem) in enumerate(zip(paths, stems)):
        try:
            image = load_image(path)
        except InvalidImageError as exc:
            progress.break_line()
            _error(command, str(exc))
            failures += 1
        else:
            progress.break_line()  # the handler prints a line to stdout
            handle(path, stem, image, int(path.stem) if numeric else i + 1)
        progress.step(path.name)
    if failures:
        _error(command, f"{failures} of {len(paths)} images could not be read (see above)")
    return failures


# ----------------------------------------------------------------------------- detect / refer
def add_detect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "detect", help="detect categories (UPN proposals + ChatRex picks the boxes)",
        description="Ask ChatRex which boxes show the given categories. Writes <stem>.json / <stem>.png "
                    "per image and, with --coco, COCO detection results.",
        epilog='example: chatrex detect photos/ -c "person; pigeon" --mllm ChatRex-7B --upn upn_large.pth',
    )
    p.add_argument("-c", "--categories", required=True, help='categories separated by ";", e.g. "person; pigeon"')
    _add_detection_outputs(p)
    p.set_defaults(func=run_detect)


def add_refer(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "refer", help="find the object(s) a referring expression describes",
        description="Ask ChatRex which boxes match a referring expression (kept whole, ';' included).",
        epilog='example: chatrex refer street.jpg -e "the man in yellow shirt" --mllm ChatRex-7B --upn upn_large.pth',
    )
    p.add_argument("-e", "--expression", required=True, help='e.g. "the man in yellow shirt"')
    _add_detection_outputs(p)
    p.set_defaults(func=run_refer)


def _add_detection_outputs(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--coco", metavar="FILE", help="also write COCO results (image_id, category_id, bbox xywh, score)")
    p.add_argument("--coco-categories", metavar="JSON",
                   help='category name → COCO id, as a JSON file {"person": 1, ...} (default: 1.. in the order given)')


def run_detect(args: argparse.Namespace) -> int:
    from chatrex.prompts import join_targets

    categories = join_targets(args.categories).split("; ")
    return _run_detection("detect", args, categories, lambda rex, img, boxes, s: rex.detect(
        img, categories, boxes, proposals=s))


def run_refer(args: argparse.Namespace) -> int:
    expression = args.expression.strip()
    if not expression:
        raise ValueError("--expression is empty; describe the object to find")
    return _run_detection("refer", args, [expression], lambda rex, img, boxes, s: rex.refer(
        img, expression, boxes, proposals=s))


def _run_detection(command: str, args: argparse.Namespace, categories: list[str], ask) -> int:
    from chatrex.results import default_category_map
    from chatrex.viz import draw_groups

    cmap = _category_map(args.coco_categories, categories)
    rex = _load_pipeline(args, needs_upn=not args.boxes)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, "fine_grained_prompt")
    coco_results: list[dict] = []
    coco_images: list[dict] = []

    def handle(path: Path, stem: str, image, image_id: int) -> None:
        result = ask(rex, image, args.boxes, settings)
        groups: dict[str, list[int]] = {}
        for det in result.detections:
            groups.setdefault(det.category, []).append(det.index)
        overlay, _ = draw_groups(image, result.boxes.boxes, list(groups.items()))
        coco_results.extend(result.to_coco(image_id, cmap))
        coco_images.append({"id": image_id, "file_name": str(path), "width": image.size[0], "height": image.size[1]})
        json_path = _write(out_dir, stem, path, result, overlay, {"image_id": image_id})
        print(f"{path}: {len(result.detections)} detections from {len(result.boxes)} boxes -> {json_path}")

    failures = _for_each_image(command, args, handle)
    if args.coco:
        Path(args.coco).parent.mkdir(parents=True, exist_ok=True)
        Path(args.coco).write_text(json.dumps(coco_results))
        stub = {"images": coco_images, "annotations": [],
                "categories": [{"id": i, "name": n} for n, i in (cmap or default_category_map(categories)).items()]}
        (out_dir / "coco_images.json").write_text(json.dumps(stub, indent=1))
        print(f"COCO results: {args.coco} ({len(coco_results)} detections); dataset stub: {out_dir / 'coco_images.json'}")
    return 1 if failures else 0


def _category_map(path: str | None, categories: list[str]) -> dict[str, int] | None:
    from chatrex.results import default_category_map

    if not path:
        return default_category_map(categories)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read --coco-categories {path}: {exc}") from None
    if isinstance(data, dict) and "categories" in data:  # a COCO annotation file
        data = {c["name"]: c["id"] for c in data["categories"]}
    missing = [c for c in categories if c not in data]
    if missing:
        raise ValueError(f"--coco-categories {path} has no id for {missing}; add them")
    return {str(k): int(v) for k, v in data.items()}


# ----------------------------------------------------------------------------- caption
def add_caption(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "caption", help="caption regions (--region) or the whole image with grounding (--image)",
        description="--region BOX...: one caption per box (style with --style). --image: a grounded caption "
                    "of the whole image (--detailed for a long one), phrases linked to UPN boxes.",
        epilog="examples: chatrex caption dog.jpg --region 73,56,227,216 --style sentence --mllm ChatRex-7B\n"
               "          chatrex caption room.jpg --image --detailed --mllm ChatRex-7B --upn upn_large.pth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--region", type=parse_box, nargs="+", metavar="X1,Y1,X2,Y2", help="regions to caption (pixels)")
    mode.add_argument("--image", action="store_true", help="grounded caption of the whole image")
    p.add_argument("--style", default="category", choices=["category", "short", "brief", "sentence"],
                   help="region caption style (default category)")
    p.add_argument("--detailed", action="store_true", help="with --image: detailed instead of one sentence")
    _add_common(p)
    p.set_defaults(func=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    from chatrex.viz import draw_answer, draw_groups

    if args.detailed and not args.image:
        raise ValueError("--detailed goes with --image (region captions use --style)")
    rex = _load_pipeline(args, needs_upn=bool(args.image) and not args.boxes)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, "fine_grained_prompt")

    def handle(path: Path, stem: str, image, image_id: int) -> None:
        if args.image:
            result = rex.caption_image(image, args.detailed, args.boxes, proposals=settings)
            overlay = draw_answer(image, result.boxes.boxes, result.answer)
            summary = result.text
        else:
            result = rex.caption_region(image, args.region, args.style)
            groups = [(f"{r.index}: {r.caption}", [r.index]) for r in result.regions]
            overlay, _ = draw_groups(image, result.boxes.boxes, groups)
            summary = " | ".join(result.captions)
        json_path = _write(out_dir, stem, path, result, overlay)
        print(f"{path}: {summary[:120]} -> {json_path}")

    return 1 if _for_each_image("caption", args, handle) else 0


# ----------------------------------------------------------------------------- chat
def add_chat(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="grounded conversation about one image (interactive)",
        description="Chat about one image. Reads questions from stdin (or -q, repeatable); history is kept. "
                    "Commands: ':boxes' lists the boxes, ':reset' clears the history, ':quit' ends. Each answer "
                    "is drawn to <stem>_turn<k>.png; the transcript is written to <stem>_chat.json.",
        epilog="example: chatrex chat room.jpg --mllm ChatRex-7B --upn upn_large.pth",
    )
    p.add_argument("image", metavar="IMAGE", help="the image to talk about")
    p.add_argument("-q", "--question", action="append", help="ask this instead of reading stdin (repeatable)")
    p.add_argument("--fine", action="store_true", help="fine-grained proposals (default: coarse, as the seed)")
    _add_common(p, many_images=False)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from chatrex.images import load_image

    image = load_image(args.image)  # fail fast, before loading models
    rex = _load_pipeline(args, needs_upn=not args.boxes)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    session = ChatSession(rex, image, Path(args.image), out_dir, args)
    lines = args.question if args.question else _stdin_lines()
    for line in lines:
        if not session.handle(line.strip()):
            break
    session.save()
    return 0


def _stdin_lines():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


class ChatSession:
    """The REPL state: history, turns written so far, and the `:` commands."""

    def __init__(self, rex, image, path: Path, out_dir: Path, args: argparse.Namespace) -> None:
        self.rex, self.image, self.path, self.out_dir = rex, image, path, out_dir
        self.boxes = args.boxes
        self.settings = _settings(args, "fine_grained_prompt" if args.fine else "coarse_grained_prompt")
        self.history: list[tuple[str, str]] = []
        self.turns: list[dict] = []
        self.last = None

    def handle(self, line: str) -> bool:
        """Process one input line; False ends the session."""
        if not line:
            return True
        if line in (":quit", ":q", ":exit"):
            return False
        if line == ":reset":
            self.history = []
            print("(history cleared)")
            return True
        if line == ":boxes":
            self._print_boxes()
            return True
        self._ask(line)
        return True

    def _print_boxes(self) -> None:
        if self.last is not None:
            boxes, scores = self.last.boxes.boxes, self.last.boxes.scores
        elif self.boxes:
            boxes, scores = self.boxes, [1.0] * len(self.boxes)
        else:
            print("(no boxes yet: UPN proposes them at the first question)")
            return
        for k, (box, score) in enumerate(zip(boxes, scores)):
            print(f"<obj{k}> [{', '.join(f'{v:.1f}' for v in box)}] score {score:.2f}")

    def _ask(self, question: str) -> None:
        from chatrex.viz import draw_answer

        result = self.rex.chat(self.image, question, history=self.history, boxes=self.boxes, proposals=self.settings)
        self.history, self.last = result.history, result
        k = len(self.turns)
        png = self.out_dir / f"{self.path.stem}_turn{k}.png"
        draw_answer(self.image, result.boxes.boxes, result.answer).save(png)
        self.turns.append({**result.to_dict(), "warnings": list(result.problems), "overlay": str(png)})
        print(result.raw)
        for warning in result.problems:
            print(f"(warning: {warning})", file=sys.stderr)

    def save(self) -> Path:
        path = self.out_dir / f"{self.path.stem}_chat.json"
        path.write_text(json.dumps({"image": str(self.path), "turns": self.turns}, indent=1, ensure_ascii=False))
        return path


TASK_COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (add_detect, add_refer, add_caption, add_chat)
