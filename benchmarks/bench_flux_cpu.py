"""pictor Flux vs diffusers FluxTransformer2DModel: CPU fp32 seconds per forward at identical weights.

Prints one JSON object. Mid-size config: hidden 512, 8 heads (head dim 64, axes [16, 24, 24]), 4 double + 8
single blocks, in/out 64, context_in_dim 512 (FLUX.1 uses 4096; only txt_in's width changes), vec_in_dim 768,
guidance_embed; batch 2, 32x32 packed image tokens (a 64x64 latent) + 64 text tokens.

Timing: both models are timed in alternating order within each round (so background load hits both
alike); we report the median and the minimum over rounds after warm-up, and the median of the per-round
ratios. ``--compile`` additionally times ``Flux.compile()`` (regional torch.compile, inductor); its compile
time is reported separately and never counted in the per-forward numbers.

    python benchmarks/bench_flux_cpu.py [--rounds 9] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flux_reference import build_reference, reference_forward

from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids

MID = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=512,
    hidden_size=512,
    mlp_ratio=4.0,
    num_heads=8,
    depth=4,
    depth_single_blocks=8,
    axes_dim=[16, 24, 24],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random values in every parameter (norm gains around 1), so no zero-init path is being timed."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen).to(p)
        p.copy_(1 + 0.1 * noise if name.endswith(".scale") else std * noise)


def time_interleaved(fns: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    abs_err = (out - ref).abs().max().item()
    return {"max_abs_err": abs_err, "max_rel_err": abs_err / ref.abs().max().item()}


def summary(ts: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(ts), "min_s": min(ts)}


def compare(times: dict[str, list[float]]) -> dict[str, object]:
    """Speedup diffusers/ours three ways; the paired one (same round, same background load) is steadiest."""
    ours, ref = times["ours"], times["diffusers"]
    return {
        "ours": summary(ours),
        "diffusers": summary(ref),
        "speedup_median": statistics.median(ref) / statistics.median(ours),
        "speedup_min": min(ref) / min(ours),
        "speedup_paired_median": statistics.median(r / o for r, o in zip(ref, ours, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time Flux.compile() (inductor)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    params = MID
    ours = Flux(params).eval().requires_grad_(False)
    randomize_(ours)
    ref = build_reference(params, {k: v.clone() for k, v in ours.state_dict().items()}).requires_grad_(False)

    batch, lat_h, lat_w, n_txt = 2, 64, 64, 64
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(batch, (lat_h // 2) * (lat_w // 2), params.in_channels, generator=gen)
    img_ids = make_img_ids(batch, lat_h, lat_w)
    txt = torch.randn(batch, n_txt, params.context_in_dim, generator=gen)
    txt_ids = make_txt_ids(batch, n_txt)
    t = torch.rand(batch, generator=gen)
    y = torch.randn(batch, params.vec_in_dim, generator=gen)
    guidance = torch.full((batch,), 3.5)
    inputs = (img, img_ids, txt, txt_ids, t, y, guidance)

    def run_ours() -> torch.Tensor:
        return ours(*inputs)

    def run_ref() -> torch.Tensor:
        return reference_forward(ref, *inputs)

    result: dict[str, object] = {
        "config": {
            **params.to_dict(),
            "batch": batch,
            "img_tokens": img.shape[1],
            "txt_tokens": n_txt,
            "dtype": "float32",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "note": "context_in_dim 512 instead of FLUX.1's 4096 (only txt_in's input width differs)",
        },
        "torch": torch.__version__,
    }
    with torch.inference_mode():
        for _ in range(args.warmup):
            run_ours()
            run_ref()
        out_ref = run_ref()
        times = time_interleaved({"ours": run_ours, "diffusers": run_ref}, args.rounds)
        eager = {**compare(times), **errors(run_ours(), out_ref)}
        result["eager"] = eager

        if args.compile:
            ours.compile()
            t0 = time.perf_counter()
            out_c = run_ours()
            compile_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                run_ours()
            times = time_interleaved({"ours": run_ours, "diffusers": run_ref}, args.rounds)
            result["compiled"] = {"compile_s": compile_s, **compare(times), **errors(out_c, out_ref)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
