"""Tiled autoencoder decoding, pictor's against diffusers' (`AutoencoderKL.enable_tiling`), in one run.

Two parts, printed as one JSON object (and written to --out):

- `memory`: FLUX.1's autoencoder (84M parameters, 16 latent channels) with random weights, one image of
  --size pixels decoded whole and in tiles of --tile pixels (--overlap blended), by pictor and by diffusers
  loaded with the same weights through diffusers' own LDM converter. Each decode runs in a
  fresh process, so its peak memory is its own: on CPU the highest resident set seen while it decodes
  (polled every millisecond) and how far that rose above the process's size just before; on CUDA
  `torch.cuda.max_memory_allocated` and how far it rose above the allocation before. Also the seconds, and
  how far each result is from pictor's whole decode (diffusers' whole decode is the parity check: it should
  differ by float rounding only).
- `quality`: the shipped default model's trained autoencoder on shapes-world pictures of --quality-size
  pixels, decoded whole and in tiles of --quality-tile pixels by each: PSNR of each tiled result against the
  whole decode (random weights say little about seams and colour shifts; trained ones do).

Usage: python benchmarks/bench_vae_tiling.py [--size 512] [--tile 256] [--overlap 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _ae_reference import diffusers_config
from _memory import RssSampler, rss_now
from safetensors.torch import load_file, save_file

from pictor.models.autoencoder import AutoEncoder, flux1_ae_params
from pictor.models.autoencoder_tiling import autoencoder_decode

MEMORY_RUNS = [("pictor", "whole"), ("pictor", "tiled"), ("diffusers", "whole"), ("diffusers", "tiled")]


def to_diffusers(ours: AutoEncoder) -> Any:
    """diffusers' AutoencoderKL with our weights, mapped by diffusers' own single-file converter."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = diffusers_config(ours.params)
    converted = convert_ldm_vae_checkpoint(dict(ours.state_dict()), config)
    ref = diffusers.AutoencoderKL(**config).eval()
    ref.load_state_dict(converted, strict=True)
    return ref.to(next(ours.parameters()).device)


def diffusers_decode(
    ref: Any, ae: AutoEncoder, z: torch.Tensor, tile: int | None, overlap: int
) -> torch.Tensor:
    """diffusers' decode of our scaled latent (its decode takes the unscaled one, as its pipelines give)."""
    if tile is None:
        ref.disable_tiling()
    else:
        f = ae.params.downsample_factor
        ref.enable_tiling()
        ref.tile_sample_min_size = tile
        ref.tile_latent_min_size = tile // f
        ref.tile_overlap_factor = overlap / tile
    return ref.decode(z / ae.scale_factor + ae.shift_factor).sample


def worker(args: argparse.Namespace) -> None:
    """One decode in this fresh process; prints its numbers as JSON and saves the image for comparison."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ae = AutoEncoder(flux1_ae_params()).eval().to(device)
    f = ae.params.downsample_factor
    z = torch.randn(
        1, ae.params.z_channels, args.size // f, args.size // f, generator=torch.Generator().manual_seed(1)
    )
    z = z.to(device)
    ref = to_diffusers(ae) if args.impl == "diffusers" else None
    if ref is not None:
        del ae.decoder  # only diffusers' copy decodes: do not count two models
    tile = None if args.mode == "whole" else args.tile
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_now()
    with torch.inference_mode(), RssSampler() as rss:
        t = time.perf_counter()
        if ref is None:
            out = autoencoder_decode(ae, z, tile, args.overlap)
        else:
            out = diffusers_decode(ref, ae, z, tile, args.overlap)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    if device.type == "cuda":
        peak, rise = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - before
    else:
        peak, rise = rss.peak, rss.peak - before
    save_file({"image": out.float().cpu().contiguous()}, args.save)
    print(
        json.dumps(
            {"seconds": round(seconds, 2), "peak_gb": round(peak / 1e9, 3), "rise_gb": round(rise / 1e9, 3)}
        )
    )


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean()) / 4  # images in [-1, 1] -> [0, 1]
    return round(-10 * math.log10(mse), 2) if mse > 0 else math.inf


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    images: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl, mode in MEMORY_RUNS:
            name = f"{impl}_{mode}"
            save = str(Path(tmp) / f"{name}.safetensors")
            cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--mode", mode, "--save", save]
            cmd += ["--size", str(args.size), "--tile", str(args.tile), "--overlap", str(args.overlap)]
            cmd += ["--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
            images[name] = load_file(save)["image"]
            print(f"{name}: {runs[name]}", file=sys.stderr)
    base = images["pictor_whole"]
    for name, run in runs.items():
        diff = (images[name] - base).abs()
        run["max_abs_diff_vs_pictor_whole"] = float(f"{float(diff.max()):.3g}")
        run["psnr_vs_pictor_whole"] = _psnr(images[name], base)
    return runs


def quality_part(args: argparse.Namespace) -> dict[str, Any]:
    """Tiled vs whole on the shipped, trained autoencoder, pictor's tiling and diffusers'."""
    import numpy as np

    import pictor
    from pictor.data.shapes import ShapesDataset

    ae = pictor.load("default", device="cpu").autoencoder.float().eval()
    ref = to_diffusers(ae)
    ds = ShapesDataset(seed=0, size=args.quality_size)
    pictures = np.stack([ds[i][0] for i in range(args.quality_images)])
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
    tile, overlap = args.quality_tile, args.quality_tile // 4
    with torch.inference_mode():
        z = ae.encode(x)
        whole = ae.decode(z)
        ours = autoencoder_decode(ae, z, tile, overlap)
        theirs = diffusers_decode(ref, ae, z, tile, overlap)
        theirs_whole = diffusers_decode(ref, ae, z, None, overlap)
    return {
        "pictures": f"{args.quality_images} shapes-world pictures, {args.quality_size}x{args.quality_size}",
        "tile": tile,
        "overlap": overlap,
        "pictor_tiled_psnr_vs_whole": _psnr(ours, whole),
        "diffusers_tiled_psnr_vs_whole": _psnr(theirs, whole),
        "diffusers_whole_max_abs_diff": float(f"{float((theirs_whole - whole).abs().max()):.3g}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (memory part)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels (memory part)")
    parser.add_argument("--overlap", type=int, default=64, help="pixels tiles blend over")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality-size", type=int, default=256)
    parser.add_argument("--quality-tile", type=int, default=128)
    parser.add_argument("--quality-images", type=int, default=8)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["pictor", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=[m for _, m in MEMORY_RUNS], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    report = {
        "memory": {
            "model": "FLUX.1 autoencoder layout, random weights, fp32",
            "device": args.device,
            "size": args.size,
            "tile": args.tile,
            "overlap": args.overlap,
            "runs": memory_part(args),
        },
        "quality": quality_part(args),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
