"""The hires fix against asking the model straight for the larger size, on the shapes world.

The shipped default model was trained at 64x64. For --prompts dev prompts spread evenly over the file (so
over all six tags), --images each (the same seeds everywhere), it prints as JSON the shapes-adherence score
(SHAPES.md's scorer, which works at any canvas size) and seconds per image of: its own size (64x64); the
64x64 images only upscaled to 128x128; 128x128 asked for directly; and 128x128 by the hires fix (64x64,
Lanczos-upscaled x2, image-to-image at each of --strengths).

Usage: python benchmarks/bench_hires.py [--prompts 40] [--images 2] [--strengths 0.3,0.5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pictor
from pictor.eval.shapes import load_prompts, score_images
from pictor.hires import upscale
from pictor.pipeline import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--strengths", default="0.3,0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = pictor.load(args.model, device="cpu")
    every = load_prompts()
    specs = every[:: max(1, len(every) // args.prompts)][: args.prompts]  # spread over all six tags
    base_w, base_h = pipe.defaults["width"], pipe.defaults["height"]

    def run(**settings: Any) -> tuple[list[list[np.ndarray]], float, list]:
        images, pils, start = [], [], time.perf_counter()
        for i, spec in enumerate(specs):
            request = GenerationRequest(
                spec["prompt"], seed=1000 + i * args.images, num_images=args.images, **settings
            )
            made = pipe.generate(request)
            pils.append([g.image for g in made])
            images.append([np.asarray(g.image) for g in made])
        return images, (time.perf_counter() - start) / (len(specs) * args.images), pils

    rows: dict[str, Any] = {}

    def record(name: str, images: list[list[np.ndarray]], seconds: float | None) -> None:
        report = score_images(specs, images)
        rows[name] = {
            "overall": round(report["overall"], 3),
            "scorer_revision": report["scorer_revision"],
            "per_tag": {k: round(v, 3) for k, v in report["per_tag"].items()},
            "seconds_per_image": None if seconds is None else round(seconds, 2),
        }
        print(name, rows[name], flush=True)

    base, seconds, base_pils = run()
    record(f"{base_w}x{base_h} (the model's size)", base, seconds)
    record(
        f"{2 * base_w}x{2 * base_h}, {base_w}x{base_h} upscaled only",
        [list(upscale(p, 2 * base_w, 2 * base_h)) for p in base_pils],
        None,
    )
    direct, seconds, _ = run(width=2 * base_w, height=2 * base_h)
    record(f"{2 * base_w}x{2 * base_h} directly", direct, seconds)
    for strength in (float(s) for s in args.strengths.split(",")):
        hires, seconds, _ = run(hires_scale=2.0, hires_strength=strength)
        record(f"{2 * base_w}x{2 * base_h} by the hires fix, strength {strength:g}", hires, seconds)
    report = {
        "model": args.model,
        "prompts": len(specs),
        "images_per_prompt": args.images,
        "steps": pipe.defaults["steps"],
        "runs": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
