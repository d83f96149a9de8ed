"""Guidance methods (`pictor.guidance_methods`) on the shipped default model: (a) the time per image of a
guidance interval, which skips the negative prompt's pass outside it, against CFG on every step (median of
--repeats runs of a batch), and (b) shapes-dev adherence per method on a subset of the dev prompts (every
--every-th one), the same seeds for every method, scored by the exact shapes scorer. Prints JSON; --out
writes it.

    python benchmarks/bench_guidance.py [--model default] [-k 2] [--every 3] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

from _shapes_rows import emit, run_header, scored_row

from pictor.eval.shapes import load_prompts
from pictor.eval.shapes_run import generate_for_specs
from pictor.generation_request import GenerationRequest
from pictor.guidance_methods import GuidanceMethod
from pictor.loading import load

# (name, method): the rows of (b); None is plain CFG
ROWS: list[tuple[str, GuidanceMethod | None]] = [
    ("cfg", None),
    ("cfg, rescale 0.7", GuidanceMethod(rescale=0.7)),
    ("cfg, interval 0-0.7", GuidanceMethod(stop=0.7)),
    ("apg (eta 0, norm threshold 15)", GuidanceMethod("apg")),
    ("cfg-zero-star (zero init 1)", GuidanceMethod("cfg-zero-star")),
    ("tcfg", GuidanceMethod("tcfg")),
]
# (name, method): the rows of (a)
SPEED: list[tuple[str, GuidanceMethod | None]] = [
    ("cfg every step", None),
    ("interval 0-0.7", GuidanceMethod(stop=0.7)),
    ("interval 0-0.5", GuidanceMethod(stop=0.5)),
    ("rescale 0.7", GuidanceMethod(rescale=0.7)),
    ("apg", GuidanceMethod("apg")),
    ("cfg-zero-star", GuidanceMethod("cfg-zero-star")),
    ("tcfg", GuidanceMethod("tcfg")),
]


def speed(pipe: Any, repeats: int, images: int) -> dict[str, Any]:
    """Seconds per image (median of `repeats` runs of `images` images) for each row of SPEED, the rows
    taking turns in every round so that a busy machine slows them alike; and the transformer passes per
    image (2 a guided step, 1 an unguided one)."""
    steps = int(pipe.defaults["steps"])
    requests = {}
    for name, method in SPEED:
        request = GenerationRequest("a red circle above a blue square", seed=0, num_images=images)
        request.guidance_method = method
        requests[name] = request
        pipe.generate(request)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(repeats):
        for name, request in requests.items():
            start = time.perf_counter()
            pipe.generate(request)
            times[name].append((time.perf_counter() - start) / images)
    out: dict[str, Any] = {}
    base = statistics.median(times["cfg every step"])
    for name, method in SPEED:
        m = method or GuidanceMethod()
        guided = m.guided_steps(steps)
        zeroed = m.zero_init_steps if m.method == "cfg-zero-star" else 0  # (no call at all)
        passes = sum(0 if i < zeroed else 2 if i in guided else 1 for i in range(steps))
        out[name] = {
            "seconds_per_image": round(statistics.median(times[name]), 4),
            "vs_cfg": round(statistics.median(times[name]) / base, 3),
            "transformer_passes_per_image": passes,
            "runs": repeats,
        }
        print(json.dumps({name: out[name]}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("-k", "--images-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=3, help="every N-th dev prompt (3: 100 of 300)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per speed row")
    ap.add_argument("--speed-images", type=int, default=4, help="images per timed run")
    ap.add_argument("--skip-adherence", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    pipe = load(args.model, device="cpu")
    specs = load_prompts()[:: args.every]
    k = args.images_per_prompt
    result = run_header(pipe, len(specs), k, args.seed, defaults=dict(pipe.defaults))
    result["prompts_taken"] = f"shapes-dev prompts 0, {args.every}, {2 * args.every}, ..."
    if not args.skip_speed:
        result["speed"] = speed(pipe, args.repeats, args.speed_images)
    if not args.skip_adherence:
        result["adherence"] = {}
        for name, method in ROWS:
            start = time.perf_counter()
            images = generate_for_specs(pipe, specs, k, args.seed, guidance_method=method)
            row = scored_row(specs, images, time.perf_counter() - start)
            row["method"] = method.record() if method is not None else None
            result["adherence"][name] = row
            print(json.dumps({name: row}), flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
