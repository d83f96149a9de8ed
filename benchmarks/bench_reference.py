"""Reference (image-prompt) conditioning on the shapes dev prompts: the same model, the same seeds, with and
without a prompt and with and without a reference picture.

For K images per dev prompt, the reference of image j of prompt i is the ground-truth render that
`pictor eval shapes --ground-truth` scores in its place (a picture that shows exactly the prompt's
objects, arranged by its own random draw). The model generates each image four ways on the same seed:
from an empty prompt (the unconditional model: chance), from an empty prompt and the reference (what the
picture alone carries), from the prompt alone, and from the prompt and the reference. Every set is scored
against the prompt's spec by the exact shapes scorer (per tag, overall). Prints JSON; --out writes it.

    python benchmarks/bench_reference.py [--model default] [--reference-adapter FILE] [-k 2] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pictor.eval.shapes import ground_truth_images, load_prompts, score_images
from pictor.eval.shapes_run import generate_for_specs
from pictor.loading import load

CONDITIONS = (
    ("empty prompt", False, False),
    ("empty prompt + reference", False, True),
    ("prompt only", True, False),
    ("prompt + reference", True, True),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--reference-adapter", default=None, help="default: the bundle's reference.safetensors")
    ap.add_argument("-k", "--images-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N dev prompts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = load(args.model, device="cpu")
    if args.reference_adapter:
        pipe.set_reference_adapter(args.reference_adapter)
    if pipe.reference_adapter is None:
        raise SystemExit(f"model {args.model} has no reference adapter; pass --reference-adapter FILE")
    specs = load_prompts()[: args.limit]
    k = args.images_per_prompt
    pictures = ground_truth_images(specs, k, args.seed)
    result: dict[str, Any] = {
        "model": {"name": pipe.name, "hash": pipe.hash, "reference_adapter": pipe.reference_info},
        "prompts": len(specs),
        "images_per_prompt": k,
        "seed": args.seed,
    }
    for name, with_prompt, with_reference in CONDITIONS:
        start = time.perf_counter()
        images = generate_for_specs(
            pipe,
            specs,
            k,
            args.seed,
            references=pictures if with_reference else None,
            empty_prompts=not with_prompt,
        )
        seconds = time.perf_counter() - start
        report = score_images(specs, images)
        result[name] = {
            "overall": round(report["overall"], 4),
            "scorer_revision": report["scorer_revision"],
            "per_tag": {t: round(v, 4) for t, v in report["per_tag"].items()},
            "images": report["n_images"],
            "seconds": round(seconds, 1),
        }
        print(f"{name}: {result[name]['overall']:.3f} ({seconds:.0f} s)", flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
