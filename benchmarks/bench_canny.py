"""Canny edge maps for FLUX.1 Canny control pictures: pictor's numpy Canny (`pictor.edge_maps`) against
OpenCV's `cv2.Canny` (the reference BFL's CannyImageEncoder calls), in one run, on the same pictures.

For each size, an RGB picture like a photo's (smooth colour fields with hard-edged shapes and a little
noise, from a fixed seed) goes through BFL's float round trip (`bfl_canny_input`) and then both detectors
at BFL's thresholds 50 and 200: seconds per call (median of --repeats after one warm-up, one thread for
OpenCV as for numpy), peak extra memory of pictor's call (tracemalloc: numpy's allocations), the share of
edge pixels, and whether the two maps are equal (they must be, bit for bit).

Usage: python benchmarks/bench_canny.py [--sizes 512,1024,2048] [--repeats 5] [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pictor.control_images import bfl_canny_input
from pictor.edge_maps import FLUX_CANNY_HIGH, FLUX_CANNY_LOW, canny_edges


def photo_like(size: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields, a few hard-edged shapes and sensor-like noise: edges of several strengths."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 16, size // 4, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    noisy = np.asarray(im, dtype=np.int16) + rng.integers(-6, 7, (size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(size: int, repeats: int) -> dict[str, Any]:
    import cv2

    cv2.setNumThreads(1)
    picture = bfl_canny_input(photo_like(size))
    ours = canny_edges(picture, FLUX_CANNY_LOW, FLUX_CANNY_HIGH)
    theirs = cv2.Canny(picture, FLUX_CANNY_LOW, FLUX_CANNY_HIGH)
    tracemalloc.start()
    canny_edges(picture, FLUX_CANNY_LOW, FLUX_CANNY_HIGH)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "size": f"{size}x{size}",
        "equal": bool(np.array_equal(ours, theirs)),
        "edge_share": round(float((ours > 0).mean()), 4),
        "pictor_s": round(timed(lambda: canny_edges(picture, FLUX_CANNY_LOW, FLUX_CANNY_HIGH), repeats), 4),
        "opencv_s": round(timed(lambda: cv2.Canny(picture, FLUX_CANNY_LOW, FLUX_CANNY_HIGH), repeats), 4),
        "pictor_peak_mb": round(peak / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    rows = [run(int(s), args.repeats) for s in args.sizes.split(",")]
    for row in rows:
        row["pictor_over_opencv"] = round(row["pictor_s"] / row["opencv_s"], 1)
    result = {"benchmark": "canny", "thresholds": [FLUX_CANNY_LOW, FLUX_CANNY_HIGH], "runs": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
