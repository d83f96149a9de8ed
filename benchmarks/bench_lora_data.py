"""LoRA training on an image folder, four ways side by side: square crops, aspect-ratio buckets
(`--buckets`), latents encoded once (`--cache-latents`), and both. Prints one JSON object.

The folder is made here: `--images` pictures of random sizes and aspect ratios (1:2 to 2:1, 0.5 to 2
times the training area), each a few soft coloured discs on a gradient, captioned with comma-separated
tags. Each setting runs the real training loop (`pictor.train.loop.Trainer`) on the same base (the shipped
default model unless `--base`), in a fresh run folder, with checkpoints, samples and evals off. Reported:
the seconds to build the trainer (for `--cache-latents` that includes encoding every image, both ways
round with --flip-aug), the median seconds per step after `--warmup` steps (from the run's log), and the
buckets the batches used. A cached run's second start (the same cache folder) is timed too: it encodes
nothing.

    python benchmarks/bench_lora_data.py [--base BUNDLE] [--images 48] [--image-size 64]
        [--batch-size 8] [--steps 8] [--warmup 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pictor.train import distributed
from pictor.train.config import TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import Trainer

SETTINGS = {
    "square crops": {},
    "buckets": {"buckets": True},
    "cache latents": {"cache_latents": True},
    "buckets + cache latents": {"buckets": True, "cache_latents": True},
}


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
    for i in range(n):
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        area = size * size * float(rng.uniform(0.5, 2.0))
        w, h = max(16, round((area * ratio) ** 0.5)), max(16, round((area / ratio) ** 0.5))
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([xx / w * 80 + 40, yy / h * 80 + 40, np.full((h, w), 90.0)], -1)
        names = list(rng.choice(list(colours), size=int(rng.integers(1, 4)), replace=False))
        for name in names:
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * min(w, h)
            inside = np.clip(r - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]
            image = image * (1 - inside) + np.array(colours[name]) * inside
        Image.fromarray(image.astype(np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(", ".join(["zorblax", *(f"{c} disc" for c in names)]))


def run(cfg: TrainConfig, info: distributed.DistInfo, warmup: int) -> dict[str, Any]:
    start = time.perf_counter()
    trainer = Trainer(cfg.resolve(), info)
    built = time.perf_counter() - start
    shapes: set[tuple[int, int]] = set()
    loss = trainer.stage.loss

    factor = trainer.stage.ae.params.downsample_factor

    def recording_loss(fwd: Any, batch: Any) -> Any:
        if batch.images is not None:
            shapes.add(tuple(batch.images.shape[2:]))
        else:  # --cache-latents: the batch carries its latents, not its pixels
            shapes.add(tuple(side * factor for side in batch.draws["latent"].shape[2:]))
        return loss(fwd, batch)

    trainer.stage.loss = recording_loss  # type: ignore[method-assign]
    trainer.run()
    log = read_jsonl(Path(cfg.out) / "log.jsonl")[warmup:]
    step_s = statistics.median(cfg.global_batch() / r["images_per_s"] for r in log)
    return {
        "build_s": round(built, 3),
        "step_s_median": round(step_s, 4),
        "images_per_s": round(cfg.global_batch() / step_s, 2),
        "buckets_seen": sorted(f"{w}x{h}" for h, w in shapes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(Path(__file__).parents[1] / "src/pictor/weights/default"))
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    info = distributed.DistInfo(device=device)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pictures"
        data.mkdir()
        make_folder(data, args.images, args.image_size)
        common = {
            "stage": "lora",
            "base": args.base,
            "data": str(data),
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "max_steps": args.warmup + args.steps,
            "warmup_steps": 0,
            "flip_aug": True,
            "save_every": 0,
            "sample_every": 0,
            "eval_every": 0,
            "progress": False,
            "device": args.device,
        }
        # One untimed run first: loading the text encoder and first-call costs would go to the first setting.
        run(TrainConfig(out=str(Path(tmp) / "warm-up"), **{**common, "max_steps": 1}), info, 0)  # type: ignore[arg-type]
        for name, settings in SETTINGS.items():
            out = Path(tmp) / name.replace(" ", "-").replace("+", "and")
            results[name] = run(TrainConfig(out=str(out), **{**common, **settings}), info, args.warmup)  # type: ignore[arg-type]
            if settings.get("cache_latents"):
                again = TrainConfig(
                    out=str(out) + "-again",
                    latent_cache_dir=str(out / "latent-cache"),
                    **{**common, **settings},  # type: ignore[arg-type]
                )
                results[name]["second_start_build_s"] = run(again, info, args.warmup)["build_s"]
    print(
        json.dumps(
            {
                "benchmark": "lora training on an image folder",
                "base": args.base,
                "images": args.images,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "steps_timed": args.steps,
                "flip_aug": True,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
