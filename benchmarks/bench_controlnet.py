"""FLUX.1 ControlNet step cost: pictor's FluxControlNet + Flux against diffusers' FluxControlNetModel +
FluxTransformer2DModel, same weights and inputs, in one run.

Per denoising step (one forward at one t, batch --batch, distilled guidance: one call per step as FLUX.1-dev
runs), timed interleaved round by round (order alternating, so background load hits every variant alike),
median over --rounds after a warm-up (the velocity comparison's calls, then --warmup more rounds):

- ``transformer``: pictor's ``Flux.forward`` alone (no ControlNet), and diffusers' transformer alone;
- per ControlNet kind, ``pictor``: ``FluxControlNet.forward`` then ``Flux.forward(controlnet=...)``;
  ``diffusers``: ``FluxControlNetModel`` then ``FluxTransformer2DModel(controlnet_block_samples=...,
  controlnet_single_block_samples=...)``, as ``FluxControlNetPipeline`` calls them; and each side's ControlNet
  alone, for its share of the step.

Weights: the transformer is built as pictor's Flux and mapped to diffusers by benchmarks/_flux_reference.py;
each ControlNet is built as diffusers' FluxControlNetModel and mapped to pictor by pictor's own loader
(``diffusers_controlnet_keys``). Every module is built on the meta device, allocated on --device in --dtype
and filled with random values (zero-initialised layers too, so residuals are not zero), std 0.5/sqrt(fan_in)
so that 57 blocks plus residuals stay finite in bf16. The control input is random packed latents (what a
control picture's autoencoder encoding is; that encoding runs once per image, not per step, so it is left
out). ``max_abs_diff`` compares the velocities of the two sides (so equal work is timed);
``control_effect`` is how far the ControlNet moves pictor's velocity (so the residuals are not negligible).

Sizes: ``small`` (default, about a minute on 2 CPU cores in float32): width 256 (4 heads of 64), 4 double + 8
single blocks, ControlNets 2 + 4 ("canny") and 2 + 0 ("union2"), 512x512 pixels (a 64x64 latent of 16
channels -> 1024 tokens) and 128 text tokens. ``flux``: FLUX.1-dev's transformer (3072 wide, 24 heads,
19 + 38 blocks, context 4096, pooled 768, guidance embedding), an InstantX-Canny-like ControlNet (5 double +
10 single) and a Union-Pro-2.0-like one (6 double + 0 single, no mode token), 1024x1024 (4096 tokens) and
512 text tokens; meant for ``--device cuda --dtype bf16``. ``--kinds`` picks the ControlNets ("union" adds a
Union-Pro-1.0-like one with a mode token: 5 + 10, 10 modes).

On CUDA, ``peak_gib`` is ``torch.cuda.max_memory_allocated`` during one call of each variant (every model
of the run resident; the transformer's weights are shared by both sides, the ControlNets' fused q/k/v are
copies) and ``extra_gib`` its excess over what was allocated before the call (activations and residuals).

    python benchmarks/bench_controlnet.py [--size small|flux] [--device cpu|cuda] [--dtype fp32|bf16]
        [--kinds canny,union2] [--rounds 3] [--warmup 0] [--threads 2] [--image 512] [--txt-tokens N]
        [--batch 1] [--out FILE]
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
from _flux_reference import build_reference, reference_forward
from bench_flux_gpu import default_dtype

from pictor.controlnet_keys import diffusers_controlnet_keys, params_from_diffusers_config
from pictor.models.controlnet import FluxControlNet
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
from pictor.presets import get_preset

# FLUX.1 [dev]'s transformer as pictor's preset has it; "small" is it narrowed and shortened for 2 CPU cores.
FLUX_DEV: dict[str, Any] = get_preset("flux-dev")["model"]
SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "flux": {
            **FLUX_DEV,
            "context_in_dim": 512,
            "hidden_size": 256,
            "num_heads": 4,
            "depth": 4,
            "depth_single_blocks": 8,
            "axes_dim": [8, 28, 28],
        },
        "controlnets": {"canny": (2, 4, None), "union2": (2, 0, None), "union": (2, 4, 10)},
        "image": 512,
        "txt_tokens": 128,
    },
    "flux": {
        "flux": FLUX_DEV,
        # (double blocks, single blocks, modes): InstantX Canny, Union-Pro-2.0, Union-Pro (1.0)
        "controlnets": {"canny": (5, 10, None), "union2": (6, 0, None), "union": (5, 10, 10)},
        "image": 1024,
        "txt_tokens": 512,
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """A meta-built model allocated on ``device`` (dtype as built) with random values in every parameter."""
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(
            (".scale", "norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")
        ):
            p.normal_(1.0, 0.05, generator=gen)  # RMSNorm gains (pictor's .scale, diffusers' .weight)
        elif p.ndim == 2:
            p.normal_(0.0, 0.5 / p.shape[1] ** 0.5, generator=gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def build_transformers(
    params: FluxParams, device: torch.device, dtype: torch.dtype
) -> tuple[Flux, nn.Module]:
    with default_dtype(dtype), torch.device("meta"):
        ours = Flux(params)
    ours = materialise(ours, device, seed=0)
    # Shares the storage of ours wherever the layouts agree (q/k/v splits are row views; assign=True).
    ref = build_reference(params, dict(ours.state_dict())).requires_grad_(False)
    return ours, ref  # type: ignore[return-value]


def build_controlnets(
    params: FluxParams,
    layout: tuple[int, int, int | None],
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> tuple[FluxControlNet, nn.Module]:
    """diffusers' FluxControlNetModel with random weights, and pictor's FluxControlNet holding the same."""
    from diffusers import FluxControlNetModel

    depth, single, modes = layout
    config = {
        "patch_size": 1,
        "in_channels": params.in_channels,
        "num_layers": depth,
        "num_single_layers": single,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "pooled_projection_dim": params.vec_in_dim,
        "guidance_embeds": params.guidance_embed,
        "axes_dims_rope": list(params.axes_dim),
        "num_mode": modes,
    }
    with default_dtype(dtype), torch.device("meta"):
        ref = FluxControlNetModel(**config)
    ref = materialise(ref, device, seed)
    cn_params = params_from_diffusers_config(config, "bench_controlnet")
    with torch.device("meta"):
        ours = FluxControlNet(cn_params)
    ours.load_state_dict(
        diffusers_controlnet_keys(ref.state_dict(), "bench_controlnet"), strict=True, assign=True
    )
    return ours.eval().requires_grad_(False), ref  # type: ignore[return-value]


def make_inputs(
    params: FluxParams, batch: int, image: int, n_txt: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    if image % 16:
        raise SystemExit(f"--image must be a multiple of 16 (8x autoencoder, 2x2 packing), got {image}")
    lat = image // 8
    n_img = (lat // 2) ** 2
    gen = torch.Generator(device=device).manual_seed(1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    return {
        "img": randn(batch, n_img, params.in_channels),
        "img_ids": make_img_ids(1, lat, lat, device=device)[0],  # [N, 3]: shared, as diffusers takes them
        "txt": randn(batch, n_txt, params.context_in_dim),
        "txt_ids": make_txt_ids(1, n_txt, device=device)[0],
        # t*1000 and guidance*1000 exact in bf16 (diffusers scales them in the model dtype, pictor in fp32)
        "timesteps": torch.full((batch,), 0.5, device=device),
        "y": randn(batch, params.vec_in_dim),
        "guidance": torch.full((batch,), 4.0, device=device),
        "cond": randn(batch, n_img, params.in_channels),  # packed control latents
        "mode": torch.full((batch,), 2, device=device, dtype=torch.long),
    }


def step_fns(
    flux: Flux, ref: nn.Module, cn: FluxControlNet, cn_ref: nn.Module, x: dict[str, Tensor]
) -> dict[str, Callable[[], Any]]:
    """The four calls timed per ControlNet kind (the transformers alone are timed once)."""
    mode = x["mode"] if cn.params.num_modes else None
    base = (x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"])

    def ours_cn() -> Any:
        return cn(x["img"], x["img_ids"], x["cond"], *base[2:], guidance=x["guidance"], mode=mode)

    def ref_cn() -> Any:
        return cn_ref(
            hidden_states=x["img"],
            controlnet_cond=x["cond"],
            controlnet_mode=None if mode is None else mode[:, None],
            conditioning_scale=1.0,
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
            return_dict=False,
        )

    def ours_step() -> Tensor:
        return flux(*base, guidance=x["guidance"], controlnet=ours_cn())

    def ref_step() -> Tensor:
        double, single = ref_cn()
        return ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
            controlnet_block_samples=double,
            controlnet_single_block_samples=single,
            controlnet_blocks_repeat=False,
            return_dict=False,
        )[0]

    return {"pictor": ours_step, "diffusers": ref_step, "pictor_cn": ours_cn, "diffusers_cn": ref_cn}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, rounds: int
) -> dict[str, list[float]]:
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_gib": round(peak / 2**30, 3), "extra_gib": round((peak - before) / 2**30, 3)}


def gib(model: nn.Module) -> float:
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--kinds", default="canny,union2", help="comma list of canny, union2, union")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--warmup", type=int, default=0, help="extra warm-up rounds (the comparison calls warm up already)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=int, default=None, help="pixels per side (default: the size's)")
    ap.add_argument("--txt-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import diffusers

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    size = SIZES[args.size]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in size["controlnets"]]
    if unknown or not kinds:
        raise SystemExit(f"--kinds: unknown {unknown}; choose from {sorted(size['controlnets'])}")
    image = args.image or size["image"]
    n_txt = args.txt_tokens or size["txt_tokens"]
    params = FluxParams(**size["flux"])

    t0 = time.perf_counter()
    flux, ref = build_transformers(params, device, dtype)
    nets = {
        k: build_controlnets(params, size["controlnets"][k], device, dtype, seed=10 + i)
        for i, k in enumerate(kinds)
    }
    build_s = time.perf_counter() - t0
    x = make_inputs(params, args.batch, image, n_txt, device, dtype)
    base = (x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"])

    def ours_plain() -> Tensor:
        return flux(*base, guidance=x["guidance"])

    def ref_plain() -> Tensor:
        return reference_forward(ref, *base, guidance=x["guidance"])

    fns: dict[str, Callable[[], Any]] = {"transformer/pictor": ours_plain, "transformer/diffusers": ref_plain}
    per_kind = {k: step_fns(flux, ref, cn, cn_ref, x) for k, (cn, cn_ref) in nets.items()}
    for k, kf in per_kind.items():
        fns.update({f"{k}/{name}": fn for name, fn in kf.items()})

    with torch.inference_mode():
        # The comparison's calls come first: they are also the warm-up of every module timed below.
        plain, plain_ref = ours_plain(), ref_plain()
        velocities = {k: (kf["pictor"](), kf["diffusers"]()) for k, kf in per_kind.items()}
        times = time_interleaved(fns, device, args.warmup, args.rounds)
        memory = {name: peak_memory(fn, device) for name, fn in fns.items()} if device.type == "cuda" else {}
        med = {name: statistics.median(ts) for name, ts in times.items()}
        results: dict[str, Any] = {}
        for k, (v, v_ref) in velocities.items():
            cn = nets[k][0]
            row: dict[str, Any] = {
                "controlnet": {
                    "double_blocks": cn.params.depth,
                    "single_blocks": cn.params.depth_single_blocks,
                    "modes": cn.params.num_modes,
                    "weights_gib": gib(cn),
                },
                "seconds_per_step": {side: round(med[f"{k}/{side}"], 5) for side in ("pictor", "diffusers")},
                "controlnet_seconds": {
                    side: round(med[f"{k}/{side}_cn"], 5) for side in ("pictor", "diffusers")
                },
                # step with ControlNet / the same side's transformer alone
                "overhead_ratio": {
                    side: round(med[f"{k}/{side}"] / med[f"transformer/{side}"], 4)
                    for side in ("pictor", "diffusers")
                },
                "controlnet_share_of_step": {
                    side: round(med[f"{k}/{side}_cn"] / med[f"{k}/{side}"], 4)
                    for side in ("pictor", "diffusers")
                },
                "pictor_vs_diffusers_step_ratio": round(med[f"{k}/pictor"] / med[f"{k}/diffusers"], 4),
                "max_abs_diff": max_diff(v, v_ref),
                "velocity_max_abs": float(v_ref.float().abs().max()),
                "control_effect": max_diff(v, plain),
                "finite": bool(torch.isfinite(v).all() and torch.isfinite(v_ref).all()),
            }
            if memory:
                row["memory"] = {side: memory[f"{k}/{side}"] for side in ("pictor", "diffusers")}
            results[k] = row

    result = {
        "config": {
            "size": args.size,
            "transformer": {**params.to_dict(), "weights_gib": gib(flux)},
            "image": image,
            "tokens": {"image": x["img"].shape[1], "text": n_txt},
            "batch": args.batch,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "threads": args.threads,
            "build_s": round(build_s, 2),
        },
        "transformer_alone": {
            "seconds_per_step": {
                side: round(med[f"transformer/{side}"], 5) for side in ("pictor", "diffusers")
            },
            "max_abs_diff": max_diff(plain, plain_ref),
            **(
                {"memory": {s: memory[f"transformer/{s}"] for s in ("pictor", "diffusers")}} if memory else {}
            ),
        },
        "controlnets": results,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
