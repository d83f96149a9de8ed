"""What the shapes benchmarks print: a set of images scored by the exact shapes scorer as one row of the
result, and the result printed as JSON and written (shared by bench_regions.py and bench_composable.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pictor.eval.shapes import score_images


def scored_row(
    specs: list[dict], images: list[list[np.ndarray]], seconds: float, **more: Any
) -> dict[str, Any]:
    """One row: overall and per-tag adherence, the scorer's revision, `more` (e.g. boxes held), the image
    count and the seconds the images took."""
    report = score_images(specs, images)
    return {
        "overall": round(report["overall"], 4),
        "scorer_revision": report["scorer_revision"],
        "per_tag": {t: round(v, 4) for t, v in report["per_tag"].items()},
        **more,
        "images": report["n_images"],
        "seconds": round(seconds, 1),
    }


def emit(result: dict[str, Any], out: str | None) -> None:
    """The result as JSON on stdout and, with `out`, in that file."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def run_header(pipe: Any, prompts: int, k: int, seed: int, **more: Any) -> dict[str, Any]:
    """What a result says first: the model (name, hash and `more` of it), the prompts and images each, the
    seed."""
    return {
        "model": {"name": pipe.name, "hash": pipe.hash, **more},
        "prompts": prompts,
        "images_per_prompt": k,
        "seed": seed,
    }
