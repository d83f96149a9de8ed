"""Why a model fails the two-object prompts of shapes-dev: each image's detections (the scorer's own
detector) sorted into kinds of failure. Prints one JSON object.

    python benchmarks/diagnose_two_objects.py [--model default] [-k 4] [--seed 1000]

Kinds, for a prompt "a C1 S1 and a C2 S2": correct; one shape drawn in both colours (S1 twice, or S2
twice); one colour drawn on both objects; the shapes swapped between the colours; one object only; a blob
of no shape class; more objects than two; other.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch

from pictor.eval.shapes import Detection, detect_objects, judge, load_prompts
from pictor.loading import load
from pictor.pipeline import GenerationRequest


def kind(detections: list[Detection], spec: dict) -> str:
    """The kind of (non-)success of one image for a two-object spec."""
    if judge(detections, spec, 64, 64):
        return "correct"
    (s1, c1), (s2, c2) = [(o["shape"], o["color"]) for o in spec["objects"]]
    found = [(d.shape, d.color) for d in detections]
    colors = {c for _, c in found}
    shapes = {s for s, _ in found}
    shapes_of = {c: {s for s, cc in found if cc == c} for c in colors}
    if len(found) == 1:
        return "one object only"
    if None in shapes:
        return "a blob of no shape class"
    if len(found) > 2:
        return "more than two objects"
    if c1 != c2 and len(colors) == 1:
        return "one colour drawn on both objects"
    if s1 != s2 and len(shapes) == 1 and shapes <= {s1, s2} and colors == {c1, c2}:
        return "one shape drawn in both colours"
    if s1 != s2 and shapes_of.get(c1) == {s2} and shapes_of.get(c2) == {s1}:
        return "shapes swapped between the colours"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("-k", "--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.model, device="cpu")
    specs = [s for s in load_prompts() if s["tag"] == "two_object"]
    k = args.images_per_prompt
    kinds: Counter[str] = Counter()
    for i, spec in enumerate(specs):
        request = GenerationRequest(spec["prompt"], seed=args.seed + i * k, num_images=k)
        for image in pipe.generate(request):
            kinds[kind(detect_objects(np.asarray(image.image)), spec)] += 1
    total = sum(kinds.values())
    out = {
        "model": args.model,
        "prompts": len(specs),
        "images": total,
        "kinds": {name: count for name, count in kinds.most_common()},
        "fractions": {name: round(count / total, 3) for name, count in kinds.most_common()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
