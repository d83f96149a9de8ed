"""An edge ControlNet on the shapes dev prompts: the same model, the same seeds, with and without edges.

For K images per dev prompt, the control picture of image j of prompt i is the Canny edge map (thresholds
100 and 200, as `pictor preprocess canny` and `pictor train controlnet` draw it) of the ground-truth scene
that `pictor eval shapes --ground-truth` renders in its place: a scene that satisfies the prompt. The model
generates each image twice on the same seed: from the prompt alone (no ControlNet loaded), and from the
prompt plus those edges through the ControlNet (e.g. one trained by `pictor train controlnet --base default
--data shapes`). Both sets are scored by the exact shapes scorer (per tag, overall). Prints JSON; --out
writes it.

    python benchmarks/bench_controlnet_adherence.py --controlnet RUN/controlnet [--model default] [-k 2]
        [--limit N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pictor.edge_maps import CONTROLNET_CANNY, canny_control_picture
from pictor.eval.shapes import ground_truth_images, load_prompts, score_images
from pictor.eval.shapes_run import generate_for_specs
from pictor.loading import load

# Scenes unlike those of `pictor eval shapes --ground-truth` (seed 0) and of the training run's evals (13).
SCENE_SEED = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--controlnet", required=True, help="a ControlNet folder or file for the model")
    ap.add_argument("-k", "--images-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N dev prompts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = load(args.model, device="cpu")
    specs = load_prompts()[: args.limit]
    k = args.images_per_prompt
    size = int(pipe.defaults["width"])
    low, high = CONTROLNET_CANNY
    scenes = ground_truth_images(specs, k, SCENE_SEED, size)
    edges = [[canny_control_picture(np.ascontiguousarray(im), low, high) for im in row] for row in scenes]
    result: dict[str, Any] = {"model": {"name": pipe.name, "hash": pipe.hash}, "prompts": len(specs)}
    result.update({"images_per_prompt": k, "seed": args.seed, "scene_seed": SCENE_SEED})
    start = time.perf_counter()
    plain = generate_for_specs(pipe, specs, k, args.seed)
    runs = [("prompt only", plain, time.perf_counter() - start)]
    info = pipe.add_controlnet(args.controlnet)
    result["controlnet"] = info
    start = time.perf_counter()
    controlled = generate_for_specs(pipe, specs, k, args.seed, controls=edges)
    runs.append(("prompt + edges", controlled, time.perf_counter() - start))
    runs.append(("ground truth scenes", scenes, 0.0))
    for name, images, seconds in runs:
        report = score_images(specs, images)
        result[name] = {
            "overall": round(report["overall"], 4),
            "scorer_revision": report["scorer_revision"],
            "per_tag": {t: round(v, 4) for t, v in report["per_tag"].items()},
            "images": report["n_images"],
            "seconds": round(seconds, 1),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
