"""ChatRex evaluation: grounded detection / region category / referring with given boxes, and the full
UPN -> ChatRex pipeline as detection-by-retrieval COCO AP.

* `evaluate_chatrex(model, processor, items)`: every item (one image, its ground-truth boxes and
  categories, optional referring expressions) gets its boxes as input (shuffled with a fixed seed,
  optionally mixed with distractors) and three kinds of canonical-prompt questions:
  - detection of ONE category (every present category, plus `absent_per_image` absent ones): exact
    match of the answered index set with the ground-truth set (empty for an absent category);
  - region category ("What is the category name of <objK>?") for every ground-truth box: the answered
    phrase equals the category (case and a trailing period ignored);
  - referring ("Please detect <expression> ..."): correct when the chosen boxes match the target boxes
    one to one at IoU >= 0.5 (for the usual single-target expression: the chosen box has IoU >= 0.5).
  The image is encoded once per item and its questions are decoded greedily as one left-padded batch.
* `evaluate_pipeline(pipeline, coco_json, images)`: for every image and every category present in it
  (+ `absent_per_image` absent ones) `pipeline.detect(image, [category])` with UPN proposals; each selected
  box is a detection scored by its UPN score; pycocotools gives AP / AP50 over the asked categories.

`main(argv)`: `chatrex eval chatrex --mllm DIR (--ann FILE --images DIR | --synthetic N) [--upn CKPT]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from chatrex import prompts

MATCH_IOU = 0.5


@dataclass
class EvalItem:
    """One evaluation image. boxes: (N, 4) xyxy px of `image`; categories[i] names box i;
    expressions: (referring expression, indices into boxes it names); vocabulary: categories that may be
    asked as absent ones."""

    image: Any
    boxes: np.ndarray
    categories: list[str]
    expressions: list[tuple[str, list[int]]] = field(default_factory=list)
    vocabulary: Sequence[str] = ()
    image_id: Any = None


def scene_item(scene: Any) -> EvalItem:
    """A synthetic `Scene` -> EvalItem (its referring expressions included)."""
    from chatrex.data.synthetic import CATEGORIES

    return EvalItem(scene.image, scene.boxes.astype(np.float64), list(scene.categories),
                    list(scene.referring_expressions()), CATEGORIES, scene.seed)


def heldout_scenes(n: int, seed: int = 1, renderer: str = "default", split: str = "test") -> list[EvalItem]:
    """`n` held-out synthetic scenes (the "test" split never shares a scene with training) as EvalItems."""
    from chatrex.data.synthetic import sample_scene, split_seed

    return [scene_item(sample_scene(split_seed(seed, i, split), renderer=renderer)) for i in range(n)]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)[:, None]
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)[None, :]
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def normalize_phrase(text: str) -> str:
    """Lower case, stripped, trailing period and a leading article removed: 'A red circle.' -> 'red circle'."""
    text = " ".join(text.strip().lower().rstrip(".").split())
    for article in ("a ", "an ", "the "):
        if text.startswith(article):
            return text[len(article):]
    return text


def answer_phrase(text: str) -> str:
    """The region-caption phrase of an answer: its first grounded phrase, else its plain text."""
    from chatrex.grounding import parse_answer

    parsed = parse_answer(text)
    return parsed.spans[0].phrase if parsed.spans else parsed.text


def answered_indices(text: str) -> set[int]:
    """Box indices an answer grounds (its spans' indices)."""
    from chatrex.grounding import answer_indices

    return answer_indices(text)


def referring_correct(chosen: Sequence[Sequence[float]], targets: Sequence[Sequence[float]], iou: float = MATCH_IOU) -> bool:
    """One-to-one match of chosen and target boxes at IoU >= `iou` (same count, greedy by IoU)."""
    if len(chosen) != len(targets) or not len(targets):
        return False
    m = box_iou(np.asarray(chosen), np.asarray(targets))
    used: set[int] = set()
    for i in np.argsort(-m.max(axis=1)):
        j = next((j for j in np.argsort(-m[i]) if j not in used and m[i, j] >= iou), None)
        if j is None:
            return False
        used.add(int(j))
    return True


# ---------------------------------------------------------------------------------------------- questions
@dataclass
class _Query:
    kind: str  # "detect" | "absent" | "region" | "refer"
    question: str
    target: Any  # set of box indices (detect/absent), category (region), target box list (refer)


def _input_boxes(item: EvalItem, rng: np.random.Generator, distractors: int) -> tuple[np.ndarray, np.ndarray]:
    """(input boxes (K, 4), owner (K,) = gt index or -1): GT boxes + up to `distractors` random boxes that
    overlap no GT box at IoU >= 0.5, shuffled."""
    gt = np.asarray(item.boxes, np.float64).reshape(-1, 4)
    extra = []
    if distractors > 0:
        width, height = _image_size(item.image)
        for _ in range(distractors * 10):
            if len(extra) >= distractors:
                break
            w, h = rng.uniform(8, min(width, height) * 0.5, 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = np.array([x, y, x + w, y + h])
            if not len(gt) or box_iou(box, gt).max() < MATCH_IOU:
                extra.append(box)
    boxes = np.concatenate([gt, np.asarray(extra).reshape(-1, 4)])
    owner = np.concatenate([np.arange(len(gt)), -np.ones(len(extra), dtype=np.int64)])
    order = rng.permutation(len(boxes))
    return boxes[order], owner[order]


def _image_size(image: Any) -> tuple[int, int]:
    from chatrex.images import load_image

    return load_image(image).size


def build_queries(item: EvalItem, owner: np.ndarray, rng: np.random.Generator, absent_per_image: int,
                  refer_per_image: int) -> list[_Query]:
    box_of = {int(o): k for k, o in enumerate(owner) if o >= 0}
    queries = []
    present = sorted(set(item.categories))
    for cat in present:
        targets = {box_of[i] for i, c in enumerate(item.categories) if c == cat}
        queries.append(_Query("detect", prompts.detection_prompt([cat]), targets))
    pool = [c for c in item.vocabulary if c not in present]
    for i in rng.permutation(len(pool))[:absent_per_image]:
        queries.append(_Query("absent", prompts.detection_prompt([pool[int(i)]]), set()))
    for i, cat in enumerate(item.categories):
        queries.append(_Query("region", prompts.region_prompt(box_of[i], "category"), cat))
    exprs = list(item.expressions)
    for i in rng.permutation(len(exprs))[:refer_per_image]:
        expr, objs = exprs[int(i)]
        queries.append(_Query("refer", prompts.referring_prompt(expr), [list(item.boxes[o]) for o in objs]))
    return queries


# ---------------------------------------------------------------------------------------------- generation
@torch.inference_mode()
def answer_questions(model: Any, processor: Any, image: Any, boxes: np.ndarray, questions: Sequence[str],
                     max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy answers to `questions` about one image with the same input `boxes` (xyxy px of the image).

    The image and the boxes are encoded once; the questions run as left-padded batches of `batch_size`.
    """
    device = model.get_input_embeddings().weight.device
    low, aux, size = processor.preprocess_image(image)
    canvas, kept = processor.prepare_boxes(boxes, size)
    features, maps = model.encode_images(low.to(device), aux.to(device))
    objects = model.encode_objects(maps, [canvas.to(device)])[0]
    tok = processor.tokenizer
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        rows = [processor.tokenize(processor.build_prompt(q, len(kept))) for q in chunk]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), processor.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, length - len(r):] = torch.tensor(r)
            mask[b, length - len(r):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), image_features=features,
            object_features=[objects] * len(rows), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=processor.pad_token_id,
        )
        answers.extend(processor.batch_decode(out))
    return answers


# ---------------------------------------------------------------------------------------------- metrics
def evaluate_chatrex(model: Any, processor: Any, items: Iterable[Any], *, distractors: int = 0,
                     absent_per_image: int = 1, refer_per_image: int = 4, seed: int = 0,
                     max_new_tokens: int = 48, batch_size: int = 16, records: list | None = None) -> dict[str, Any]:
    """Detection exact-match, region category accuracy and referring accuracy@0.5 with ground-truth boxes.

    Args:
        items: `EvalItem`s or synthetic `Scene`s.
        distractors: random non-object boxes added to every item's input boxes (0 = GT boxes only).
        absent_per_image / refer_per_image: absent categories / referring expressions asked per image.
        records: when a list is given, one dict per question (question, answer, target, correct) is appended.
    Returns:
        {"detect_exact", "detect_present_exact", "detect_absent_exact", "region_category_acc",
         "refer_acc50"} floats (NaN when no such question) plus "n_<kind>" counts and "n_images".
    """
    rng = np.random.default_rng(seed)
    correct: dict[str, list[bool]] = {"detect": [], "absent": [], "region": [], "refer": []}
    n_images = 0
    model.eval()
    for item in items:
        item = item if isinstance(item, EvalItem) else scene_item(item)
        boxes, owner = _input_boxes(item, rng, distractors)
        queries = build_queries(item, owner, rng, absent_per_image, refer_per_image)
        answers = answer_questions(model, processor, item.image, boxes, [q.question for q in queries],
                                   max_new_tokens, batch_size)
        for q, a in zip(queries, answers):
            ok = _judge(q, a, boxes)
            correct[q.kind].append(ok)
            if records is not None:
                records.append({"image_id": item.image_id, "kind": q.kind, "question": q.question, "answer": a,
                                "target": sorted(q.target) if isinstance(q.target, set) else q.target, "correct": ok})
        n_images += 1
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {
        "detect_exact": mean(correct["detect"] + correct["absent"]),
        "detect_present_exact": mean(correct["detect"]),
        "detect_absent_exact": mean(correct["absent"]),
        "region_category_acc": mean(correct["region"]),
        "refer_acc50": mean(correct["refer"]),
        "n_detect": len(correct["detect"]) + len(correct["absent"]),
        "n_region": len(correct["region"]),
        "n_refer": len(correct["refer"]),
        "n_images": n_images,
    }


def _judge(query: _Query, answer: str, boxes: np.ndarray) -> bool:
    if query.kind in ("detect", "absent"):
        return answered_indices(answer) == set(query.target)
    if query.kind == "region":
        return normalize_phrase(answer_phrase(answer)) == normalize_phrase(query.target)
    chosen = [list(boxes[k]) for k in sorted(answered_indices(answer)) if 0 <= k < len(boxes)]
    return referring_correct(chosen, query.target)


# ---------------------------------------------------------------------------------------------- pipeline
def load_coco(ann_file: str | Path, images_dir: str | Path) -> tuple[dict[str, Any], list[EvalItem]]:
    """A COCO json + image folder -> (the json dict, one EvalItem per image; crowd boxes skipped)."""
    data = json.loads(Path(ann_file).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    items = []
    for img in data["images"]:
        anns = by_image.get(img["id"], [])
        xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        items.append(EvalItem(Path(images_dir) / img["file_name"], xyxy, [names[a["category_id"]] for a in anns],
                              [], sorted(names.values()), img["id"]))
    return data, items


def evaluate_pipeline(pipeline: Any, coco_json: str | Path | dict, images: str | Path, *, absent_per_image: int = 1,
                      seed: int = 0, limit: int | None = None) -> dict[str, float]:
    """Detection by retrieval: COCO AP / AP50 of `pipeline.detect(image, [category])` with UPN proposals.

    For every image: each category present in its annotations plus `absent_per_image` absent ones (seeded)
    is asked alone; every selected box becomes a detection scored by its UPN score. AP is computed over
    the dataset's categories, on the images (the first `limit` when given) that were asked.
    """
    if isinstance(coco_json, dict):
        data, items = coco_json, _items_from_dict(coco_json, images)
    else:
        data, items = load_coco(coco_json, images)
    return pipeline_ap(pipeline, items[:limit] if limit is not None else items, data, absent_per_image, seed)


def pipeline_ap(pipeline: Any, items: Sequence[EvalItem], coco_gt: dict, absent_per_image: int = 1,
                seed: int = 0) -> dict[str, float]:
    """`evaluate_pipeline` on EvalItems (images may be in memory) against the COCO dict `coco_gt`
    (its image ids = the items' `image_id`, its category names = the items' categories)."""
    from chatrex.eval.coco_eval import coco_ap
    from chatrex.ops.boxes import box_xyxy_to_xywh

    ids = {c["name"]: c["id"] for c in coco_gt["categories"]}
    rng = np.random.default_rng(seed)
    dets = []
    for item in items:
        present = sorted(set(item.categories))
        pool = [c for c in item.vocabulary if c not in present]
        asked = present + [pool[int(i)] for i in rng.permutation(len(pool))[:absent_per_image]]
        for cat in asked:
            for d in pipeline.detect(item.image, [cat]).detections:
                xywh = box_xyxy_to_xywh(torch.tensor([d.box], dtype=torch.float64))[0].tolist()
                dets.append({"image_id": item.image_id, "category_id": ids[cat], "bbox": xywh, "score": float(d.score)})
    keep = {item.image_id for item in items}
    gt = {**coco_gt, "images": [i for i in coco_gt["images"] if i["id"] in keep],
          "annotations": [a for a in coco_gt["annotations"] if a["image_id"] in keep]}
    scores: dict[str, float] = coco_ap(gt, dets, class_agnostic=False)
    scores.update(n_images=float(len(items)), n_detections=float(len(dets)))
    return scores


def items_to_coco(items: Sequence[EvalItem]) -> dict[str, Any]:
    """A COCO ground-truth dict of EvalItems (image ids = item ids; categories = the items' vocabulary)."""
    from chatrex.eval.coco_eval import coco_dataset

    vocab = sorted({c for item in items for c in (*item.vocabulary, *item.categories)})
    cat_id = {name: i + 1 for i, name in enumerate(vocab)}
    images = []
    for item in items:
        width, height = _image_size(item.image)
        images.append({"id": item.image_id, "width": width, "height": height, "file_name": f"{item.image_id}.png"})
    boxes = [torch.as_tensor(np.asarray(item.boxes, np.float64).reshape(-1, 4)) for item in items]
    return coco_dataset(images, boxes, [[cat_id[c] for c in item.categories] for item in items],
                        [{"id": i, "name": n} for n, i in cat_id.items()])


def _items_from_dict(data: dict, images: Any) -> list[EvalItem]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_text(json.dumps(data))
        return load_coco(path, images)[1]


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`chatrex eval chatrex --mllm DIR (--ann FILE --images DIR | --synthetic N [--renderer R]) [--upn CKPT]`."""
    parser = argparse.ArgumentParser(prog="chatrex eval chatrex", description="Evaluate a ChatRex model.")
    parser.add_argument("--mllm", help="model folder (default: the embedded tiny model)")
    parser.add_argument("--ann", help="COCO-format annotation json")
    parser.add_argument("--images", help="folder of the annotation file's images")
    parser.add_argument("--synthetic", type=int, default=0, help="evaluate on N held-out synthetic scenes instead")
    parser.add_argument("--renderer", default="default", choices=("default", "alt"))
    parser.add_argument("--upn", help="UPN checkpoint: also run the full pipeline (detection-by-retrieval AP)")
    parser.add_argument("--upn-config", default="tiny", help="UPN preset of --upn (default tiny)")
    parser.add_argument("--distractors", type=int, default=0, help="random extra boxes per image (GT-box metrics)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="write the scores here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.synthetic and not (args.ann and args.images):
        parser.error("give --ann FILE --images DIR, or --synthetic N")
    from chatrex.pipeline import ChatRex

    pipe = ChatRex.from_pretrained(mllm=args.mllm, upn=args.upn, dtype=torch.float32, device="cpu",
                                   upn_config=args.upn_config)
    scores: dict[str, Any] = {}
    if args.synthetic:
        items = heldout_scenes(args.synthetic, renderer=args.renderer)
        scores.update(evaluate_chatrex(pipe.model, pipe.processor, items, distractors=args.distractors))
        if pipe.upn is not None:
            scores.update({f"pipeline_{k}": v for k, v in pipeline_ap(pipe, items, items_to_coco(items)).items()})
    else:
        data, items = load_coco(args.ann, args.images)
        items = items[:args.limit] if args.limit else items
        scores.update(evaluate_chatrex(pipe.model, pipe.processor, items, distractors=args.distractors))
        if pipe.upn is not None:
            scores.update({f"pipeline_{k}": v for k, v in evaluate_pipeline(pipe, data, args.images, limit=args.limit).items()})
    for key, value in scores.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
    return 0


__all__ = [
    "EvalItem", "answer_questions", "build_queries", "evaluate_chatrex", "evaluate_pipeline", "heldout_scenes",
    "items_to_coco", "load_coco", "pipeline_ap", "main", "normalize_phrase", "referring_correct", "scene_item",
]


if __name__ == "__main__":
    raise SystemExit(main())
