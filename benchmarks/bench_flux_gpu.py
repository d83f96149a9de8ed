"""pictor Flux vs diffusers' FluxTransformer2DModel at FLUX.1-dev size on a GPU: ms/step, TFLOP/s, memory.

Prints one JSON object (also on failure: ``{"error": ...}``; without CUDA it exits with status 0 and
``"skipped": true``). Default: FLUX.1-dev architecture (hidden 3072, 24 heads, 19 double + 38 single
blocks, in 64, context 4096, vec 768, guidance_embed, axes [16, 56, 56], theta 10000) with random bf16
weights created directly on the GPU (built on the meta device, then allocated in bf16 on CUDA: no 12B
parameters ever exist on the CPU or in float32), a 1024x1024 image (128x128 latent -> 4096 packed tokens) and
512 text tokens, batch 1.

Procedure: build ours, time it, keep its output; convert its weights to diffusers' layout (q/k/v splits are
copies), free ours, load the reference strict with ``assign=True``, time it, compare outputs. Timing uses CUDA
events around each forward after warm-up; we report the median. Peak memory is
``torch.cuda.max_memory_allocated`` during each model's timed forwards (weights included).

FLOPs (counted analytically, multiply-add = 2 FLOPs; B batch, N image tokens, L text tokens, S = N + L,
h hidden, m = mlp_ratio * h, H heads, D head dim):
    linear layers: 2 * rows * in * out for every nn.Linear application, i.e. per double block
        2B(N + L) * (3h*h + h*h + h*m + m*h)  plus modulation 2 * 2B * h * 6h,
    per single block 2B*S * (h*(3h + m) + (h + m)*h)  plus modulation 2B * h * 3h,
    plus img_in 2BN*in*h, txt_in 2BL*ctx*h, the time/vector/guidance MLPs and the final layer;
    attention: 4 * B * H * S^2 * D per block (QK^T and PV; softmax/RoPE/norm flops not counted).
Achieved TFLOP/s = that count / median seconds per forward.

Test the code path without a GPU:  python benchmarks/bench_flux_gpu.py --config tiny --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flux_reference import build_reference, reference_forward

from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids

CONFIGS: dict[str, dict[str, Any]] = {
    "flux-dev": {
        "params": dict(
            in_channels=64,
            out_channels=64,
            vec_in_dim=768,
            context_in_dim=4096,
            hidden_size=3072,
            mlp_ratio=4.0,
            num_heads=24,
            depth=19,
            depth_single_blocks=38,
            axes_dim=[16, 56, 56],
            theta=10_000,
            qkv_bias=True,
            guidance_embed=True,
        ),
        "image_size": 1024,  # pixels; /8 autoencoder -> 128 latent -> /2 packing -> 64x64 = 4096 tokens
        "txt_tokens": 512,
    },
    "tiny": {
        "params": dict(
            in_channels=64,
            out_channels=64,
            vec_in_dim=32,
            context_in_dim=48,
            hidden_size=64,
            mlp_ratio=4.0,
            num_heads=4,
            depth=2,
            depth_single_blocks=3,
            axes_dim=[4, 6, 6],
            theta=10_000,
            qkv_bias=True,
            guidance_embed=True,
        ),
        "image_size": 128,  # 16x16 latent -> 64 tokens
        "txt_tokens": 16,
    },
}


def count_flops(p: FluxParams, batch: int, n_img: int, n_txt: int) -> dict[str, float]:
    """Analytic forward FLOPs (see the module docstring)."""
    h, m, b = p.hidden_size, int(p.hidden_size * p.mlp_ratio), batch
    s = n_img + n_txt
    lin = 2 * b * n_img * p.in_channels * h + 2 * b * n_txt * p.context_in_dim * h
    embed_mlps = [(256, h), (p.vec_in_dim, h)] + ([(256, h)] if p.guidance_embed else [])
    lin += sum(2 * b * (i * h + h * h) for i, _ in embed_mlps)
    per_double = 2 * b * s * (3 * h * h + h * h + h * m + m * h) + 2 * 2 * b * h * 6 * h
    per_single = 2 * b * s * (h * (3 * h + m) + (h + m) * h) + 2 * b * h * 3 * h
    lin += p.depth * per_double + p.depth_single_blocks * per_single
    lin += 2 * b * n_img * h * p.out_channels + 2 * b * h * 2 * h
    attn = (p.depth + p.depth_single_blocks) * 4 * b * p.num_heads * s * s * p.head_dim
    return {"linear": float(lin), "attention": float(attn), "total": float(lin + attn)}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def build_ours(params: FluxParams, device: torch.device, dtype: torch.dtype, seed: int) -> Flux:
    """Flux with random weights allocated directly on ``device`` in ``dtype``."""
    with default_dtype(dtype), torch.device("meta"):
        model = Flux(params)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".scale"):  # RMSNorm gains near 1
            p.normal_(1.0, 0.05, generator=gen)
        elif p.ndim == 2:
            # std 0.5/sqrt(fan_in): each layer shrinks its input a little, so 57 blocks stay finite in bf16
            p.normal_(0.0, 0.5 / p.shape[1] ** 0.5, generator=gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def make_inputs(
    params: FluxParams, batch: int, image_size: int, n_txt: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    if image_size % 16:
        raise ValueError(
            f"image size must be a multiple of 16 (8x autoencoder, 2x2 packing), got {image_size}"
        )
    lat = image_size // 8
    gen = torch.Generator(device=device).manual_seed(1)
    n_img = (lat // 2) ** 2
    return {
        "img": torch.randn(batch, n_img, params.in_channels, generator=gen, device=device, dtype=dtype),
        "img_ids": make_img_ids(batch, lat, lat, device=device),
        "txt": torch.randn(batch, n_txt, params.context_in_dim, generator=gen, device=device, dtype=dtype),
        "txt_ids": make_txt_ids(batch, n_txt, device=device),
        # t*1000 and guidance*1000 exact in bf16 (diffusers scales them in the model dtype, we in float32)
        "timesteps": torch.full((batch,), 0.5, device=device),
        "y": torch.randn(batch, params.vec_in_dim, generator=gen, device=device, dtype=dtype),
        "guidance": torch.full((batch,), 4.0, device=device),
    }


def time_forward(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int
) -> dict[str, Any]:
    """Median ms per call (CUDA events on GPU, perf_counter on CPU) and peak memory during the timed calls."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times_ms = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {"ms_median": statistics.median(times_ms), "ms_min": min(times_ms)}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def time_ours(
    ours: Flux, inputs: dict[str, torch.Tensor], flops: dict[str, float], device: torch.device, args: Any
) -> dict[str, Any]:
    """Eager timing, then (``--compile``) compile time and compiled timing; the model stays usable."""
    out: dict[str, Any] = {}
    timing = time_forward(lambda: ours(**inputs), device, args.warmup, args.iters)
    timing["tflops"] = flops["total"] / (timing["ms_median"] * 1e-3) / 1e12
    out["ours"] = timing
    if args.compile:
        ours.compile()
        t0 = time.perf_counter()
        ours(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compiled: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
        compiled.update(time_forward(lambda: ours(**inputs), device, args.warmup, args.iters))
        compiled["tflops"] = flops["total"] / (compiled["ms_median"] * 1e-3) / 1e12
        out["ours_compiled"] = compiled
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {
            "skipped": True,
            "error": f"CUDA is not available on this machine (torch {torch.__version__})",
        }
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = CONFIGS[args.config]
    params = FluxParams(**cfg["params"])
    torch.backends.cuda.matmul.allow_tf32 = True  # only affects fp32 runs; both models alike

    inputs = make_inputs(params, args.batch, cfg["image_size"], cfg["txt_tokens"], device, dtype)
    n_img, n_txt = inputs["img"].shape[1], inputs["txt"].shape[1]
    flops = count_flops(params, args.batch, n_img, n_txt)
    result: dict[str, Any] = {
        "config": {
            "name": args.config,
            **params.to_dict(),
            "batch": args.batch,
            "image_size": cfg["image_size"],
            "img_tokens": n_img,
            "txt_tokens": n_txt,
            "dtype": args.dtype,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "warmup": args.warmup,
            "iters": args.iters,
        },
        "torch": torch.__version__,
        "flops_per_forward": flops,
    }

    with torch.inference_mode():
        ours = build_ours(params, device, dtype, seed=0)
        result["n_params"] = sum(p.numel() for p in ours.parameters())
        result.update(time_ours(ours, inputs, flops, device, args))
        if args.no_reference:
            return result
        # Hand the weights over (the q/k/v splits are copies), then drop ours before building the reference.
        out_ours = ours(**inputs).float()
        sd = ours.state_dict()
        del ours
        free(device)
        ref = build_reference(params, sd)
        del sd
        free(device)
        timing = time_forward(lambda: reference_forward(ref, **inputs), device, args.warmup, args.iters)
        timing["tflops"] = flops["total"] / (timing["ms_median"] * 1e-3) / 1e12
        result["diffusers"] = timing
        out_ref = reference_forward(ref, **inputs).float()

    err = (out_ours - out_ref).abs().max().item()
    scale = out_ref.abs().max().item()
    result["speedup_diffusers_over_ours"] = result["diffusers"]["ms_median"] / result["ours"]["ms_median"]
    if "ours_compiled" in result:
        result["speedup_diffusers_over_ours_compiled"] = (
            result["diffusers"]["ms_median"] / result["ours_compiled"]["ms_median"]
        )
    result["max_abs_err"] = err
    result["max_rel_err"] = err / scale if scale > 0 else float("nan")
    result["ref_max_abs"] = scale
    result["outputs_finite"] = bool(torch.isfinite(out_ours).all() and torch.isfinite(out_ref).all())
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="flux-dev")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument(
        "--compile", action="store_true", help="also time Flux.compile() (regional torch.compile)"
    )
    ap.add_argument("--no-reference", action="store_true", help="time pictor's Flux only")
    args = ap.parse_args()
    try:
        result = run(args)
    except Exception as exc:  # report, do not crash: the caller parses stdout as JSON
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            result["hint"] = "out of GPU memory: try --no-reference, or a smaller --batch"
        print(json.dumps(result, indent=2))
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
