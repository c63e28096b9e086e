"""ChatRex MLLM CPU benchmark: load memory, time to first token, decode speed and its memory-bandwidth bound.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mllm_bench.py --config chatrex-7b --threads 2 --dtype bf16
    .venv/bin/python benchmarks/mllm_bench.py --config tiny          # seconds; for development

The weights are random (official weights are never available here) but every tensor has its real shape and
dtype, which is all that decides speed and memory. They are allocated directly in the target dtype on a
meta-initialised model (`chatrex.model.loading.empty_model` + `materialize_random_`), so a bf16 model never
exists in fp32. The tokenizer is a small word-level stand-in built in memory (ids are what matter: the prompt
layout, its sentinels and its length follow the real processor; a real Llama tokenizer would give a few more
text tokens). Time to first token covers the full path for a 768x768 image (the preset's high-res side):
processor -> vision towers (+ object encoder) -> prompt merge + LLM prefill -> first token. Decode runs a manual
greedy loop on the KV cache that ignores EOS (random weights may emit EOS at once), i.e. `min_new_tokens`.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatrex.model.configuration import ChatRexConfig  # noqa: E402
from chatrex.model.loading import empty_model, materialize_random_  # noqa: E402
from chatrex.model.processing import ChatRexProcessor  # noqa: E402

QUESTION = "Please detect person; dog; bicycle in this image. Answer the question with object indexes."
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def peak_rss_gb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def stream_bandwidth_gbs(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` streaming bandwidth: copy (read+write) and add (2 reads + write), in GB/s."""
    n = nbytes // 4
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    c.copy_(a)  # touch pages once
    best_copy = best_add = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        c.copy_(a)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        torch.add(a, b, out=c)
        best_add = min(best_add, time.perf_counter() - t)
    return {"copy": 2 * nbytes / best_copy / 1e9, "add": 3 * nbytes / best_add / 1e9}


def stand_in_tokenizer() -> Any:
    """Word-level fast tokenizer with Llama-like specials (<unk>=0, <s>=1, </s>=2); the processor adds the ChatRex
    special tokens. A few hundred ids: valid for every preset's embedding table."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for w in (QUESTION + " USER: ASSISTANT: <|im_start|> user assistant <|im_end|>").split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def random_boxes(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    xy = rng.uniform(0, side * 0.8, size=(n, 2))
    wh = rng.uniform(side * 0.05, side * 0.2, size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, side)], axis=1).astype(np.float32)


def build_model(config: ChatRexConfig, dtype: torch.dtype) -> tuple[torch.nn.Module, float]:
    t = time.perf_counter()
    model = materialize_random_(empty_model(config), dtype)
    return model.eval(), time.perf_counter() - t


def _cache_kw(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def _out_cache(out: Any) -> Any:
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def warm_up(model: torch.nn.Module, config: ChatRexConfig, dtype: torch.dtype) -> None:
    """One small pass through every kernel family (oneDNN picks/JITs kernels on first use)."""
    low = config.low_res_size
    model.vision_tower(torch.zeros(1, 3, low, low, dtype=dtype))
    model.encode_highres(torch.zeros(1, 3, 64, 64, dtype=dtype))
    model.model(input_ids=torch.ones(1, 8, dtype=torch.long))


def time_to_first_token(model, processor, image, boxes: np.ndarray) -> dict[str, Any]:
    """Full path for one (image, boxes, question); returns stage times and the prefill cache for decoding."""
    t0 = time.perf_counter()
    inputs = processor.process(image, QUESTION, boxes if len(boxes) else None)
    t1 = time.perf_counter()
    image_tokens, maps = model.encode_images(inputs["pixel_values"], inputs["pixel_values_aux"])
    t2 = time.perf_counter()
    objects = model.encode_objects(maps, [inputs["gt_boxes"][0]]) if len(boxes) else [None]
    t3 = time.perf_counter()
    embeds, mask, positions, _ = model.prepare_inputs_embeds(inputs["input_ids"], inputs["attention_mask"],
                                                             image_tokens, objects)
    out = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    first = model.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)  # (1, 1)
    t4 = time.perf_counter()
    return {"boxes": len(boxes), "prompt_ids": inputs["input_ids"].shape[1], "merged_len": embeds.shape[1],
            "processor_s": t1 - t0, "vision_s": t2 - t1, "objects_s": t3 - t2, "prefill_s": t4 - t3,
            "ttft_s": t4 - t0, "cache": _out_cache(out), "first": first}


def decode(model, cache: Any, first: torch.Tensor, start: int, steps: int) -> float:
    """Greedy steps on the KV cache (EOS ignored); returns tokens/s."""
    kw, tok = _cache_kw(model), first
    t = time.perf_counter()
    for i in range(steps):
        pos = torch.tensor([[start + i]])
        out = model.model(input_ids=tok, position_ids=pos, use_cache=True, **{kw: cache})
        cache = _out_cache(out)
        tok = model.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)
    return steps / (time.perf_counter() - t)


def decode_bytes_per_token(model: torch.nn.Module, config: ChatRexConfig, seq_len: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) read per decoded token: every LLM matrix and lm_head, one embedding row;
    K and V of all layers at `seq_len`."""
    emb = model.get_input_embeddings().weight
    llm = sum(p.numel() * p.element_size() for p in model.model.parameters())
    llm += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    llm -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * seq_len * emb.element_size()
    return llm, kv


def run_ttft(model, config: ChatRexConfig, dtype: torch.dtype, box_counts: list[int]) -> list[dict[str, Any]]:
    from PIL import Image

    with warnings.catch_warnings():  # the stand-in's ids all fit every embedding table
        warnings.simplefilter("ignore")
        processor = ChatRexProcessor(stand_in_tokenizer(), config)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(768, 768, 3), dtype=np.uint8))
    t = time.perf_counter()
    warm_up(model, config, dtype)
    print(f"warm-up {time.perf_counter() - t:.1f} s")
    results = []
    for n in box_counts:
        for earlier in results:  # keep only the newest KV cache alive (the decode runs on it)
            earlier.pop("cache", None)
        r = time_to_first_token(model, processor, image, random_boxes(n, 768, rng))
        results.append(r)
        print(f"TTFT {r['boxes']:3d} boxes: {r['ttft_s']:7.2f} s  (processor {r['processor_s']:.2f}, vision "
              f"{r['vision_s']:.2f}, objects {r['objects_s']:.2f}, merge+prefill {r['prefill_s']:.2f}; "
              f"{r['prompt_ids']} ids -> {r['merged_len']} positions)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="chatrex-7b", choices=["chatrex-7b", "tiny", "rexseek-3b"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--boxes", default="0,20,100", help="comma-separated box counts")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--bandwidth-mib", type=int, default=256, help="buffer size of the bandwidth probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, config {args.config}, dtype {args.dtype}")
    config = ChatRexConfig.from_name(args.config)
    base_rss = current_rss_gb()
    model, build_s = build_model(config, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"model: {n_params / 1e9:.3f} B params, {weight_gb:.2f} GB of weights, built in {build_s:.1f} s; "
          f"RSS before {base_rss:.2f} GiB, after {current_rss_gb():.2f} GiB; load peak RSS {peak_rss_gb():.2f} GiB")
    with torch.inference_mode():
        results = run_ttft(model, config, dtype, [int(x) for x in args.boxes.split(",")])
        last = results[-1]
        tps = decode(model, last["cache"], last["first"], last["merged_len"], args.decode_tokens)
    merged = last["merged_len"]
    del results, last
    gc.collect()
    bw = stream_bandwidth_gbs(args.bandwidth_mib * 1024**2)  # same process, same threads, after the run
    weights, kv = decode_bytes_per_token(model, config, merged + args.decode_tokens // 2)
    bound = bw["copy"] * 1e9 / (weights + kv)
    print(f"decode: {tps:.2f} tok/s over {args.decode_tokens} tokens after a {merged}-position prefill")
    print(f"stream bandwidth: copy {bw['copy']:.1f} GB/s, add {bw['add']:.1f} GB/s")
    print(f"bandwidth bound: {bound:.2f} tok/s = {bw['copy']:.1f} GB/s / ({weights / 1e9:.2f} GB weights + "
          f"{kv / 1e9:.3f} GB KV cache read per token); decode reaches {100 * tps / bound:.0f}% of it")
    print(f"final peak RSS {peak_rss_gb():.2f} GiB ({os.cpu_count()} CPUs visible)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
