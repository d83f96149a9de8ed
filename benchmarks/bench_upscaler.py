"""ESRGAN-family upscale models: pictor's nets (`models.upscalers`, loaded by `upscaler_files`) against
spandrel 0.4.2's (the loader ComfyUI runs these files through), same weights and picture, in one run.

Models, random weights at PyTorch's default initialisation (whose outputs already lie around [-1.5, 1], so the
differences below are on the scale of real pictures):

- ``rrdb``: ESRGAN's RRDBNet at the size of the common "4x-..." files (64 features, 23 blocks, growth 32, x4);
- ``compact16`` / ``compact32``: Real-ESRGAN's SRVGGNetCompact, 64 features, x4, with 16 convolutions
  (realesr-animevideov3) and 32 (realesr-general-x4v3).

Each model's state dict is written by pictor in basicsr's names and read by both loaders
(``upscaler_from_state_dict``; spandrel's ``ESRGANArch().load`` / ``CompactArch().load``). Per model, on one
--size x --size picture: ``seconds`` per picture for each side, timed interleaved round by round (order
alternating), median of --repeats after the comparison call that warms both up; ``max_abs_diff`` between the
two sides' outputs; and pictor's tiled run (``run_tiled``, tile 64, overlap 16) with its time and
``max_abs_diff_vs_untiled``, what tiling costs in pixels: the RRDBNet's reach (hundreds of pixels) and the
compact nets' (18 and 34) exceed the overlap, so it is not zero; how far from zero depends on the weights
(random ones fade fast with distance, trained ones may not). Threads: torch's default unless --threads.
CPU times move with whatever else runs on the machine: compare the two sides of one run, not runs.

spandrel is imported through tests/spandrel_reference.py (installed with ``pip install --no-deps
spandrel==0.4.2``; its package ``__init__`` would import torchvision).

    python benchmarks/bench_upscaler.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--size 128]
        [--repeats 3] [--models rrdb,compact16,compact32] [--tile 64] [--overlap 16] [--threads N]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # spandrel_reference
from bench_controlnet import DTYPES, max_diff, sync, time_interleaved

from pictor.models.upscalers import CompactNet, CompactParams, RRDBNet, RRDBParams
from pictor.upscaler_files import upscaler_from_state_dict
from pictor.upscaling import run_tiled

import spandrel_reference as ref

MODELS: dict[str, Callable[[], nn.Module]] = {
    "rrdb": lambda: RRDBNet(RRDBParams(features=64, growth=32, blocks=23, upsamples=2)),
    "compact16": lambda: CompactNet(CompactParams(features=64, convs=16, scale=4)),
    "compact32": lambda: CompactNet(CompactParams(features=64, convs=32, scale=4)),
}


def build_pair(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[nn.Module, nn.Module]:
    """(pictor's net, spandrel's net) holding the same weights, on `device` in `dtype`."""
    torch.manual_seed(seed)
    sd = MODELS[name]().state_dict()
    _, mine = upscaler_from_state_dict(sd, f"{name} (random weights)")
    theirs = (ref.load_esrgan(sd) if name == "rrdb" else ref.load_compact(sd)).model
    return (
        mine.to(device, dtype).eval().requires_grad_(False),
        theirs.to(device, dtype).eval().requires_grad_(False),
    )


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    mine, theirs = build_pair(name, device, dtype, seed=0)
    gen = torch.Generator().manual_seed(1)
    x: Tensor = torch.rand(1, 3, args.size, args.size, generator=gen).to(device, dtype)
    ours, reference = mine(x), theirs(x)  # also the warm-up of both
    sides = {"pictor": lambda: mine(x), "spandrel": lambda: theirs(x)}
    times = time_interleaved(sides, device, warmup=0, rounds=args.repeats)
    tiled = run_tiled(mine, x, args.tile, args.overlap)
    return {
        "params": vars(mine.params),
        "scale": mine.scale,
        "seconds": {side: round(statistics.median(t), 4) for side, t in times.items()},
        "max_abs_diff": max_diff(ours, reference),
        "output_range": [round(float(ours.min()), 3), round(float(ours.max()), 3)],
        "tiled": {
            "tile": args.tile,
            "overlap": args.overlap,
            "seconds": round(
                median_seconds(lambda: run_tiled(mine, x, args.tile, args.overlap), device, args.repeats), 4
            ),
            "max_abs_diff_vs_untiled": max_diff(tiled, ours),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--size", type=int, default=128, help="picture side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")

    t0 = time.perf_counter()
    models = {name: measure(name, args, device, dtype) for name in names}
    result = {
        "settings": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype,
            "size": args.size,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "total_s": round(time.perf_counter() - t0, 1),
        },
        "models": models,
        "torch": torch.__version__,
        "spandrel": ref.VERSION,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
