"""A1111's composable diffusion (AND) on the shapes dev prompts of two objects: the same model, the same
seeds, each prompt as written ("a red star and a blue circle") and with its objects as parts joined by AND
("a red star AND a blue circle", composable on), the use the method was made for (Liu et al. 2022,
"Compositional Visual Generation with Composable Diffusion Models"). Both sets are scored by the exact
shapes scorer; the seconds say what the extra passes cost. Prints JSON; --out writes it.

    python benchmarks/bench_composable.py [--model default] [-k 2] [--tags two_object,color_attr] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _shapes_rows import emit, run_header, scored_row

from pictor.eval.shapes import load_prompts
from pictor.generation_request import GenerationRequest
from pictor.loading import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("-k", "--images-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tags", default="two_object,color_attr", help="dev prompt tags whose prompts join by 'and'"
    )
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts of each tag")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = load(args.model, device="cpu")
    tags = args.tags.split(",")
    specs = [s for tag in tags for s in [s for s in load_prompts() if s["tag"] == tag][: args.limit]]
    specs = [s for s in specs if s["prompt"].count(" and ") == 1]  # two objects joined by one "and"
    k = args.images_per_prompt
    result = run_header(pipe, len(specs), k, args.seed)
    result["tags"] = tags
    for name, composable in (("prompt as written", False), ("parts joined by AND", True)):
        start = time.perf_counter()
        images = []
        for i, spec in enumerate(specs):
            prompt = spec["prompt"].replace(" and ", " AND ") if composable else spec["prompt"]
            request = GenerationRequest(prompt, seed=args.seed + i * k, num_images=k, composable=composable)
            images.append([g.image for g in pipe.generate(request)])
        seconds = time.perf_counter() - start
        result[name] = scored_row(specs, [[np.asarray(im) for im in row] for row in images], seconds)
        print(json.dumps({name: result[name]}), flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
