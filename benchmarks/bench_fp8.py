"""FP8 weight storage, pictor's against diffusers' layerwise casting (`enable_layerwise_casting`), in one run.

A FLUX.1-width transformer (hidden 3072, 24 heads of 128, context 4096, guidance embedding) with --double
double and --single single blocks of FLUX.1's 19 + 38, random weights (std 0.02, like a trained FLUX.1's),
one forward of batch 1 with --tokens image tokens and 128 text tokens, four ways, each in a fresh process:

- `pictor_full` / `diffusers_full`: every weight in the compute dtype (float32 on the CPU, bf16 on CUDA);
- `pictor_fp8`: pictor's block linears stored float8 e4m3fn, cast per layer as it runs (what an FP8 bundle,
  `pictor convert dtype --dtype fp8`, loads as);
- `diffusers_fp8`: diffusers' FluxTransformer2DModel with the same weights (mapped by
  benchmarks/_flux_reference.py) and `enable_layerwise_casting(storage_dtype=float8_e4m3fn)`.

Per run: bytes held by the weights, the highest memory while the forwards run (CPU: resident set polled every
millisecond; CUDA: max_memory_allocated) and its rise over the moment before the first one (the built model),
seconds per forward (median of --repeats after one warm-up), and the output's distance from pictor_full's.
`full_size` gives the same weight bytes for the whole FLUX.1 [dev] transformer (counted on the meta device,
nothing allocated).

Usage: python benchmarks/bench_fp8.py [--double 1] [--single 2] [--tokens 1024] [--device cpu] [--out F]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _flux_reference import build_reference, reference_forward
from _fresh_runs import emit, measure, parse_args, rel_err, run_each

from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
from pictor.models.weight_storage import FP8_STORAGE, store_fp8, stored_linear_paths
from pictor.presets import get_preset

RUNS = ("pictor_full", "pictor_fp8", "diffusers_full", "diffusers_fp8")
N_TXT = 128


def flux_width_params(double: int, single: int) -> FluxParams:
    return FluxParams.from_dict(
        {**get_preset("flux-dev")["model"], "depth": double, "depth_single_blocks": single}
    )


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def random_state(params: FluxParams, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights built tensor by tensor on the meta-device model's shapes (no second full copy)."""
    with torch.device("meta"):
        shapes = Flux(params).state_dict()
    gen = torch.Generator().manual_seed(0)
    return {
        k: (
            1 + 0.1 * torch.randn(v.shape, generator=gen)
            if k.endswith(".scale")
            else 0.02 * torch.randn(v.shape, generator=gen)
        ).to(dtype)
        for k, v in shapes.items()
    }


def inputs(params: FluxParams, tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    side = round(tokens**0.5) * 2  # latent side: tokens are 2x2 patches
    gen = torch.Generator().manual_seed(1)
    return {
        "img": torch.randn(1, (side // 2) ** 2, params.in_channels, generator=gen).to(device, dtype),
        "img_ids": make_img_ids(1, side, side).to(device),
        "txt": torch.randn(1, N_TXT, params.context_in_dim, generator=gen).to(device, dtype),
        "txt_ids": make_txt_ids(1, N_TXT).to(device),
        "timesteps": torch.tensor([0.6], device=device, dtype=dtype),
        "y": torch.randn(1, params.vec_in_dim, generator=gen).to(device, dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
    }


def worker(args: argparse.Namespace) -> None:
    """One model, one way, in this fresh process; prints its numbers as JSON and saves its output."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = flux_width_params(args.double, args.single)
    sd = random_state(params, dtype)
    model: torch.nn.Module
    if args.run.startswith("pictor"):
        with torch.device("meta"):
            flux = Flux(params)
        flux.load_state_dict(sd, strict=True, assign=True)
        del sd
        if args.run == "pictor_fp8":
            store_fp8(flux, FP8_STORAGE)  # layer by layer: the wide copy of each goes as it is cast
        model = flux.to(device) if args.run == "pictor_fp8" else flux.to(device, dtype)
        forward = model
    else:
        model = build_reference(params, sd).to(device)
        del sd
        if args.run == "diffusers_fp8":
            model.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=dtype)

        def forward(**kw: Any) -> torch.Tensor:
            return reference_forward(model, **kw)

    model.eval().requires_grad_(False)
    x = inputs(params, args.tokens, device, dtype)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return forward(**x)

    measure(step, args.repeats, device, args.save, model)


def full_size() -> dict[str, Any]:
    """FLUX.1 [dev]'s transformer weights in bf16 and as pictor's FP8 bundle holds them, from the shapes."""
    with torch.device("meta"):
        flux = Flux(FluxParams.from_dict(get_preset("flux-dev")["model"]))
    total = sum(p.numel() for p in flux.parameters())
    stored = sum(flux.get_submodule(path).weight.numel() for path in stored_linear_paths(flux))
    return {
        "parameters": total,
        "stored_fp8_share": round(stored / total, 4),
        "bf16_gb": round(2 * total / 1e9, 2),
        "fp8_gb": round((stored + 2 * (total - stored)) / 1e9, 2),
        "note": "fp8_gb: block linears' weights 1 byte each, everything else bf16 (2 bytes)",
    }


def main() -> None:
    args = parse_args(__doc__, RUNS, repeats=2)
    if args.worker:
        worker(args)
        return
    runs, outs = run_each(__file__, RUNS, args)
    for run, numbers in runs.items():
        numbers["rel_err_vs_pictor_full"] = rel_err(outs[run], outs["pictor_full"])
    params = flux_width_params(args.double, args.single)
    result = {
        "config": {
            "hidden_size": params.hidden_size,
            "double_blocks": params.depth,
            "single_blocks": params.depth_single_blocks,
            "image_tokens": args.tokens,
            "text_tokens": N_TXT,
            "device": args.device,
            "threads": args.threads,
            "compute_dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
            "weights": "random, std 0.02 (norm scales around 1)",
        },
        "runs": runs,
        "full_size": full_size(),
        "torch": torch.__version__,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
