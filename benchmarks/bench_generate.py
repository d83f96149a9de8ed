"""End-to-end seconds per image for `pictor generate` (64x64, 20 steps by default), on this machine.

Two numbers, both printed as JSON:
- `cli_wall_s`: the whole console command, start-up and model load included, as a user sees it;
- `per_image_s`: the steady-state Python API cost of one image (after a warm-up), split into text
  encoding + sampling + decoding.

Usage: python benchmarks/bench_generate.py [--model default] [--steps 20] [--size 64x64] [-n 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("-n", type=int, default=4, help="images per timed API call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))

    import pictor
    from pictor.pipeline import GenerationRequest

    t0 = time.perf_counter()
    pipe = pictor.load(args.model, device="cpu")
    load_s = time.perf_counter() - t0

    def request(seed: int, n: int) -> GenerationRequest:
        return GenerationRequest(
            "a red circle left of a blue square",
            width=width,
            height=height,
            steps=args.steps,
            seed=seed,
            num_images=n,
        )

    pipe.generate(request(0, 1))  # warm-up: first-call allocations and kernel selection
    per_image, per_batch_image = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        pipe.generate(request(100 + r, 1))
        per_image.append(time.perf_counter() - t)
        t = time.perf_counter()
        pipe.generate(request(200 + r, args.n))
        per_batch_image.append((time.perf_counter() - t) / args.n)

    cli = shutil.which("pictor")
    cli_wall = None
    if cli:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            subprocess.run(
                [
                    cli,
                    "generate",
                    "a red circle",
                    "--model",
                    args.model,
                    "--steps",
                    str(args.steps),
                    "--size",
                    args.size,
                    "--seed",
                    "1",
                    "-o",
                    out,
                ],
                check=True,
                capture_output=True,
            )
            cli_wall = time.perf_counter() - t

    print(
        json.dumps(
            {
                "model": pipe.name,
                "trained": pipe.config.trained,
                "size": args.size,
                "steps": args.steps,
                "guidance_mode": pipe.guidance_mode,
                "cfg_batched": pipe.guidance_mode == "cfg",
                "threads": args.threads,
                "torch": torch.__version__,
                "load_s": round(load_s, 3),
                "per_image_s_batch1": round(statistics.median(per_image), 4),
                f"per_image_s_batch{args.n}": round(statistics.median(per_batch_image), 4),
                "cli_wall_s_one_image": None if cli_wall is None else round(cli_wall, 3),
                "python": sys.version.split()[0],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
