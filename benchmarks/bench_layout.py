"""Layout conditioning on the shapes dev prompts: the same model, the same seeds, with and without a layout.

For K images per dev prompt, the layout of image j of prompt i is that of the ground-truth scene that
`pictor eval shapes --ground-truth` renders in its place (boxes of objects that satisfy the prompt). The
model generates each image twice on the same seed: from the prompt alone, and from the prompt plus that
layout through its layout adapter. Both sets are scored by the exact shapes scorer (per tag, overall), and
by how many layout boxes hold an object of their phrase's colour and shape at its centroid ("boxes held";
for the plain images: how often the model puts things there by chance). Prints JSON; --out writes it.

    python benchmarks/bench_layout.py [--model default] [--layout-adapter FILE] [-k 2] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pictor.eval.shapes import ground_truth_layouts, load_prompts, score_images
from pictor.eval.shapes_run import generate_for_specs, layout_scores
from pictor.loading import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--layout-adapter", default=None, help="default: the bundle's layout.safetensors")
    ap.add_argument("-k", "--images-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N dev prompts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = load(args.model, device="cpu")
    if args.layout_adapter:
        pipe.set_layout_adapter(args.layout_adapter)
    if pipe.layout_adapter is None:
        raise SystemExit(f"model {args.model} has no layout adapter; pass --layout-adapter FILE")
    specs = load_prompts()[: args.limit]
    k = args.images_per_prompt
    layouts = ground_truth_layouts(specs, k, args.seed)
    result: dict[str, Any] = {
        "model": {"name": pipe.name, "hash": pipe.hash, "layout_adapter": pipe.layout_info},
        "prompts": len(specs),
        "images_per_prompt": k,
        "seed": args.seed,
    }
    for name, given in (("prompt only", None), ("prompt + layout", layouts)):
        start = time.perf_counter()
        images = generate_for_specs(pipe, specs, k, args.seed, layouts=given)
        seconds = time.perf_counter() - start
        report = score_images(specs, images)
        held = layout_scores(specs, images, layouts)
        result[name] = {
            "overall": round(report["overall"], 4),
            "scorer_revision": report["scorer_revision"],
            "per_tag": {t: round(v, 4) for t, v in report["per_tag"].items()},
            "boxes_held": round(held["box_accuracy"], 4),
            "per_tag_boxes_held": {t: round(v, 4) for t, v in held["per_tag_box_accuracy"].items()},
            "boxes": held["boxes"],
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
