"""Install trained tiny models as the package's embedded defaults (`chatrex/assets/`), with their metadata.

`python -m chatrex.train.ship --chatrex OUT_DIR [--upn OUT_DIR] [--to ASSETS] [--eval-scenes N]`

- ChatRex: OUT_DIR is a `chatrex train chatrex` output folder (model/ + checkpoint.pt + train_config.json).
  The model is saved in bfloat16 (half the bytes; the CPU runs bf16 natively) to ASSETS/tiny_chatrex/ with
  the tokenizer and processor config, plus `training.json`: steps, seconds, the train config and, unless
  --eval-scenes 0, held-out scores (`chatrex.eval.chatrex_eval`) on both renderers computed on the saved
  bf16 weights, i.e. on exactly what ships.
- UPN: OUT_DIR is a `chatrex train upn` output folder (upn.safetensors + upn.json); weights are cast to
  bfloat16 and written as ASSETS/tiny_upn.safetensors + tiny_upn.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from chatrex.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def ship_chatrex(out_dir: str | Path, assets: str | Path = ASSETS, eval_scenes: int = 100) -> dict[str, Any]:
    """Write ASSETS/tiny_chatrex from a trainer output folder; returns the metadata written."""
    from chatrex.model.loading import load_chatrex
    from chatrex.train.chatrex_trainer import export_model

    out_dir = Path(out_dir)
    model_dir, ckpt = out_dir / "model", out_dir / "checkpoint.pt"
    if not (model_dir / "config.json").is_file() or not ckpt.is_file():
        raise ConfigError(f"{out_dir} is not a finished `chatrex train chatrex` folder (needs model/ and checkpoint.pt)")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    extra = state.get("extra", {}) or {}
    model, processor = load_chatrex(model_dir, dtype=torch.float32, device="cpu")
    target = Path(assets) / "tiny_chatrex"
    if target.exists():
        shutil.rmtree(target)
    export_model(model, processor, target, dtype=torch.bfloat16)
    meta: dict[str, Any] = {
        "trained_steps": int(state.get("step", 0)),
        "train_seconds": float(extra.get("seconds", float("nan"))),
        "train_config": json.loads(extra["config"]) if "config" in extra else None,
        "weights_dtype": "bfloat16",
    }
    if eval_scenes > 0:
        meta["eval"] = evaluate_shipped(target, eval_scenes)
    (target / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def evaluate_shipped(folder: str | Path, scenes: int, seed: int = 7) -> dict[str, Any]:
    """Held-out scores of the model in `folder` (loaded as shipped, run in float32) on both renderers."""
    from chatrex.eval.chatrex_eval import evaluate_chatrex, heldout_scenes
    from chatrex.model.loading import load_chatrex

    model, processor = load_chatrex(folder, dtype=torch.float32, device="cpu")
    scores: dict[str, Any] = {"scenes": scenes, "seed": seed}
    for renderer in ("default", "alt"):
        result = evaluate_chatrex(model, processor, heldout_scenes(scenes, seed=seed, renderer=renderer))
        scores[renderer] = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    return scores


UPN_BARS = {"fine_recall": 0.95, "fine_precision": 0.8, "coarse_recall": 0.95}


def evaluate_upn_weights(weights: str | Path, meta_json: str | Path, scenes: int, seed: int = 7) -> dict[str, Any]:
    """Held-out UPN scores of `weights` run as `meta_json` says (score >= 0.3, NMS 0.8; coarse recall over
    objects >= 24 px), per renderer and prompt: {"default_fine": {...}, ..., "heldout": description}."""
    from chatrex.data.synthetic import scene_stream
    from chatrex.eval.upn_eval import evaluate_items, load_predictor

    predictor = load_predictor(weights, meta_json, device="cpu")
    scores: dict[str, Any] = {}
    for renderer in ("default", "alt"):
        items = [(s.image, torch.as_tensor(s.boxes)) for s in scene_stream(seed, scenes, split="test", renderer=renderer)]
        for prompt, min_size in (("fine", None), ("coarse", 24)):
            scores[f"{renderer}_{prompt}"] = evaluate_items(predictor, items, prompt, 0.3, 0.8, min_size)
    scores["heldout"] = (f"{scenes} scenes each, chatrex.data.synthetic.scene_stream(seed={seed}, split='test'), "
                         "renderers default and alt; score>=0.3, NMS 0.8; coarse recall over objects >= 24 px")
    return scores


def _upn_note(scores: dict[str, Any]) -> str:
    misses = [f"{key} recall {scores[key]['recall']:.3f}" for key in ("default_fine", "alt_fine", "default_coarse", "alt_coarse")
              if scores[key]["recall"] < UPN_BARS[key.split("_")[1] + "_recall"]]
    misses += [f"{key} precision {scores[key]['precision']:.3f}" for key in ("default_fine", "alt_fine")
               if scores[key]["precision"] < UPN_BARS["fine_precision"]]
    return "" if not misses else "preliminary: below the bars (" + ", ".join(misses) + ")"


def ship_upn(out_dir: str | Path, assets: str | Path = ASSETS, eval_scenes: int = 300) -> dict[str, Any]:
    """Write ASSETS/tiny_upn.safetensors + tiny_upn.json from a `chatrex train upn` folder, with held-out
    scores of the shipped (bf16) weights and a note naming any missed bar (unless eval_scenes is 0)."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    weights, meta_path = out_dir / "upn.safetensors", out_dir / "upn.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ConfigError(f"{out_dir} is not a finished `chatrex train upn` folder (needs upn.safetensors, upn.json)")
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    shipped = Path(assets) / "tiny_upn.safetensors"
    save_file(tensors, str(shipped))
    meta = json.loads(meta_path.read_text())
    meta["weights_dtype"] = "bfloat16"
    if eval_scenes > 0:  # the shipped bf16 weights, run with the trained model's config and sizes
        meta["eval"] = evaluate_upn_weights(shipped, meta_path, eval_scenes)
        meta["note"] = _upn_note(meta["eval"])
    (Path(assets) / "tiny_upn.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatrex.train.ship", description=__doc__.splitlines()[0])
    parser.add_argument("--chatrex", help="`chatrex train chatrex` output folder")
    parser.add_argument("--upn", help="`chatrex train upn` output folder")
    parser.add_argument("--to", default=str(ASSETS), help="assets folder (default: the package's)")
    parser.add_argument("--eval-scenes", type=int, default=100,
                        help="held-out scenes per renderer for both models' scores (0 = skip)")
    args = parser.parse_args(argv)
    if not args.chatrex and not args.upn:
        parser.error("give --chatrex and/or --upn")
    try:
        if args.upn:
            ship_upn(args.upn, args.to, args.eval_scenes)
            print(f"shipped the UPN from {args.upn} to {args.to}")
        if args.chatrex:
            meta = ship_chatrex(args.chatrex, args.to, args.eval_scenes)
            print(f"shipped ChatRex from {args.chatrex} to {args.to}: {json.dumps(meta.get('eval', {}))}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
