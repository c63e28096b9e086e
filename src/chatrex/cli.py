"""The ``chatrex`` command line. One ``add_<command>`` + one ``run_<command>`` function per subcommand.

``main(argv=None) -> int`` never prints a traceback for expected errors: it prints one line
``chatrex <command>: error: ...`` and returns a non-zero exit code (set ``CHATREX_TRACEBACK=1`` to
see the traceback). Heavy imports (torch, models) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from chatrex.errors import ChatRexError, InvalidImageError, MissingWeightsError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
UPN_DOWNLOAD_HINT = (
    "download upn_large.pth from the ChatRex release (IDEA-Research/ChatRex, saved by its instructions as "
    "checkpoints/upn_checkpoints/upn_large.pth) and pass it with --checkpoint PATH"
)


# ----------------------------------------------------------------------------- shared helpers
def expand_images(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (their images, sorted, not recursive) and glob patterns → image paths.

    Plain file paths are kept even if missing (the loader reports them); a folder without images or
    a pattern matching nothing is an error.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InvalidImageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            paths.extend(found)
        elif not path.exists() and glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                raise InvalidImageError(f"no files match {item!r}")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output file stems, made unique (``a``, ``a_2``, ...) when two inputs share a name."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return stems


def _error(command: str, message: str) -> None:
    print(f"chatrex {command}: error: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- propose
def add_propose(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "propose", help="UPN object proposals for images (JSON + overlay PNG per image)",
        description="Run UPN on images; write <stem>.json (boxes xyxy px, scores) and <stem>_proposals.png.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", help="UPN weights (.pth with {'model': state_dict}, state dict, .safetensors)")
    p.add_argument("--config", default="large", choices=["large", "small", "tiny"], help="model size preset")
    p.add_argument("--prompt", default="fine", choices=["fine", "coarse"],
                   help="fine: parts and objects; coarse: whole instances")
    p.add_argument("--min-score", type=float, default=0.3, help="keep boxes with score >= this (default 0.3)")
    p.add_argument("--nms", type=float, default=0.8, help="NMS IoU threshold, 0 disables (default 0.8)")
    p.add_argument("--out", default="proposals", help="output folder (created; default ./proposals)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu (default: accelerator if any, else cpu)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass; >1 batches equal-size images only (default 1)")
    p.add_argument("--short", type=int, default=None,
                   help="resize short side (default: the model's own rule, 800 for upn_large)")
    p.add_argument("--max-size", type=int, default=None,
                   help="resize long-side cap (default: the model's own rule, 1333 for upn_large)")
    p.set_defaults(func=run_propose)


def run_propose(args: argparse.Namespace) -> int:
    checkpoint, config, short, max_size = args.checkpoint, args.config, args.short or 800, args.max_size or 1333
    if not checkpoint:
        from chatrex import embedded

        found = embedded.upn()
        if found is None:
            raise MissingWeightsError(f"no UPN weights were given; {UPN_DOWNLOAD_HINT}")
        embedded.announce()
        checkpoint, config = found.weights, found.config
        short, max_size = args.short or found.short, args.max_size or found.max_size
    elif not Path(checkpoint).is_file():
        raise MissingWeightsError(f"checkpoint not found: {checkpoint}; {UPN_DOWNLOAD_HINT}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    paths = expand_images(args.images)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from chatrex.upn.predictor import UPNPredictor  # heavy: torch + model

    predictor = UPNPredictor.from_checkpoint(checkpoint, config=config, device=args.device,
                                             short=short, max_size=max_size, batch_size=args.batch_size)
    failures = 0
    stems = unique_stems(paths)
    for start in range(0, len(paths), args.batch_size):
        failures += _propose_chunk(predictor, args, paths[start:start + args.batch_size],
                                   stems[start:start + args.batch_size], out_dir)
    if failures:
        _error("propose", f"{failures} of {len(paths)} images failed (see above)")
        return 1
    return 0


def _propose_chunk(predictor, args: argparse.Namespace, paths: Sequence[Path], stems: Sequence[str],
                   out_dir: Path) -> int:
    """Load, predict and write one chunk; unreadable images are reported and skipped. Returns #failures."""
    from chatrex.images import load_image
    from chatrex.tools.visualize import plot_boxes_to_image

    loaded, failures = [], 0
    for path, stem in zip(paths, stems):
        try:
            loaded.append((path, stem, load_image(path)))
        except InvalidImageError as exc:
            _error("propose", str(exc))
            failures += 1
    if not loaded:
        return failures
    results = predictor.predict([img for _, _, img in loaded], prompt_type=args.prompt,
                                min_score=args.min_score, nms_iou=args.nms)
    for (path, stem, image), proposals in zip(loaded, results):
        record = {"source": str(path), **proposals.to_dict()}
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
        overlay, _ = plot_boxes_to_image(image.copy(), proposals.boxes, proposals.scores)
        overlay.save(out_dir / f"{stem}_proposals.png")
        print(f"{path}: {len(proposals)} proposals -> {out_dir / (stem + '.json')}")
    return failures


# ----------------------------------------------------------------------------- ui
def add_ui(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ui", help="web demo in the browser: UPN proposals and grounded chat (Gradio, localhost)",
        description="Serve the Gradio demo. Without --mllm it uses the embedded tiny model (and its UPN).",
    )
    p.add_argument("--mllm", help="ChatRex model folder (default: the embedded tiny model)")
    p.add_argument("--upn", help="UPN checkpoint for proposals (default: the embedded tiny UPN, if no --mllm)")
    p.add_argument("--upn-config", default="large", choices=["large", "small", "tiny"], help="UPN size preset")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default=None, help="torch device (default: accelerator if any, else cpu)")
    p.add_argument("--dtype", default=None, help="LLM dtype: bf16 (default) or fp32")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MB (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default 512)")
    p.set_defaults(func=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    from chatrex.ui.app import run  # heavy: gradio, torch, models

    run(args.mllm, args.upn, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        upn_config=args.upn_config, max_upload_mb=args.max_upload_mb, max_new_tokens=args.max_new_tokens)
    return 0


# ----------------------------------------------------------------------------- entry point
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_propose, add_ui]


# Commands whose module has its own ``main(argv) -> int`` (own parser, own --help). Listed in
# ``chatrex --help``; ``chatrex NAME [SUB] ARGS…`` hands ARGS to that ``main``. A tuple maps the first
# argument (e.g. ``chatrex train upn``) to a module; a string is the module for every call.
DELEGATED: dict[str, tuple[str, str | dict[str, str]]] = {
    "convert": ("convert an official ChatRex-7B folder to our format (loads without remote code)",
                "chatrex.model.convert"),
    "train": ("train a model: `chatrex train upn|chatrex --config FILE --out DIR`",
              {"upn": "chatrex.train.upn_trainer", "chatrex": "chatrex.train.chatrex_trainer"}),
    "eval": ("evaluate a model on a COCO-format set: `chatrex eval upn|chatrex …`",
             {"upn": "chatrex.eval.upn_eval", "chatrex": "chatrex.eval.chatrex_eval"}),
    "data": ("write a held-out synthetic shapes set in COCO format for `chatrex eval`", "chatrex.data.coco"),
    "demo": ("every task on bundled example scenes with the embedded model; prints answers, writes overlays",
             "chatrex.demo"),
}


def run_delegated(name: str, argv: Sequence[str]) -> int:
    """Import the module behind ``chatrex NAME`` lazily and run its ``main(argv)``."""
    import importlib

    target = DELEGATED[name][1]
    if isinstance(target, dict):
        if not argv or argv[0] not in target:
            choices = "|".join(target)
            print(f"usage: chatrex {name} {{{choices}}} [options]  (add --help after the choice)", file=sys.stderr)
            return 0 if argv and argv[0] in ("-h", "--help") else 2
        target, argv = target[argv[0]], argv[1:]
    return int(importlib.import_module(target).main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each entry of ``COMMANDS`` adds one subcommand."""
    from chatrex import __version__

    parser = argparse.ArgumentParser(prog="chatrex", description="ChatRex: UPN proposals + grounded multimodal LLM")
    parser.add_argument("--version", action="version", version=f"chatrex {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from chatrex.cli_tasks import TASK_COMMANDS  # detect / refer / caption / chat (imports this module)

    for add in [*COMMANDS, *TASK_COMMANDS]:
        add(subparsers)
    for name, (help_text, _) in DELEGATED.items():  # listed for --help; main() routes them
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = bool(argv) and argv[0] in DELEGATED
    parser = build_parser()
    try:
        args = argparse.Namespace(command=argv[0]) if delegated else parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not delegated and not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if delegated:
            return run_delegated(argv[0], argv[1:])
        return int(args.func(args) or 0)
    except SystemExit as exc:  # a delegated parser's --help / usage error
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return 130
    except (ChatRexError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("CHATREX_TRACEBACK"):
            traceback.print_exc()
        _error(args.command, f"{exc}" if isinstance(exc, ChatRexError) else f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
