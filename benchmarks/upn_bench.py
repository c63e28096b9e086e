"""UPN CPU/GPU benchmark: wall time per stage, peak RSS, FLOPs and FLOP efficiency.

Builds a UPN with random weights (no checkpoint needed), feeds one synthetic 2246×1590 image through
the reference transform (→ 3×800×1130, like the reference measurements in upn_reference.md §6), and
prints a table. Examples:

    python benchmarks/upn_bench.py --threads 2                  # large, fp32, fine prompt
    python benchmarks/upn_bench.py --config tiny --dtype bf16   # quick smoke run

Stages are timed with forward pre/post hooks on the Swin backbone, the encoder and the decoder; the
gaps between them are the input projections + position embeddings, the two-stage query selection
and the prediction heads. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on a separate
pass; efficiency compares achieved FLOP/s with a 2048³ GEMM measured in the same run.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from chatrex.upn.config import UPNConfig
from chatrex.upn.model import UPN
from chatrex.upn.predictor import postprocess, resolve_prompt_type, select_proposals
from chatrex.upn.preprocess import batch_images, preprocess_image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synthetic_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A deterministic 'photo': smooth gradients plus flat rectangles (compresses like a real image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    for _ in range(40):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        arr[y0:y0 + rng.integers(10, h // 3), x0:x0 + rng.integers(10, w // 3)] = rng.integers(0, 256, 3)
    return Image.fromarray(arr.astype(np.uint8))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, iters: int = 3) -> float:
    """Sustained GFLOP/s of an n³ GEMM (2·n³ FLOPs per product), best of `iters`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


class StageTimer:
    """Records perf_counter stamps at entry/exit of named sub-modules via forward hooks."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device) -> None:
        self.stamps: dict[str, float] = {}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(f"{name}_start", device)))
            self.handles.append(module.register_forward_hook(self._hook(f"{name}_end", device)))

    def _hook(self, key: str, device: torch.device) -> Callable:
        def hook(*_args) -> None:
            _sync(device)
            self.stamps[key] = time.perf_counter()
        return hook

    def stages(self, t_start: float, t_end: float) -> dict[str, float]:
        s = self.stamps
        return {
            "backbone (Swin)": s["swin_end"] - s["swin_start"],
            "input proj + pos embed": s["encoder_start"] - s["swin_end"],
            "encoder": s["encoder_end"] - s["encoder_start"],
            "query selection": s["decoder_start"] - s["encoder_end"],
            "decoder": s["decoder_end"] - s["decoder_start"],
            "heads": t_end - s["decoder_end"],
            "(before backbone)": s["swin_start"] - t_start,
        }


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    prompt = resolve_prompt_type(args.prompt)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = UPN(UPNConfig.from_name(args.config)).to(device=device, dtype=dtype).eval().requires_grad_(False)
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    image = synthetic_image(args.width, args.height)
    t = time.perf_counter()
    pixels, (h, w) = preprocess_image(image)
    pixel_values, pixel_mask = batch_images([pixels])
    pre_s = time.perf_counter() - t
    pixel_values, pixel_mask = pixel_values.to(device, dtype), pixel_mask.to(device)

    print(f"UPN benchmark: config={args.config} ({n_params:,} params, built in {build_s:.1f} s), dtype={args.dtype}, "
          f"prompt={prompt}, threads={torch.get_num_threads()}, device={device}")
    print(f"input {args.width}x{args.height} -> {tuple(pixel_values.shape)}; preprocess {pre_s * 1e3:.0f} ms")
    timer = StageTimer({"swin": model.swin, "encoder": model.transformer.encoder,
                        "decoder": model.transformer.decoder}, device)
    totals = []
    with torch.inference_mode():
        for rep in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = model(pixel_values, pixel_mask, prompt)
            _sync(device)
            t1 = time.perf_counter()
            totals.append(t1 - t0)
            print(f"\nforward #{rep + 1}: total {t1 - t0:.2f} s")
            for name, sec in timer.stages(t0, t1).items():
                print(f"  {name:<24} {sec:8.3f} s  {100 * sec / (t1 - t0):5.1f} %")
        t = time.perf_counter()
        xyxy, scores = postprocess(out.pred_logits[0].float().cpu(), out.pred_boxes[0].float().cpu(),
                                   (args.height, args.width))
        keep = select_proposals(xyxy, scores, 0.3, 0.8)
        post_s = time.perf_counter() - t
    for handle in timer.handles:
        handle.remove()
    total = min(totals)
    print(f"\npostprocess + filter: {post_s * 1e3:.1f} ms ({len(keep)} boxes kept of {len(scores)})")
    print(f"forward total (best of {len(totals)}): {total:.2f} s; peak RSS so far {peak_rss_gib():.2f} GiB")
    if not args.no_flops:
        report_flops(model, pixel_values, pixel_mask, prompt, total, device)
    print(f"peak RSS (process, incl. GEMM probes): {peak_rss_gib():.2f} GiB")


def report_flops(model: torch.nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, prompt: str,
                 total_s: float, device: torch.device) -> None:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(pixel_values, pixel_mask, prompt)
    flops = counter.get_total_flops()
    by_op = sorted(counter.get_flop_counts().get("Global", {}).items(), key=lambda kv: -kv[1])
    achieved = flops / total_s / 1e9
    print(f"\nFLOPs per image: {flops / 1e12:.3f} TFLOP; achieved {achieved:.1f} GFLOP/s")
    print("  by op: " + ", ".join(f"{getattr(op, '__name__', str(op))} {n / 1e12:.3f} T" for op, n in by_op[:5]))
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        peak = matmul_gflops(dt, device)
        print(f"  2048^3 GEMM {name}: {peak:7.1f} GFLOP/s -> floor {flops / peak / 1e9:6.2f} s, "
              f"UPN efficiency {100 * achieved / peak:5.1f} %")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="large", choices=["large", "small", "tiny"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--prompt", default="fine", choices=["fine", "coarse"])
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--width", type=int, default=2246, help="synthetic image width before the 800/1333 resize")
    p.add_argument("--height", type=int, default=1590, help="synthetic image height")
    p.add_argument("--repeats", type=int, default=1, help="timed forward passes (best is reported)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting pass and GEMM probes")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
