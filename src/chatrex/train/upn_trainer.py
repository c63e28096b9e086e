"""UPN trainer on the synthetic "shapes" world: `chatrex train upn --config FILE --out DIR`.

Every step draws ``batch_size`` fresh scenes (scene seeds and augmentation depend only on
``data_seed`` and the step index, so a resumed run sees exactly the data a straight run would), runs
the prompt-independent encoder once per image and the decoder once per prompt (fine → objects
>= 12 px, coarse → objects >= 24 px), and sums focal + L1 + GIoU over every decoder layer and the
two-stage encoder proposals (``chatrex.train.losses``). Images are forwarded one at a time and their
gradients accumulated: UPN's Swin ignores the padding mask, so padded batches would train on inputs
the predictor never shows it.

Writes to OUT: ``checkpoint.pt`` (resumable, every ``ckpt_every`` steps / ``ckpt_minutes``),
``losses.jsonl`` and at the end ``upn.safetensors`` + ``upn.json`` (UPN config, preprocessing sizes,
steps, seconds, training config) — the files the predictor and pipeline load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from torch import nn

from chatrex.errors import ConfigError
from chatrex.ops.boxes import box_xyxy_to_cxcywh, normalize_boxes
from chatrex.train.common import (ProgressBar, TrainConfigBase, autocast_context, build_scheduler,
                                  load_checkpoint, save_checkpoint, seed_everything)
from chatrex.train.losses import LossWeights, upn_loss
from chatrex.train.matcher import HungarianMatcher
from chatrex.upn.config import UPNConfig
from chatrex.upn.model import UPN
from chatrex.upn.preprocess import preprocess_image

__all__ = ["UPNTrainConfig", "train_upn", "build_model", "init_for_training", "make_example", "calibrate_prompts",
           "main"]

PROMPTS = {"fine": "fine_grained_prompt", "coarse": "coarse_grained_prompt"}


@dataclasses.dataclass(frozen=True)
class UPNTrainConfig(TrainConfigBase):
    """Everything a UPN training run depends on (JSON keys = field names).

    model: preset name or a dict of UPNConfig fields; model_overrides: fields replaced on top.
    short / max_size: the resize rule at inference (recorded in upn.json); train_shorts: short sides
    drawn per training image (multi-scale; default ``(short,)``). min_size: per-prompt minimum object
    size in px (max box side, original image). lr_backbone_scale multiplies lr for the Swin.
    enc_dense_k > 0 replaces the top-K Hungarian loss on the encoder proposals by a dense one-to-many
    loss on every token (each target takes its k cheapest tokens): much faster convergence.
    dec_match_k > 1 matches every target to k decoder queries (one-to-many; duplicates are left to
    the predictor's NMS): confident scores early instead of scores split between near-identical queries.
    nms_ignore > 0 leaves near-copies (box IoU > nms_ignore) of matched queries out of the focal loss:
    the predictor's NMS (0.8) removes them, so scores need not be split between them.
    iou_score_target: a matched query's focal target is its box's IoU with the target instead of 1
    (quality focal loss): scores then rank boxes by how well they fit, so duplicates and loose boxes
    fall under the threshold (the encoder's dense loss keeps 0/1 targets).
    init_from: UPN weights to start from (fine-tuning); when this config has fewer queries, the first
    ``num_queries`` content embeddings are kept (slot i is the i-th best encoder token either way).
    data_repeat > 0 cycles the data of the first ``data_repeat`` steps (overfitting checks).
    renderer: "default", "alt" or "randomized" (domain randomization, ``chatrex.train.upn_augment``).
    calibrate_scenes > 0: after the last step, each prompt's logits are rescaled (temperature) so the
    predictor's default threshold 0.3 sits at the highest-recall operating point whose precision is
    >= calibrate_precision (a float, or {"fine": p, "coarse": p}) on that many fresh "val"-split scenes
    (:func:`calibrate_prompts`).
    """

    model: Any = "tiny"
    model_overrides: Any = None
    short: int = 256
    max_size: int = 512
    train_shorts: tuple[int, ...] = ()
    hflip: bool = True
    steps: int = 2000
    batch_size: int = 4
    lr: float = 2e-4
    lr_backbone_scale: float = 1.0
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    warmup: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    prior_prob: float = 0.01
    enc_weight: float = 1.0
    enc_dense_k: int = 0
    dec_match_k: int = 1
    nms_ignore: float = 0.0
    iou_score_target: bool = False
    init_from: Any = None
    prompts: tuple[str, ...] = ("fine", "coarse")
    min_size: Any = None
    renderer: str = "default"
    min_objects: int = 1
    max_objects: int = 8
    data_repeat: int = 0
    ckpt_every: int = 200
    ckpt_minutes: float = 5.0
    log_every: int = 10
    seed: int = 0
    data_seed: int = 0
    threads: int = 0
    bf16: bool = False
    calibrate_scenes: int = 0
    calibrate_precision: Any = 0.85

    def validate(self) -> None:
        for name in ("short", "max_size", "steps", "batch_size", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"UPNTrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"UPNTrainConfig.lr must be > 0, got {self.lr!r}")
        if not self.prompts or any(p not in PROMPTS for p in self.prompts):
            raise ConfigError(f"UPNTrainConfig.prompts must be a non-empty subset of {sorted(PROMPTS)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError("UPNTrainConfig.schedule must be cosine, linear or constant")
        if self.renderer not in ("default", "alt", "randomized"):
            raise ConfigError("UPNTrainConfig.renderer must be default, alt or randomized")
        if not 0 < self.prior_prob < 1:
            raise ConfigError("UPNTrainConfig.prior_prob must be in (0, 1)")
        for prompt in PROMPTS.values():
            if not 0 <= self.min_precision(prompt) <= 1:
                raise ConfigError("UPNTrainConfig.calibrate_precision must be in [0, 1] (or a dict of such per prompt)")
        self.upn_config()  # validates the model part

    def upn_config(self) -> UPNConfig:
        """The UPNConfig this run trains."""
        if isinstance(self.model, str):
            cfg = UPNConfig.from_name(self.model)
        elif isinstance(self.model, Mapping):
            cfg = UPNConfig.from_dict(self.model)
        else:
            raise ConfigError(f"UPNTrainConfig.model must be a preset name or a dict, got {self.model!r}")
        if self.model_overrides:
            cfg = UPNConfig.from_dict({**cfg.to_dict(), **dict(self.model_overrides)})
        return cfg

    def min_precision(self, prompt_type: str) -> float:
        """The calibration precision floor of ``prompt_type`` (fine_grained_prompt / coarse_grained_prompt)."""
        value = self.calibrate_precision
        if isinstance(value, Mapping):
            short = {v: k for k, v in PROMPTS.items()}[prompt_type]
            value = value.get(short, value.get(prompt_type, 0.85))
        return float(value)

    def min_sizes(self) -> dict[str, float]:
        """prompt_type -> minimum object size (px) it must propose."""
        sizes = {"fine_grained_prompt": 12.0, "coarse_grained_prompt": 24.0}
        for key, value in dict(self.min_size or {}).items():
            sizes[PROMPTS.get(key, key)] = float(value)
        return sizes


# ---------------------------------------------------------------------------------------- model
def build_model(config: UPNTrainConfig) -> UPN:
    """A freshly initialized UPN for training (seeded by ``config.seed``)."""
    seed_everything(config.seed)
    model = UPN(config.upn_config())
    init_for_training(model, config.prior_prob)
    if config.init_from:
        _warm_start(model, config.init_from)
    return model


def _warm_start(model: UPN, path: str | Path) -> None:
    """Load ``path`` strictly into ``model``, truncating ``transformer.tgt_embed`` to its query count."""
    from chatrex.upn.checkpoint import read_state_dict

    state = read_state_dict(path)
    key = "transformer.tgt_embed.weight"
    if key in state:
        state[key] = state[key][: model.config.num_queries]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"init_from {path} does not fit this UPN config: missing {result.missing_keys[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")


@torch.no_grad()
def init_for_training(model: UPN, prior_prob: float = 0.01) -> None:
    """Start both prompts' logits near ``logit(prior_prob)`` (focal-loss prior, as DETR's class bias).

    UPN's logit is ``feature · prompt`` with no bias, so: prompts ~ N(0, 1/C) (logit std ~1 instead of
    ~sqrt(C)), and the LayerNorm biases feeding the logits (decoder ``norm``, ``enc_output_norm``) get a
    component in span{p_fine, p_coarse} whose dot product with either prompt is ``logit(prior_prob)``.
    """
    tr = model.transformer
    d = tr.fine_grained_prompt.weight.shape[1]
    for emb in (tr.fine_grained_prompt, tr.coarse_grained_prompt):
        nn.init.normal_(emb.weight, std=d**-0.5)
    prompts = torch.cat([tr.fine_grained_prompt.weight, tr.coarse_grained_prompt.weight])  # (2, C)
    bias = math.log(prior_prob / (1 - prior_prob))
    gram = prompts @ prompts.T  # (2, 2); solve P (P^T a) = bias·1
    coef = torch.linalg.solve(gram.double(), torch.full((2,), bias, dtype=torch.float64)).to(prompts)
    shift = coef @ prompts  # (C,)
    for norm in (tr.decoder.norm, tr.enc_output_norm):
        norm.bias.zero_()
        norm.bias.add_(shift)


def param_groups(model: UPN, config: UPNTrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay only on Linear/Conv weights; the Swin at ``lr · lr_backbone_scale``."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    backbone_ids = {id(p) for p in model.swin.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():  # shared box head appears once (parameters() de-duplicates)
        if id(p) in seen:
            continue
        seen.add(id(p))
        groups.setdefault((id(p) in decay_ids, id(p) in backbone_ids), []).append(p)
    return [{"params": ps, "weight_decay": config.weight_decay if decay else 0.0,
             "lr": config.lr * (config.lr_backbone_scale if backbone else 1.0)}
            for (decay, backbone), ps in sorted(groups.items())]


# ---------------------------------------------------------------------------------------- data
def make_example(config: UPNTrainConfig, step: int, item: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training example ``item`` of ``step``: (pixels (3, h, w) normalized, prompt_type -> (T, 4)
    cxcywh targets normalized to the image). Deterministic in (data_seed, step, item)."""
    from chatrex.data.synthetic import sample_scene, split_seed

    if config.data_repeat > 0:
        step = step % config.data_repeat
    index = step * config.batch_size + item
    renderer: Any = config.renderer
    if renderer == "randomized":
        from chatrex.train.upn_augment import RANDOMIZED_STYLE as renderer
    scene = sample_scene(split_seed(config.data_seed, index, "train"), renderer=renderer,
                         min_objects=config.min_objects, max_objects=config.max_objects)
    rng = np.random.default_rng([config.data_seed, step, item, 7])
    shorts = config.train_shorts or (config.short,)
    short = int(shorts[int(rng.integers(len(shorts)))])
    image, boxes = scene.image, torch.as_tensor(scene.boxes, dtype=torch.float32)  # (N, 4) xyxy px
    sizes = torch.as_tensor([o.size_px for o in scene.objects], dtype=torch.float32)
    if config.hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        boxes = torch.stack([scene.width - boxes[:, 2], boxes[:, 1], scene.width - boxes[:, 0], boxes[:, 3]], 1)
    pixels, _ = preprocess_image(image, short, config.max_size)
    norm = box_xyxy_to_cxcywh(normalize_boxes(boxes, (scene.height, scene.width)))
    targets = {prompt: norm[sizes >= min_px] for prompt, min_px in config.min_sizes().items()}
    return pixels, targets


# ---------------------------------------------------------------------------------------- training
def train_step(model: UPN, examples: list, prompts: list[str], matcher: HungarianMatcher,
               weights: LossWeights, bf16: bool) -> tuple[float, dict[str, float]]:
    """Forward + backward of one batch (gradients accumulated per image, mean over images)."""
    total, logs = 0.0, {}
    for pixels, targets in examples:
        mask = torch.zeros(1, *pixels.shape[1:], dtype=torch.bool)
        with autocast_context("cpu", torch.bfloat16 if bf16 else None):
            enc = model.encode(pixels[None], mask)
            loss = 0.0
            for prompt in prompts:
                out = model.decode(enc, prompt, return_intermediates=True)
                part, part_logs = upn_loss(out, [targets[prompt]], matcher, weights)
                loss = loss + part
                for k, v in part_logs.items():
                    logs[f"{prompt[:4]}_{k}"] = logs.get(f"{prompt[:4]}_{k}", 0.0) + v / len(examples)
        (loss / len(examples)).backward()
        total += float(loss.detach()) / len(examples)
    return total, logs


def train_upn(config: UPNTrainConfig, out_dir: str | Path, resume: str | Path | None = None,
              stream: Any = None, stop_at: int | None = None) -> dict[str, Any]:
    """Train a UPN per ``config``; returns ``{"losses": [...], "step": int, "model": UPN, "train_seconds"}``.

    ``resume`` is a checkpoint written by a previous run (model, optimizer, scheduler, step, RNG):
    training continues exactly where it stopped. ``config.steps`` is the total, not the remainder.
    ``stop_at`` ends the run early at that step (checkpoint written; the LR schedule still spans
    ``config.steps``), as an interrupted run would.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    model = build_model(config).train()
    opt = torch.optim.AdamW(param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    sched = build_scheduler(opt, config.steps, config.warmup, config.schedule, config.min_lr_ratio)
    step, losses, seconds = 0, [], 0.0
    if resume is not None:
        state = load_checkpoint(resume, model, opt, sched)
        step, losses = state["step"], list(state["extra"].get("losses", []))
        seconds = float(state["extra"].get("train_seconds", 0.0))
    prompts = [PROMPTS[p] for p in config.prompts]
    matcher = HungarianMatcher()
    weights = LossWeights(encoder=config.enc_weight, dense_k=config.enc_dense_k, dec_k=config.dec_match_k,
                          nms_ignore=config.nms_ignore, iou_target=config.iou_score_target)
    bar = ProgressBar(config.steps, desc="upn", stream=stream, every=config.log_every)
    t_start, t_ckpt = time.perf_counter(), time.perf_counter()
    with (out / "losses.jsonl").open("a") as log:
        end = config.steps if stop_at is None else min(stop_at, config.steps)
        while step < end:
            examples = [make_example(config, step, i) for i in range(config.batch_size)]
            opt.zero_grad(set_to_none=True)
            loss, logs = train_step(model, examples, prompts, matcher, weights, config.bf16)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss)
            bar.update(step, loss, samples=config.batch_size, lr=sched.get_last_lr()[0])
            log.write(json.dumps({"step": step, "loss": loss, **logs}) + "\n")
            now = time.perf_counter()
            if step % config.ckpt_every == 0 or now - t_ckpt > 60 * config.ckpt_minutes or step == end:
                log.flush()
                _save(out, model, opt, sched, step, losses, seconds + now - t_start, config)
                t_ckpt = now
    bar.close()
    calibration = None
    if config.calibrate_scenes > 0 and step == config.steps:  # checkpoint.pt stays uncalibrated
        calibration = calibrate_prompts(model, config)
    seconds += time.perf_counter() - t_start
    _export(out, model, config, step, seconds, calibration)
    return {"losses": losses, "step": step, "model": model.eval(), "train_seconds": seconds}


CALIBRATION_THRESHOLDS = tuple(round(0.02 + 0.01 * i, 2) for i in range(59))  # 0.02 … 0.60


@torch.no_grad()
def calibrate_prompts(model: UPN, config: UPNTrainConfig, target: float = 0.3) -> dict[str, Any]:
    """Temperature calibration, folded into the prompt vectors (in place); returns what was chosen.

    UPN's logit is ``hs · prompt`` with no bias, so scaling a prompt vector by ``s > 0`` scales that
    prompt's logits by ``s``: the ranking and the two-stage selection are unchanged, only where the
    predictor's default threshold ``target`` falls moves. Focal-loss training leaves good boxes with
    low scores; per prompt, the chosen threshold is the highest-recall one whose precision (NMS 0.8,
    as evaluated) is >= ``config.calibrate_precision`` on ``config.calibrate_scenes`` fresh scenes of
    the "val" split (never the held-out "test" scenes) drawn by the training renderer.
    """
    from chatrex.data.synthetic import sample_scene, split_seed
    from chatrex.eval.upn_eval import choose_threshold, operating_points
    from chatrex.upn.predictor import UPNPredictor

    renderer: Any = config.renderer
    if renderer == "randomized":
        from chatrex.train.upn_augment import RANDOMIZED_STYLE as renderer
    was_training = model.training
    predictor = UPNPredictor(model, short=config.short, max_size=config.max_size)
    scenes = [sample_scene(split_seed(config.data_seed, i, "val"), renderer=renderer)
              for i in range(config.calibrate_scenes)]
    items = [(s.image, torch.as_tensor(s.boxes, dtype=torch.float32)) for s in scenes]
    result: dict[str, Any] = {"scenes": len(items), "split": "val"}
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    for prompt_type, min_size in config.min_sizes().items():
        points = operating_points(predictor, items, prompt_type, min_size, CALIBRATION_THRESHOLDS)
        best = choose_threshold(points, config.min_precision(prompt_type))
        scale = logit(target) / logit(best["threshold"]) if best["threshold"] < 0.5 else 1.0
        getattr(model.transformer, prompt_type).weight.mul_(scale)
        result[prompt_type] = {**{k: round(v, 4) for k, v in best.items()}, "scale": round(scale, 4),
                               "min_precision": config.min_precision(prompt_type)}
    model.train(was_training)
    return result


def _save(out: Path, model, opt, sched, step, losses, seconds, config) -> None:  # noqa: ANN001
    extra = {"losses": [float(v) for v in losses], "train_seconds": float(seconds),
             "config": json.dumps(config.to_dict())}
    save_checkpoint(out / "checkpoint.pt", model, opt, sched, step, extra=extra)
    _export(out, model, config, step, seconds)  # a partial run is usable as-is


def _export(out: Path, model: UPN, config: UPNTrainConfig, step: int, seconds: float,
            calibration: dict[str, Any] | None = None) -> None:
    from chatrex.upn.checkpoint import save_upn

    save_upn(model, out / "upn.safetensors")
    meta = {"config": model.config.to_dict(), "short": config.short, "max_size": config.max_size,
            "trained_steps": step, "train_seconds": round(seconds, 1), "train_config": config.to_dict()}
    if calibration is not None:
        meta["calibration"] = calibration
    (out / "upn.json").write_text(json.dumps(meta, indent=1) + "\n")


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``chatrex train upn --config FILE --out DIR [--steps N] [--resume CKPT] [--threads N] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="chatrex train upn", description="Train a UPN on synthetic shapes.")
    parser.add_argument("--config", help="JSON training config (fields of UPNTrainConfig)")
    parser.add_argument("--out", required=True, help="output folder (checkpoint.pt, upn.safetensors, upn.json)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (overrides the config)")
    parser.add_argument("--resume", help="checkpoint.pt to continue from (exact resume)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (overrides the config)")
    parser.add_argument("overrides", nargs="*", help="extra config fields as key=value (JSON values)")
    args = parser.parse_args(argv)
    extra = [f"steps={args.steps}"] if args.steps is not None else []
    extra += [f"threads={args.threads}"] if args.threads is not None else []
    try:
        config = UPNTrainConfig.from_json(args.config, list(args.overrides) + extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    resume = args.resume
    if resume is None and (Path(args.out) / "checkpoint.pt").is_file():
        print(f"note: {args.out}/checkpoint.pt exists; pass --resume to continue it (starting fresh)",
              file=sys.stderr)
    result = train_upn(config, args.out, resume=resume)
    print(f"trained {result['step']} steps in {result['train_seconds']:.0f} s; final loss "
          f"{result['losses'][-1]:.4f}; weights in {args.out}/upn.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
