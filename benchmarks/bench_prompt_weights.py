"""What prompt weights do on the shipped default model, on the shapes world.

For --prompts dev prompts spread evenly over the file (so over all six tags), --images each (the same seeds
in every run), it prints as JSON, per run, the shapes-adherence score (SHAPES.md's scorer; overall and per
tag), seconds per image (the mean, and the median over requests), the mean absolute pixel difference
(0-255) to the plain run, and the images the scorer passes here but not in the plain run ("gained") and
the other way ("lost"). The runs:

- plain: the prompts as written, prompt_weights off;
- weights on, no brackets: the same prompts with prompt_weights on (must be the plain images bit for bit:
  the largest pixel difference is reported, expected 0);
- colour words (``red`` ...) wrapped as ``(red:W)`` for each W in --weights, prompt_weights on;
- shape words (``circle``, ``circles`` ...) wrapped likewise;
- the colour words at each of --control (below 1, so de-emphasised), as a control.

Words are the shapes world's vocabulary (`pictor.data.shapes_render`: COLORS, SHAPES and their plurals),
replaced at word boundaries. The scorer is always given the original specs. It also times the text encoder
alone over the prompts, one prompt a call as the pipeline encodes a request's prompt: `encode` against
`encode_weighted` with all weights 1 (which returns `encode`'s result) and with the colour words weighed,
and, once, the first weighted call on a fresh encoder, which also encodes the empty prompt (cached after).

Usage: python benchmarks/bench_prompt_weights.py [--model default] [--prompts 40] [--images 2]
       [--weights 1.3,1.6] [--control 0.7] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pictor
from pictor.data.shapes_render import COLORS, PLURALS, SHAPES
from pictor.eval.shapes import load_prompts, score_images
from pictor.pipeline import GenerationRequest
from pictor.prompt_weights import parse_weights

COLOUR_WORDS = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
# "circles" as well as "circle"; the word boundaries keep "circle" from matching inside "circles"
SHAPE_WORDS = re.compile(r"\b(" + "|".join([*PLURALS.values(), *SHAPES]) + r")\b")


def wrap(prompt: str, words: re.Pattern[str], weight: float) -> tuple[str, int]:
    """`prompt` with each of `words` written ``(word:weight)``, and how many were wrapped."""
    return words.subn(lambda m: f"({m.group(1)}:{weight:g})", prompt)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--weights", default="1.3,1.6", help="weights for the colour and the shape words")
    parser.add_argument("--control", default="0.7", help="colour-word weights below 1 ('' for none)")
    parser.add_argument("--encode-rounds", type=int, default=5, help="rounds of the text-encoder timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    controls = [float(w) for w in args.control.split(",") if w.strip()]
    pipe = pictor.load(args.model, device="cpu")
    every = load_prompts()
    specs = every[:: max(1, len(every) // args.prompts)][: args.prompts]  # spread over all six tags
    prompts = [spec["prompt"] for spec in specs]

    def run(texts: list[str], weighted: bool) -> tuple[list[list[np.ndarray]], float, float]:
        """The images, and seconds per image: the mean, and the median over requests (which a shared
        machine's busy spells move less)."""
        images, times = [], []
        for i, text in enumerate(texts):
            request = GenerationRequest(
                text, seed=1000 + i * args.images, num_images=args.images, prompt_weights=weighted
            )
            start = time.perf_counter()
            made = pipe.generate(request)
            times.append((time.perf_counter() - start) / args.images)
            images.append([np.asarray(g.image) for g in made])
        return images, statistics.mean(times), statistics.median(times)

    def pixel_diff(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> tuple[float, int]:
        """Mean absolute difference over all pixels and channels (0-255), and the largest one."""
        pairs = [
            (x.astype(np.int16), y.astype(np.int16))
            for xs, ys in zip(a, b, strict=True)
            for x, y in zip(xs, ys, strict=True)
        ]
        mean = float(np.mean([np.abs(x - y).mean() for x, y in pairs]))
        return mean, int(max(np.abs(x - y).max() for x, y in pairs))

    rows: dict[str, Any] = {}
    plain_images: list[list[np.ndarray]] = []
    plain_correct: list[bool] = []

    def record(name: str, texts: list[str], weighted: bool, wrapped: dict[str, int] | None = None) -> None:
        nonlocal plain_images, plain_correct
        images, seconds, median = run(texts, weighted)
        report = score_images(specs, images)
        correct = [c for p in report["per_prompt"] for c in p["correct"]]
        row: dict[str, Any] = {
            "prompt_weights": weighted,
            "example_prompt": texts[-1],
            "overall": round(report["overall"], 3),
            "per_tag": {k: round(v, 3) for k, v in report["per_tag"].items()},
            "correct_images": f"{sum(correct)}/{len(correct)}",
            "seconds_per_image": round(seconds, 3),
            "median_seconds_per_image": round(median, 3),
        }
        if wrapped is not None:
            row |= wrapped
        if not plain_images:
            plain_images, plain_correct = images, correct
            row["scorer_revision"] = report["scorer_revision"]
        else:
            mean, largest = pixel_diff(plain_images, images)
            row["mean_abs_pixel_diff_to_plain"] = round(mean, 3)
            row["max_abs_pixel_diff_to_plain"] = largest
            row["gained_vs_plain"] = sum(c and not p for c, p in zip(correct, plain_correct, strict=True))
            row["lost_vs_plain"] = sum(p and not c for c, p in zip(correct, plain_correct, strict=True))
        rows[name] = row
        print(name, json.dumps(row), flush=True)

    record("plain", prompts, weighted=False)
    record("weights on, no brackets", prompts, weighted=True)
    wrapped_counts: dict[str, Any] = {}
    for kind, words in (("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS)):
        for w in weights:
            done = [wrap(p, words, w) for p in prompts]
            info = {
                "prompts_wrapped": sum(n > 0 for _, n in done),
                "words_wrapped": sum(n for _, n in done),
            }
            wrapped_counts[kind] = info
            record(f"{kind} words x{w:g}", [t for t, _ in done], weighted=True, wrapped=info)
    for w in controls:
        done = [wrap(p, COLOUR_WORDS, w) for p in prompts]
        info = {"prompts_wrapped": sum(n > 0 for _, n in done), "words_wrapped": sum(n for _, n in done)}
        record(f"colour words x{w:g} (control, below 1)", [t for t, _ in done], weighted=True, wrapped=info)

    encoder = pipe.text_encoder
    colour_texts = [wrap(p, COLOUR_WORDS, weights[0] if weights else 1.3)[0] for p in prompts]
    plain_pieces = [parse_weights(p).pieces for p in prompts]
    colour_pieces = [parse_weights(t).pieces for t in colour_texts]
    encoder.__dict__.pop("_empty_cache", None)  # a fresh encoder: the first weighted call encodes ""
    start = time.perf_counter()
    encoder.encode_weighted([colour_pieces[0]])
    first_weighted_ms = (time.perf_counter() - start) * 1000

    def per_prompt_ms(call: Any, items: list[Any]) -> float:
        """Median over rounds of the mean ms per prompt, one prompt a call (after one warm-up round)."""
        means = []
        for _ in range(args.encode_rounds + 1):
            start = time.perf_counter()
            for item in items:
                call([item])
            means.append((time.perf_counter() - start) * 1000 / len(items))
        return statistics.median(means[1:])

    encoding = {
        "encode_ms_per_prompt": round(per_prompt_ms(encoder.encode, prompts), 3),
        "encode_weighted_all_1_ms_per_prompt": round(per_prompt_ms(encoder.encode_weighted, plain_pieces), 3),
        "encode_weighted_colour_ms_per_prompt": round(
            per_prompt_ms(encoder.encode_weighted, colour_pieces), 3
        ),
        "first_weighted_call_ms": round(first_weighted_ms, 3),
        "rounds": args.encode_rounds,
        "note": "one prompt a call; median of the rounds' means; the first weighted call on a fresh encoder "
        "also encodes the empty prompt, which is then cached per device",
    }
    print("text encoding", json.dumps(encoding), flush=True)

    report = {
        "model": args.model,
        "prompts": len(specs),
        "images_per_prompt": args.images,
        "images_per_run": len(specs) * args.images,
        "seeds": f"1000 + prompt index * {args.images} (the same in every run)",
        "steps": pipe.defaults["steps"],
        "threads": args.threads,
        "wrapped": wrapped_counts,
        "runs": rows,
        "text_encoding": encoding,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
