"""Peak memory of an upscale on the CPU: spandrel 0.4.2 running the whole picture at once (as its model
descriptor does) against pictor's, whole and tiled (`upscaling.run_tiled`, the path of `pictor upscale`),
same net, weights and picture, in one run.

Each measurement runs in a fresh process (so one's freed memory cannot hide another's peak): it builds the
net and the picture, notes its resident set, runs the net once under inference mode, and reports the rise of
the peak resident set (``ru_maxrss``) above that baseline, the output included, with the seconds it took.

- ``compact32``: Real-ESRGAN's SRVGGNetCompact at realesr-general-x4v3's size (64 features, 32 convolutions,
  x4), random weights;
- ``rrdb``: ESRGAN's RRDBNet at the size of the common "4x-..." files (64 features, 23 blocks, x4).

    python benchmarks/bench_upscaler_memory.py [--size 1024] [--rrdb-size 256] [--tiles 512,256,128]
        [--overlap 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _measure(model: str, size: int, tile: int | None, overlap: int) -> dict[str, Any]:
    """In this process: the peak RSS rise of one run (tile None: spandrel's net on the whole picture; a
    tile at least the picture's size: pictor's net on the whole picture, as `run_tiled` then runs it)."""
    import torch

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests"))
    from bench_upscaler import build_pair

    from pictor.upscaling import run_tiled

    torch.set_num_threads(2)
    ours, theirs = build_pair(model, torch.device("cpu"), torch.float32, seed=0)
    picture = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with torch.inference_mode():
        out = theirs(picture) if tile is None else run_tiled(ours, picture, tile, overlap)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_rise_mib": round((peak - baseline) / 1024, 1),
        "seconds": round(seconds, 2),
        "output": list(out.shape),
        "output_mib": round(out.numel() * 4 / 2**20, 1),
    }


def _run(model: str, size: int, tile: int | None, overlap: int) -> dict[str, Any]:
    args = [sys.executable, __file__, "--one", model, str(size), str(tile or 0), str(overlap)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        model, size, tile, overlap = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(_measure(model, size, tile or None, overlap)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="picture side for the compact net")
    p.add_argument("--rrdb-size", type=int, default=256, help="picture side for the RRDBNet")
    p.add_argument("--tiles", default="512,256,128", help="pictor's tile sizes")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tiles = [int(t) for t in args.tiles.split(",")]
    results: dict[str, Any] = {}
    for model, size in (("compact32", args.size), ("rrdb", args.rrdb_size)):
        entry: dict[str, Any] = {
            "picture": f"{size}x{size}",
            "spandrel_whole": _run(model, size, None, 0),
            "pictor_whole": _run(model, size, size, 0),
        }
        for tile in tiles:
            if tile < size:
                entry[f"pictor_tile_{tile}"] = _run(model, size, tile, args.overlap)
        results[model] = entry
    import torch

    text = json.dumps(
        {"overlap": args.overlap, "threads": 2, "models": results, "torch": torch.__version__}, indent=2
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
