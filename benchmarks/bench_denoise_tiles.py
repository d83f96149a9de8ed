"""Denoise tiles (MultiDiffusion, A1111's Tiled Diffusion): the transformer whole and in windows, in one run.

Two parts, printed as one JSON object (and written to --out):

- `transformer`: one velocity call (batch 1, no CFG) of a FLUX.1-layout transformer on a --size image
  (FLUX.1's 16-pixel tokens: 1024x1024 is 64x64 = 4096 image tokens) with --txt text tokens (512, as FLUX.1
  [dev]'s T5 gives), three ways, each in a fresh process so that its memory is its own:
  `diffusers_whole` (diffusers' FluxTransformer2DModel with the same weights, mapped by
  benchmarks/_flux_reference.py: the reference), `pictor_whole`, and `pictor_tiled` (windows of --tile
  pixels sharing --overlap, from `pictor.denoise_tiles.plan_windows`, run one at a time and blended by
  `tiled_call`, as the sampler does with `--denoise-tile`). Per run: seconds per call (median of --repeats
  after one warm-up), the highest memory while the calls run (CPU: resident set polled every millisecond;
  CUDA: max_memory_allocated) and its rise over the moment before the first call, and the velocity's
  distance from pictor_whole's (for diffusers: the parity check, float rounding only; for the windows: what
  tiling changes, since a window's tokens attend only to each other and the text).

  The model: FLUX.1's width (hidden 3072, 24 heads of 128, axes [16, 56, 56], context 4096, pooled 768,
  guidance embedding) with --double double and --single single blocks instead of 19 + 38, random weights
  (std 0.02, norm scales around 1). Full width because how memory and time split between the linears (linear
  in tokens) and attention (quadratic in tokens) depends on the width: a narrower model would make attention
  weigh more than it does in FLUX.1. Few blocks so that a call takes seconds on 2 CPU cores, not minutes:
  a double and a single block do about the same work per token (12 hidden^2 multiply-adds in their linears,
  plus the same attention), so 1 + 2 blocks are about 3/57 of a FLUX.1 call's time, and the ratio of tiled
  to whole holds for the full depth; activations live one block at a time, so the memory rise of a call
  hardly depends on the depth (the weights do: 2.7 GB here in fp32, 24 GB for FLUX.1's in bf16).

- `quality`: the shipped default model (64x64, 8-pixel tokens, trained), the hires fix x2 to 128x128
  (its second pass at the default strength 0.3) whole and with denoise tiles of --quality-tile pixels
  (--quality-overlap), for --prompts shapes-world dev prompts spread over all six tags (as
  benchmarks/bench_hires.py picks them), --images each, the same seeds in both rows: PSNR of each tiled
  image against its whole twin, seconds per image, and SHAPES.md's adherence score of both rows.

Usage: python benchmarks/bench_denoise_tiles.py [--size 1024] [--tile 512] [--overlap 128] [--double 1]
    [--single 2] [--txt 512] [--repeats 2] [--device cpu] [--dtype fp32] [--prompts 20] [--images 2]
    [--out benchmarks/results/denoise_tiles.json]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import numpy as np
import torch
from _flux_reference import build_reference, reference_forward
from _fresh_runs import emit, measure, rel_err, run_each
from bench_fp8 import flux_width_params, random_state

from pictor.denoise_tiles import plan_windows, tiled_call
from pictor.models.flux import Flux, make_img_ids, make_txt_ids

RUNS = ("diffusers_whole", "pictor_whole", "pictor_tiled")
FLAGS = ("device", "dtype", "double", "single", "size", "tile", "overlap", "txt", "repeats", "threads")
TOKEN_PX = 16  # FLUX.1: the autoencoder's 8x downsampling times the transformer's 2x2 patches
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (transformer part)")
    ap.add_argument("--tile", type=int, default=512, help="window side in pixels (transformer part)")
    ap.add_argument("--overlap", type=int, default=128, help="pixels neighbouring windows share")
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--txt", type=int, default=512, help="text tokens (FLUX.1 [dev]: 512)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per run, after one warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=20, help="shapes dev prompts (quality part; 0: skip it)")
    ap.add_argument("--images", type=int, default=2, help="images per prompt (quality part)")
    ap.add_argument("--quality-tile", type=int, default=64)
    ap.add_argument("--quality-overlap", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/denoise_tiles.json", help="also write the JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    return ap.parse_args()


def worker(args: argparse.Namespace) -> None:
    """One way of one call, in this fresh process; prints its numbers as JSON and saves the velocity."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    params = flux_width_params(args.double, args.single)
    sd = random_state(params, dtype)
    if args.run.startswith("pictor"):
        with torch.device("meta"):
            model: torch.nn.Module = Flux(params)
        model.load_state_dict(sd, strict=True, assign=True)
    else:
        model = build_reference(params, sd)
    del sd
    model = model.to(device).eval().requires_grad_(False)

    side = args.size // TOKEN_PX  # tokens a side
    gen = torch.Generator().manual_seed(1)  # on the CPU, so every device gets the same inputs
    img = torch.randn(1, side * side, params.in_channels, generator=gen).to(device, dtype)
    img_ids = make_img_ids(1, 2 * side, 2 * side).to(device)  # positions stay float32
    txt = torch.randn(1, args.txt, params.context_in_dim, generator=gen).to(device, dtype)
    txt_ids = make_txt_ids(1, args.txt).to(device)
    t = torch.tensor([0.6]).to(device, dtype)
    y = torch.randn(1, params.vec_in_dim, generator=gen).to(device, dtype)
    guidance = torch.tensor([3.5]).to(device, dtype)

    def call(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if args.run == "diffusers_whole":
            return reference_forward(model, x, ids, txt, txt_ids, t, y, guidance)
        return model(x, ids, txt, txt_ids, t, y, guidance=guidance)

    windows = None
    if args.run == "pictor_tiled":
        windows = plan_windows(side, side, args.tile // TOKEN_PX, args.overlap // TOKEN_PX)
        assert windows is not None, "the tile covers the whole image: nothing to tile"

    def step() -> torch.Tensor:
        with torch.inference_mode():
            if windows is None:
                return call(img, img_ids)
            return tiled_call(windows, img, lambda index: call(img[:, index], img_ids[:, index]))

    measure(step, args.repeats, device, args.save, model)


def transformer_part(args: argparse.Namespace) -> dict[str, Any]:
    runs, outs = run_each(__file__, RUNS, args, FLAGS)
    base = outs["pictor_whole"]
    for run, numbers in runs.items():
        numbers["max_abs_diff_vs_pictor_whole"] = float(f"{float((outs[run] - base).abs().max()):.3g}")
        numbers["rel_diff_vs_pictor_whole"] = rel_err(outs[run], base)  # ||a - b|| / ||b||
    numbers = runs["pictor_tiled"]
    numbers["cosine_vs_pictor_whole"] = round(
        float(torch.nn.functional.cosine_similarity(outs["pictor_tiled"].flatten(), base.flatten(), dim=0)), 4
    )
    side, window = args.size // TOKEN_PX, args.tile // TOKEN_PX
    windows = plan_windows(side, side, window, args.overlap // TOKEN_PX)
    count = len(windows) if windows else 1
    params = flux_width_params(args.double, args.single)
    return {
        "model": (
            f"FLUX.1 layout at FLUX.1's width (hidden {params.hidden_size}, {params.num_heads} heads of "
            f"{params.head_dim}, context {params.context_in_dim}), {params.depth} double + "
            f"{params.depth_single_blocks} single blocks (FLUX.1: 19 + 38), random weights (std 0.02)"
        ),
        "device": args.device,
        "dtype": str(DTYPES[args.dtype]).removeprefix("torch."),
        "threads": args.threads,
        "size": args.size,
        "image_tokens": side * side,
        "text_tokens": args.txt,
        "tile": args.tile,
        "overlap": args.overlap,
        "windows": count,
        "tokens_per_window_call": min(side, window) ** 2 + args.txt,
        "tokens_whole_call": side * side + args.txt,
        "repeats": args.repeats,
        "runs": runs,
    }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return round(10 * math.log10(255**2 / mse), 2) if mse > 0 else math.inf


def quality_part(args: argparse.Namespace) -> dict[str, Any]:
    """The hires fix's second pass whole against in windows, on the shipped default model."""
    import pictor
    from pictor.eval.shapes import load_prompts, score_images
    from pictor.pipeline import GenerationRequest

    pipe = pictor.load("default", device="cpu")
    every = load_prompts()
    specs = every[:: max(1, len(every) // args.prompts)][: args.prompts]  # as bench_hires: all six tags
    tiling = {"denoise_tile": args.quality_tile, "denoise_tile_overlap": args.quality_overlap}
    pipe.generate(GenerationRequest(specs[0]["prompt"], seed=0, hires_scale=2.0, **tiling))  # warm-up

    def run(**settings: Any) -> tuple[list[list[np.ndarray]], float]:
        images, start = [], time.perf_counter()
        for i, spec in enumerate(specs):
            request = GenerationRequest(
                spec["prompt"],
                seed=1000 + i * args.images,
                num_images=args.images,
                hires_scale=2.0,
                **settings,
            )
            images.append([np.asarray(g.image) for g in pipe.generate(request)])
        return images, (time.perf_counter() - start) / (len(specs) * args.images)

    rows: dict[str, Any] = {}
    made: dict[str, list[list[np.ndarray]]] = {}
    for name, settings in (("whole", {}), ("tiled", tiling)):
        made[name], seconds = run(**settings)
        report = score_images(specs, made[name])
        rows[name] = {
            "overall": round(report["overall"], 3),
            "scorer_revision": report["scorer_revision"],
            "per_tag": {k: round(v, 3) for k, v in report["per_tag"].items()},
            "seconds_per_image": round(seconds, 2),
        }
        print(name, rows[name], flush=True)
    psnr = [
        _psnr(a, b)
        for row_t, row_w in zip(made["tiled"], made["whole"], strict=True)
        for a, b in zip(row_t, row_w, strict=True)
    ]
    size = made["whole"][0][0].shape
    patch = pipe.patch
    windows = plan_windows(
        size[0] // patch, size[1] // patch, args.quality_tile // patch, args.quality_overlap // patch
    )
    return {
        "model": "default (shipped, trained at 64x64, 8-pixel tokens)",
        "pass": (
            f"hires fix x2: {pipe.defaults['width']}x{pipe.defaults['height']} -> {size[1]}x{size[0]}, "
            f"second pass at strength 0.3 (the default), {pipe.defaults['steps']} steps, "
            f"CFG {pipe.defaults['guidance']}; the first pass fits one window and runs whole"
        ),
        "tile": args.quality_tile,
        "overlap": args.quality_overlap,
        "windows": len(windows) if windows else 1,
        "prompts": len(specs),
        "images_per_prompt": args.images,
        "psnr_tiled_vs_whole_mean": round(float(np.mean(psnr)), 2),
        "psnr_tiled_vs_whole_min": min(psnr),
        "psnr_tiled_vs_whole_max": max(psnr),
        "rows": rows,
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    result: dict[str, Any] = {"transformer": transformer_part(args)}
    if args.prompts > 0:
        result["quality"] = quality_part(args)
    result["torch"] = torch.__version__
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    # Other work on the machine slows the timings (not the memory): the 1-minute load average at both ends.
    result["load_average"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
    emit(result, args.out)


if __name__ == "__main__":
    main()
