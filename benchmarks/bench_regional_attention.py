"""Regional prompts' cost: a pass per region (the velocity blend) against one pass with regional attention,
side by side in one run, for 1 to 8 regions on the same model, size, seed and steps. Prints JSON; --out
writes it.

Each setting's time is the median of --rounds runs after one untimed warm-up run, the two ways interleaved
round by round so that other work on the machine weighs on both alike.

    python benchmarks/bench_regional_attention.py [--model default] [--size 64] [--regions 2,4,8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from pictor.generation_request import GenerationRequest
from pictor.loading import load


def strips(count: int) -> list[dict]:
    """`count` side-by-side boxes across the image, each with its own prompt."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    return [
        {"box": [i / count, 0.0, (i + 1) / count, 1.0], "prompt": f"a {colours[i % len(colours)]} circle"}
        for i in range(count)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--regions", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    pipe = load(args.model, device="cpu")
    result: dict = {
        "model": args.model,
        "size": args.size,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": [],
    }
    for count in (int(c) for c in args.regions.split(",")):
        request = GenerationRequest(
            "shapes", width=args.size, height=args.size, steps=args.steps, seed=1, regions=strips(count)
        )
        times: dict[str, list[float]] = {"blend": [], "attention": []}
        for rounds in range(args.rounds + 1):  # round 0 warms up (first-call allocations), not timed
            for way in times:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pipe.generate(replace(request, regional_attention=way == "attention"))
                if rounds:
                    times[way].append(time.perf_counter() - start)
        blend, attention = (statistics.median(times[w]) for w in ("blend", "attention"))
        row = {
            "regions": count,
            "blend_s": round(blend, 3),
            "attention_s": round(attention, 3),
            "speedup": round(blend / attention, 2),
        }
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
