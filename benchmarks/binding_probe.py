"""Teacher-forced `<objK>` accuracy of a ChatRex training checkpoint, per task, on held-out scenes.

Where does the tiny ChatRex fail: the LLM's lookup, or the object tokens it reads? This probe feeds the
answer (teacher forcing) and counts, over the answer positions whose label is an `<objK>` token, how often
the arg-max is that token; also the accuracy on the other answer tokens. Two kinds of object slots:

    real      the checkpoint's own vision side (image tokens + RoI object tokens), as in training
    symbolic  `chatrex.train.symbolic` slots (zero image tokens), needs a checkpoint with symbolic slots

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/binding_probe.py build/run/checkpoint.pt --scenes 4
    ... --tasks detect,refer --modes symbolic

Prints one line per (mode, task): objK accuracy (n), text accuracy (n), accuracy on the colour / shape words, and the mean attention probability of
the two supervised heads on their targets (`chatrex.train.binding`: layer A gathers the phrase, layer B looks at
the matching slot). Chance for objK is ~1/K (K the
number of input boxes, ~10 in the tiny recipe). Scenes are drawn from the "val" split (never trained on).
"""

from __future__ import annotations

import argparse
import json

import torch

from chatrex.model.constants import IGNORE_INDEX

TASKS = ("detect", "detect_multi", "detect_absent", "refer", "region_category", "count")


def load(path: str):
    from chatrex.train.chatrex_trainer import ChatRexTrainConfig, build_model, load_or_build_tokenizer
    from chatrex.train.common import load_checkpoint
    from chatrex.train.region_pretrain import category_word_ids
    from chatrex.train.symbolic import SymbolicSlots

    state = torch.load(path, map_location="cpu", weights_only=True)
    config = ChatRexTrainConfig(**json.loads(state["extra"]["config"]))
    tokenizer = load_or_build_tokenizer(config)
    model = build_model(config, tokenizer)
    load_checkpoint(path, model, restore_rng=False)
    symbolic = None
    if state["extra"].get("symbolic_slots"):
        symbolic = SymbolicSlots(model.config.text_config.hidden_size, *category_word_ids(tokenizer))
        symbolic.load_state_dict(state["extra"]["symbolic_slots"])
    return config, tokenizer, model.eval(), symbolic


@torch.no_grad()
def probe(config, tokenizer, model, symbolic, task: str, mode: str, scenes: int) -> tuple[float, int, float, int]:
    from chatrex.model.processing import ChatRexProcessor
    from chatrex.train.binding import binding_attention_targets, object_token_ids
    from chatrex.train.chatrex_data import encode_samples, scene_samples
    from chatrex.train.chatrex_trainer import dense_object_features, encode_for_training
    from chatrex.train.symbolic import symbolic_objects

    processor = ChatRexProcessor(tokenizer, model.config)
    objk = torch.tensor(object_token_ids(tokenizer))
    one = config.replace(task_weights={task: 1.0}, stages=({"stage": 2, "steps": 10**7, "lr": 1e-3},))
    hit = n = thit = tn = whit = wn = 0
    from chatrex.train.region_pretrain import category_word_ids

    colours, shapes = category_word_ids(tokenizer)
    words = torch.tensor(list(colours) + list(shapes))
    mass: dict[str, list] = {"gather": [], "match": []}
    ground = tuple(tokenizer.convert_tokens_to_ids(["<ground>", "</ground>"]))
    layers = tuple(int(x) for x in config.attention_supervision_layers)
    for i in range(scenes):
        samples = scene_samples(one, 900_000 + i, 0, split="val")
        if not samples:
            continue
        batch = encode_samples(processor, samples)
        boxes = [b for b in batch["boxes"]]
        if mode == "symbolic":
            image = torch.zeros(1, model.config.num_image_tokens, model.config.text_config.hidden_size)
            objects = symbolic_objects(symbolic, model, batch["box_attrs"], boxes)
        else:
            image, maps = encode_for_training(model, batch["pixel_values"], batch["pixel_values_aux"])
            objects = [dense_object_features(model, maps, b) for b in boxes]
        labels = batch["labels"]
        keep = int((labels != IGNORE_INDEX).sum(1).max()) + 1
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=image,
                    object_features=objects, logits_to_keep=keep, output_attentions=True)
        targets = binding_attention_targets(batch["input_ids"], labels, image.shape[1], objk.tolist(), ground)
        for name, layer in (("gather", layers[0]), ("match", layers[1])):
            t = targets[name]
            if t.numel():
                p = out.attentions[layer][t[:, 0], 0, t[:, 1], t[:, 2]].float()
                if name == "gather":
                    p = p.new_zeros(int(t[:, 3].max()) + 1).index_add(0, t[:, 3], p)
                mass[name].append(p)
        pred = out.logits[:, :-1].argmax(-1)
        target = labels[:, -keep:][:, 1:]
        valid = target != IGNORE_INDEX
        is_obj = torch.isin(target, objk) & valid
        hit += int((pred == target)[is_obj].sum())
        n += int(is_obj.sum())
        is_word = torch.isin(target, words) & valid
        whit += int((pred == target)[is_word].sum())
        wn += int(is_word.sum())
        thit += int((pred == target)[valid & ~is_obj].sum())
        tn += int((valid & ~is_obj).sum())
    means = {k: float(torch.cat(v).mean()) if v else float("nan") for k, v in mass.items()}
    means["words"] = whit / max(wn, 1)
    return hit / max(n, 1), n, thit / max(tn, 1), tn, means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--modes", default="real,symbolic")
    args = parser.parse_args()
    config, tokenizer, model, symbolic = load(args.checkpoint)
    for mode in args.modes.split(","):
        if mode == "symbolic" and symbolic is None:
            print("symbolic: the checkpoint has no symbolic slots")
            continue
        for task in args.tasks.split(","):
            acc, n, tacc, tn, mass = probe(config, tokenizer, model, symbolic, task, mode, args.scenes)
            print(f"{mode:9s} {task:16s} objK {acc:.3f} (n={n:4d})  text {tacc:.3f} (n={tn})  colour/shape words "
                  f"{mass['words']:.3f}  attention on "
                  f"gather {mass['gather']:.3f} match {mass['match']:.3f}", flush=True)


if __name__ == "__main__":
    main()
