"""What live previews (`pictor.latent_preview`) cost.

1. One preview frame, by method, on random latents: `approx` (the fitted linear map, then 8-bit pictures)
   against `full` (the autoencoder's decode, then pictures), for the shipped model's autoencoder and for
   FLUX.1's (random weights: the architecture sets the cost) at the --sizes given, --frames frames each after
   one warm-up (the approx map is fitted on that warm-up's decode).
2. Generating with the shipped model (--images images, its default 20 steps, one sampler run): the median
   seconds of --repeats rounds, each running previews off, approx and full (every step) in turn, the
   slowdown against off, and the largest pixel difference of the results against off (previews never change
   an image: expected 0).

Prints JSON. Usage: python benchmarks/bench_previews.py [--sizes 256,512] [--frames 5] [--images 4]
       [--repeats 5] [--device cpu] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pictor
from pictor.latent_preview import LatentColours, Previews, preview_pictures
from pictor.models.autoencoder import AutoEncoder, flux1_ae_params
from pictor.pipeline import GenerationRequest

PROMPT = "a red circle left of a blue square"


def frame_seconds(ae: AutoEncoder, size: int, frames: int, device: torch.device) -> dict[str, Any]:
    """Median seconds of one preview frame of a 1-image batch at size x size pixels, by method."""
    f = ae.params.downsample_factor
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, ae.params.z_channels, size // f, size // f, generator=gen).to(device)
    colours = LatentColours(ae.params.z_channels)
    preview_pictures(latents, ae, colours, "approx")  # fits the map (one decode), not timed
    out: dict[str, Any] = {"size": size}
    for method in ("approx", "full"):
        times = []
        for _ in range(frames):
            start = time.perf_counter()
            pictures = preview_pictures(latents, ae, colours, method)
            times.append(time.perf_counter() - start)
        out[f"{method}_s"] = round(statistics.median(times), 5)
        out[f"{method}_picture"] = list(pictures[0].size)
    out["full_over_approx"] = round(out["full_s"] / out["approx_s"], 1)
    return out


def generate_seconds(images: int, device: str, repeats: int) -> dict[str, Any]:
    """Median seconds of `repeats` rounds, each running off, approx and full in turn (so a busy machine
    slows every mode alike)."""
    pipe = pictor.load("default", device=device)
    request = GenerationRequest(PROMPT, seed=1, num_images=images)
    pipe.generate(request)  # warm-up
    modes: tuple[str | None, ...] = (None, "approx", "full")
    times: dict[str, list[float]] = {m or "off": [] for m in modes}
    frames: dict[str, list[int]] = {m or "off": [] for m in modes}
    pixels: dict[str, list[np.ndarray]] = {}
    for _ in range(repeats):
        for method in modes:
            name = method or "off"
            seen: list[int] = []
            previews = Previews(lambda _p, _i, seen=seen: seen.append(1), method) if method else None
            start = time.perf_counter()
            result = pipe.generate(request, previews=previews)
            times[name].append(time.perf_counter() - start)
            frames[name].append(len(seen))
            pixels[name] = [np.asarray(g.image).astype(np.int16) for g in result]
    runs: dict[str, Any] = {}
    for name in times:
        difference = max(int(np.abs(a - b).max()) for a, b in zip(pixels[name], pixels["off"], strict=True))
        runs[name] = {
            "seconds_median": round(statistics.median(times[name]), 3),
            "seconds_all": [round(t, 3) for t in times[name]],
            "frames": frames[name][0],
            "max_pixel_difference_to_off": difference,
        }
    for name in ("approx", "full"):
        runs[name]["slowdown"] = round(runs[name]["seconds_median"] / runs["off"]["seconds_median"], 3)
    return {
        "model": "default",
        "images": images,
        "steps": pipe.defaults["steps"],
        "repeats": repeats,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,512", help="FLUX.1 autoencoder picture sizes")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shipped = pictor.load("default", device=args.device).autoencoder
    flux_ae = AutoEncoder(flux1_ae_params()).eval().to(device)
    with torch.inference_mode():
        report = {
            "device": args.device,
            "threads": args.threads,
            "frame": [
                {"autoencoder": "shipped", **frame_seconds(shipped, 64, args.frames, device)},
                *(
                    {
                        "autoencoder": "flux1 (random weights)",
                        **frame_seconds(flux_ae, int(s), args.frames, device),
                    }
                    for s in args.sizes.split(",")
                ),
            ],
        }
    report["generate"] = generate_seconds(args.images, args.device, args.repeats)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
