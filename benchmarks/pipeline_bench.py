"""Pipeline cache benchmark: N questions about one image, with the per-image cache vs without.

With the cache, UPN, both vision towers, the object encoder and the LLM prefill of the image/object
prefix run once; each question only prefills its own text and decodes. Without it, every question
pays for everything. Default: tiny random models built on the fly (CPU, seconds); pass --mllm / --upn
for real ones.

    .venv/bin/python benchmarks/pipeline_bench.py                       # tiny random models
    .venv/bin/python benchmarks/pipeline_bench.py --mllm checkpoints/chatrex --upn upn_large.pth \\
        --upn-config large --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "What is in this image?", "How many people are there?", "What color is the largest object?",
    "Is there anything on the table?", "Describe the left side.", "What is the person doing?",
    "Where could this photo be taken?", "What is the most unusual object?", "Is it day or night?",
    "What would you do here?",
]


def build_tiny(folder: Path) -> tuple[Path, Path]:
    """Random tiny ChatRex folder + tiny UPN checkpoint (the test-suite builders)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny_chatrex, build_tiny_upn

    return build_tiny_chatrex(folder / "chatrex-tiny"), build_tiny_upn(folder / "upn_tiny.pth")


def run(rex, image, questions: list[str], max_new_tokens: int) -> float:
    start = time.perf_counter()
    for q in questions:
        rex.chat(image, q, max_new_tokens=max_new_tokens)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mllm", help="ChatRex folder (default: tiny random model)")
    ap.add_argument("--upn", help="UPN checkpoint (default: tiny random UPN)")
    ap.add_argument("--upn-config", default="tiny", choices=["large", "small", "tiny"])
    ap.add_argument("--image", help="image file (default: a synthetic 640x480 image)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from chatrex.pipeline import ChatRex

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    mllm, upn = args.mllm, args.upn
    if mllm is None or upn is None:
        tiny_mllm, tiny_upn = build_tiny(Path(tmp.name))
        mllm, upn = mllm or tiny_mllm, upn or tiny_upn
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    questions = (QUESTIONS * (args.questions // len(QUESTIONS) + 1))[: args.questions]
    common = dict(mllm=mllm, upn=upn, upn_config=args.upn_config, device=args.device, dtype=args.dtype)
    cached = ChatRex.from_pretrained(**common)
    uncached = ChatRex(cached.model, cached.processor, cached.upn, cache_size=0, prefix_cache_size=0)
    run(uncached, image, questions[:1], args.max_new_tokens)  # warm-up (allocator, kernels)
    cached.clear_cache()
    t_without = run(uncached, image, questions, args.max_new_tokens)
    t_with = run(cached, image, questions, args.max_new_tokens)
    n = len(questions)
    print(f"device={args.device} dtype={args.dtype} questions={n} max_new_tokens={args.max_new_tokens} "
          f"mllm={'tiny-random' if args.mllm is None else args.mllm}")
    print(f"without cache: {t_without:.3f} s ({t_without / n * 1000:.1f} ms/question)")
    print(f"with cache:    {t_with:.3f} s ({t_with / n * 1000:.1f} ms/question)")
    print(f"speed-up:      {t_without / t_with:.2f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
