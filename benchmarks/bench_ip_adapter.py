"""XLabs' FLUX.1 IP-Adapter step cost: pictor's ``Flux.forward(ip_adapter=...)`` against diffusers'
FluxTransformer2DModel with ``FluxIPAdapterAttnProcessor``, same weights and inputs, in one run.

Per denoising step (one forward at one t, batch --batch, distilled guidance: one call per step as FLUX.1-dev
runs), timed interleaved round by round (order alternating, so background load hits every variant alike),
median over --rounds after a warm-up (the velocity comparison's calls, then --warmup more rounds):

- ``pictor/plain``: ``Flux.forward`` without the adapter; ``pictor/ip_adapter``: ``Flux.forward(ip_adapter=
  ...)`` with the `IPAttention` computed once, outside the timed call, as pictor's sampler does once per run;
  ``pictor/ip_attention``: that one-time ``IPAdapter.attention`` (image projection + every block's keys and
  values), reported on its own;
- ``diffusers/plain``: FluxTransformer2DModel without the adapter; ``diffusers/ip_adapter``: the same weights
  with ``_load_ip_adapter_weights`` and ``joint_attention_kwargs={"ip_adapter_image_embeds": ...}``, as
  FluxPipeline calls it every step: the image projection (``encoder_hid_proj``) and each processor's
  ``to_k_ip``/``to_v_ip`` run inside every forward.

Weights: the transformer is built as pictor's Flux and mapped to diffusers by benchmarks/_flux_reference.py
(two diffusers models, plain and with the adapter, sharing pictor's storage); the adapter is built as
pictor's `IPAdapter` (XLabs' key names) and handed to diffusers in its loader's layout (a copy). Every
module is built on the meta device, allocated on --device in --dtype and filled with random values, std
0.5/sqrt(fan_in) (norm gains around 1), so that 57 blocks plus residuals stay finite in bf16. The CLIP image
embeddings are random vectors (CLIP's vision tower runs once per picture, not per step, so it is left out);
each row of the batch gets its own, on both sides, so both do the same work. ``max_abs_diff`` compares the
two sides' velocities (so equal work is timed); ``ip_effect`` is how far the picture moves pictor's velocity
(so the adapter's contribution is not negligible).

Sizes: ``small`` (default, about 10 s on 2 idle CPU cores in float32): width 256 (4 heads of 64), 4 double + 8
single blocks, context 512, CLIP width 64, 512x512 pixels (a 64x64 latent of 16 channels -> 1024 tokens) and
128 text tokens. ``flux``: FLUX.1-dev's transformer (3072 wide, 24 heads, 19 + 38 blocks, context 4096, pooled
768, guidance embedding) and XLabs' adapter (CLIP ViT-L/14's 768 -> 4 tokens of 4096, to_k/to_v 4096 -> 3072
in each of the 19 double blocks), 1024x1024 (4096 tokens) and 512 text tokens; meant for ``--device cuda
--dtype bf16``. ``tiny``: a few blocks of width 32, for the test.

On CUDA, ``memory`` holds ``peak_gib`` (``torch.cuda.max_memory_allocated`` during one call of each variant,
every model of the run resident) and ``extra_gib``, its excess over what was allocated before the call.

    python benchmarks/bench_ip_adapter.py [--size small|flux|tiny] [--device cpu|cuda] [--dtype fp32|bf16]
        [--scale 1.0] [--rounds 3] [--warmup 0] [--threads 2] [--image 512] [--txt-tokens N] [--batch 1]
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
from _flux_reference import build_reference, reference_forward
from bench_controlnet import (
    DTYPES,
    FLUX_DEV,
    build_transformers,
    gib,
    make_inputs,
    materialise,
    max_diff,
    peak_memory,
    time_interleaved,
)
from bench_flux_gpu import default_dtype

from pictor.models.flux import Flux, FluxParams
from pictor.models.ip_adapter import IPAdapter, IPAttention

# XLabs' adapter projects to 4 tokens; diffusers' loader infers the token count from the projection's rows
# (4, or 16 when they are 65536), so 4 is also the only count both sides read the same at every size.
IP_TOKENS = 4

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
        "image_dim": 64,
        "image": 512,
        "txt_tokens": 128,
    },
    "flux": {"flux": FLUX_DEV, "image_dim": 768, "image": 1024, "txt_tokens": 512},
    # For tests/test_bench_ip_adapter.py: seconds on a shared CPU, every code path of the larger sizes.
    "tiny": {
        "flux": {
            **FLUX_DEV,
            "context_in_dim": 32,
            "vec_in_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "depth": 2,
            "depth_single_blocks": 2,
            "axes_dim": [4, 6, 6],
        },
        "image_dim": 12,
        "image": 64,
        "txt_tokens": 8,
    },
}
SIDES = ("pictor", "diffusers")
VARIANTS = ("plain", "ip_adapter")


@torch.no_grad()
def build_adapter(
    params: FluxParams, image_dim: int, device: torch.device, dtype: torch.dtype, seed: int
) -> IPAdapter:
    """pictor's IPAdapter for ``params``, random weights allocated directly on ``device`` in ``dtype``."""
    with default_dtype(dtype), torch.device("meta"):
        adapter = IPAdapter(image_dim, params.context_in_dim, params.hidden_size, IP_TOKENS, params.depth)
    adapter = materialise(adapter, device, seed)
    # materialise draws 1-D parameters around 0; a LayerNorm gain near 0 would shrink the picture's tokens
    # to their bias and hide the adapter, so give it a trained model's gain around 1.
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    adapter.ip_adapter_proj_model.norm.weight.normal_(1.0, 0.05, generator=gen)
    return adapter  # type: ignore[return-value]


def diffusers_ip_state(adapter: IPAdapter) -> dict[str, dict[str, Tensor]]:
    """The adapter's XLabs keys in the layout diffusers' ``_load_ip_adapter_weights`` takes (what its
    ``load_ip_adapter`` makes of an XLabs file): ``image_proj`` and ``ip_adapter`` by block number."""
    out: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj"][key.split(".", 1)[1]] = value
        else:  # double_blocks.N.processor.ip_adapter_double_stream_k_proj.weight -> N.to_k_ip.weight
            _, block, _, proj, suffix = key.split(".")
            kv = "to_k_ip" if proj.endswith("_k_proj") else "to_v_ip"
            out["ip_adapter"][f"{block}.{kv}.{suffix}"] = value
    return out


def build_reference_with_adapter(
    flux: Flux, params: FluxParams, adapter: IPAdapter, scale: float, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """A second diffusers transformer on the same storage as ``flux``, with the adapter loaded as diffusers
    loads it. A separate model, because diffusers' IP processors fail without picture embeddings, so the plain
    reference cannot be the same object."""
    ref = build_reference(params, dict(flux.state_dict())).requires_grad_(False)
    ref._load_ip_adapter_weights([diffusers_ip_state(adapter)], low_cpu_mem_usage=False)
    # Without low_cpu_mem_usage the loader builds the image projection on the CPU in the default dtype
    # (its processors follow the model's device and dtype); FluxPipeline's loader places it with the model.
    ref.encoder_hid_proj.to(device=device, dtype=dtype)
    # diffusers' FluxIPAdapterMixin.set_ip_adapter_scale: one scale per adapter in every double block
    for proc in ref.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [scale]
    return ref.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument(
        "--scale", type=float, default=1.0, help="IP-Adapter scale (diffusers' set_ip_adapter_scale)"
    )
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

    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    size = SIZES[args.size]
    image = args.image or size["image"]
    n_txt = args.txt_tokens or size["txt_tokens"]
    params = FluxParams(**size["flux"])

    t0 = time.perf_counter()
    flux, ref = build_transformers(params, device, dtype)
    adapter = build_adapter(params, size["image_dim"], device, dtype, seed=20)
    ref_ip = build_reference_with_adapter(flux, params, adapter, args.scale, device, dtype)
    build_s = time.perf_counter() - t0
    x = make_inputs(params, args.batch, image, n_txt, device, dtype)
    # CLIP ViT-L/14's projected image embedding, one picture per row of the batch (FluxPipeline repeats the
    # picture per image too), so both sides project and attend to the same number of picture tokens.
    gen = torch.Generator(device=device).manual_seed(2)
    embeds = torch.randn(args.batch, adapter.image_dim, generator=gen, device=device, dtype=dtype)
    base = (x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"])

    def ours_attention() -> IPAttention:
        return adapter.attention(embeds, args.scale, params.num_heads)

    with torch.inference_mode():
        ipa = ours_attention()  # once per sampler run in pictor: kept out of the step it conditions

    def ours_plain() -> Tensor:
        return flux(*base, guidance=x["guidance"])

    def ours_ip() -> Tensor:
        return flux(*base, guidance=x["guidance"], ip_adapter=ipa)

    def ref_plain() -> Tensor:
        return reference_forward(ref, *base, guidance=x["guidance"])

    def ref_ip_step() -> Tensor:
        return ref_ip(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
            # a fresh dict per call: the forward pops the embeddings out of it and puts the projection back
            joint_attention_kwargs={"ip_adapter_image_embeds": [embeds[:, None]]},  # [B, images, dim]
            return_dict=False,
        )[0]

    fns: dict[str, Callable[[], Any]] = {
        "pictor/plain": ours_plain,
        "pictor/ip_adapter": ours_ip,
        "pictor/ip_attention": ours_attention,
        "diffusers/plain": ref_plain,
        "diffusers/ip_adapter": ref_ip_step,
    }

    with torch.inference_mode():
        # The comparison's calls come first: they are also the warm-up of every module timed below.
        v = {name: fn() for name, fn in fns.items() if not name.endswith("ip_attention")}
        times = time_interleaved(fns, device, args.warmup, args.rounds)
        steps = [f"{s}/{k}" for s in SIDES for k in VARIANTS]
        memory = {name: peak_memory(fns[name], device) for name in steps} if device.type == "cuda" else {}
    med = {name: statistics.median(ts) for name, ts in times.items()}

    result: dict[str, Any] = {
        "config": {
            "size": args.size,
            "transformer": {**params.to_dict(), "weights_gib": gib(flux)},
            "ip_adapter": {
                "image_dim": adapter.image_dim,
                "context_dim": adapter.context_dim,
                "hidden_size": adapter.hidden_size,
                "num_tokens": adapter.num_tokens,
                "double_blocks": adapter.depth,
                "weights_gib": gib(adapter),
                "scale": args.scale,
            },
            "image": image,
            "tokens": {"image": x["img"].shape[1], "text": n_txt, "picture": adapter.num_tokens},
            "batch": args.batch,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "threads": args.threads,
            "build_s": round(build_s, 2),
        },
        "seconds_per_step": {s: {k: round(med[f"{s}/{k}"], 5) for k in VARIANTS} for s in SIDES},
        # the IP-Adapter step against the same side's plain step
        "ip_overhead": {
            s: {
                "seconds": round(med[f"{s}/ip_adapter"] - med[f"{s}/plain"], 5),
                "ratio": round(med[f"{s}/ip_adapter"] / med[f"{s}/plain"], 4),
            }
            for s in SIDES
        },
        # pictor's once-per-run cost; divide by the step count to set it against the per-step overheads
        "ip_attention_seconds": round(med["pictor/ip_attention"], 6),
        "pictor_vs_diffusers_step_ratio": {
            k: round(med[f"pictor/{k}"] / med[f"diffusers/{k}"], 4) for k in VARIANTS
        },
        "max_abs_diff": {k: max_diff(v[f"pictor/{k}"], v[f"diffusers/{k}"]) for k in VARIANTS},
        "velocity_max_abs": float(v["diffusers/ip_adapter"].float().abs().max()),
        "ip_effect": max_diff(v["pictor/ip_adapter"], v["pictor/plain"]),
        "finite": all(bool(torch.isfinite(t).all()) for t in v.values()),
    }
    if memory:
        result["memory"] = {s: {k: memory[f"{s}/{k}"] for k in VARIANTS} for s in SIDES}
    result.update(
        {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        }
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
