"""What the generating commands show and write: a progress bar on stderr, the -o folder made before any
work, and the images saved as numbered PNGs with their provenance (and the first-block cache's summary).
Separate from :mod:`pictor.cli_pipeline`: presentation and files, not the pipeline."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any


def progress_bar(total_hint: str):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(step: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=total_hint, unit="step", file=sys.stderr, leave=False)
        b = bar["bar"]
        b.update(step - b.n)
        if step >= total:
            b.close()

    return update


def _next_index(out: Path) -> int:
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"^(\d{5})-", p.name))]
    return max(nums, default=-1) + 1


def output_folder(out_dir: str) -> None:
    """Make -o's folder before any work, so a path that cannot be one fails in a second, not after the
    sampling it would have held."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out_dir}: this is a file; give a folder for the images")
    out.mkdir(parents=True, exist_ok=True)


def save_images(images: list[Any], out_dir: str, labels: list[str] | None = None) -> list[Path]:
    """NNNNN-SEED.png, or NNNNN-LABEL-SEED.png with labels (e.g. best-of ranks)."""
    from pictor.provenance import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = _next_index(out)
    tags = [f"{label}-" for label in labels] if labels else [""] * len(images)
    paths = [
        save_png(g.image, g.record, out / f"{start + k:05d}-{tag}{g.seed}.png")
        for k, (g, tag) in enumerate(zip(images, tags, strict=True))
    ]
    _cache_summary(images)
    return paths


def _cache_summary(images: list[Any]) -> None:
    """How much the first-block cache skipped, so a threshold can be tuned (stderr: stdout lists files)."""
    counts = [g.record["cache_passes"] for g in images if "cache_passes" in g.record]
    total = sum(c["total"] for c in counts)
    if total:
        full = sum(c["full"] for c in counts)
        threshold = images[0].record.get("cache_threshold")
        print(
            f"first-block cache {threshold:g}: {full} of {total} transformer passes ran every block "
            f"({full / total:.0%})",
            file=sys.stderr,
        )
