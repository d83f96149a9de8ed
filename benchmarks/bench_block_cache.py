"""First-block cache: pictor's (`--cache-threshold`) against diffusers' `apply_first_block_cache`, in one run.

Part 1, side by side: the shipped default model's transformer and the same weights in diffusers'
FluxTransformer2DModel (mapped by benchmarks/_flux_reference.py) sample --prompts shapes-dev prompts (spread
over the file), one image each, with the model's defaults (Euler, 20 steps of the flux schedule, CFG 4), at
each of --thresholds. pictor runs the real generation path (`guided_velocity`: conditional and
unconditional halves batched in one forward, the cache deciding per row); diffusers runs the two halves as
two forwards in the cache contexts "cond" and "uncond", as its pipelines do for true CFG, so both decide for
each half apart. Per threshold and side: sampling seconds per image (transformer, CFG and sampler; no text
encoder, no decode), the share of passes that ran every block, and the final latents' mean distance from
the same side's uncached run; and the largest difference between pictor's and diffusers' final latents.

Part 2 (`--adherence K`, pictor only: the scorer reads pictor's images): `pictor eval shapes` at each
threshold, K images per prompt over all of shapes-dev: overall and per-tag scores and wall seconds per image
(end to end: text, sampling, decode).

Usage: python benchmarks/bench_block_cache.py [--prompts 8] [--thresholds 0,0.05,0.1,0.2,0.3]
    [--adherence K] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from _flux_reference import build_reference, reference_forward

import pictor
import pictor.guided_velocity as guided
from pictor.eval.shapes import load_prompts
from pictor.eval.shapes_run import run_shapes_eval
from pictor.models.block_cache import FirstBlockCache
from pictor.models.flux import make_img_ids, make_txt_ids, pack_latents
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.sampling import get_sampler, get_schedule


class CountedCache(FirstBlockCache):
    """The generation path's cache, kept where the benchmark can read its counts."""

    made: list[FirstBlockCache] = []  # noqa: RUF012 (one list on purpose: every run's caches)

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        CountedCache.made.append(self)


def pictor_run(pipe: Pipeline, prompt: str, seed: int, threshold: float) -> tuple[torch.Tensor, float, float]:
    """One image by pictor's generation path -> final latents, seconds, share of rows run in full."""
    r = pipe.resolve_request(GenerationRequest(prompt, seed=seed, cache_threshold=threshold))
    assert r.width and r.height and r.steps and r.sampler and r.schedule
    f = pipe.autoencoder.params.downsample_factor
    lat_h, lat_w = r.height // f, r.width // f
    with torch.inference_mode():
        x = pack_latents(pipe.initial_noise([seed], lat_h, lat_w))
        ts = get_schedule(r.schedule, r.steps, image_seq_len=x.shape[1])
        CountedCache.made.clear()
        start = time.perf_counter()
        fn = guided.guided_velocity(pipe, r, 1, lat_h, lat_w)
        # noise: a stochastic sampler's step noise, as the pipeline draws it (the others ignore it)
        out = get_sampler(r.sampler)(fn, x, ts, None, noise=pipe.step_noise([seed], tuple(x.shape[1:])))
        seconds = time.perf_counter() - start
    cache = CountedCache.made[0] if CountedCache.made else None
    return out, seconds, cache.full / cache.calls if cache else 1.0


def diffusers_run(
    pipe: Pipeline, ref: torch.nn.Module, prompt: str, seed: int, threshold: float, counter: list[int]
) -> tuple[torch.Tensor, float, float]:
    """The same image through diffusers' transformer, its first block cache on when threshold > 0."""
    from diffusers.hooks import FirstBlockCacheConfig

    r = pipe.resolve_request(GenerationRequest(prompt, seed=seed))
    assert r.width and r.height and r.steps and r.sampler and r.schedule and r.guidance is not None
    f = pipe.autoencoder.params.downsample_factor
    lat_h, lat_w = r.height // f, r.width // f
    if threshold > 0:
        ref.enable_cache(FirstBlockCacheConfig(threshold=threshold))  # type: ignore[operator]
    cond, uncond = pipe.encode_text([r.prompt]), pipe.encode_text([r.negative_prompt])
    img_ids = make_img_ids(1, lat_h, lat_w)
    txt_ids = make_txt_ids(1, cond.tokens.shape[1])
    calls = 0

    def half(name: str, x: torch.Tensor, t: torch.Tensor, emb: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        args = (ref, x, img_ids, emb.tokens, txt_ids, t, emb.pooled)
        if threshold <= 0:
            return reference_forward(*args)
        with ref.cache_context(name):  # type: ignore[operator]
            return reference_forward(*args)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = half("cond", x, t, cond), half("uncond", x, t, uncond)
        return v_uncond + r.guidance * (v_cond - v_uncond)

    counter[0] = 0
    with torch.inference_mode():
        x = pack_latents(pipe.initial_noise([seed], lat_h, lat_w))
        ts = get_schedule(r.schedule, r.steps, image_seq_len=x.shape[1])
        start = time.perf_counter()
        step_noise = pipe.step_noise([seed], tuple(x.shape[1:]))
        out = get_sampler(r.sampler)(velocity, x, ts, None, noise=step_noise)
        seconds = time.perf_counter() - start
    if threshold > 0:
        ref.disable_cache()  # type: ignore[operator]
    return out, seconds, counter[0] / calls


def side_by_side(pipe: Pipeline, prompts: list[str], thresholds: list[float]) -> list[dict[str, Any]]:
    ref = build_reference(pipe.transformer.params, dict(pipe.transformer.state_dict()))
    counter = [0]  # the attention of diffusers' second block runs only on a full pass
    second = (
        ref.transformer_blocks[1] if len(ref.transformer_blocks) > 1 else ref.single_transformer_blocks[0]
    )
    second.attn.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    guided.FirstBlockCache = CountedCache  # type: ignore[misc]
    pictor_run(pipe, prompts[0], 0, 0.0)  # warm-up: the first run of each pays one-off costs
    diffusers_run(pipe, ref, prompts[0], 0, 0.0, counter)
    base: dict[str, list[torch.Tensor]] = {}
    rows = []
    for threshold in thresholds:
        sides: dict[str, dict[str, Any]] = {}
        finals: dict[str, list[torch.Tensor]] = {"pictor": [], "diffusers": []}
        for name in ("pictor", "diffusers"):
            seconds, shares = 0.0, []
            for seed, prompt in enumerate(prompts):
                if name == "pictor":
                    out, s, share = pictor_run(pipe, prompt, seed, threshold)
                else:
                    out, s, share = diffusers_run(pipe, ref, prompt, seed, threshold, counter)
                finals[name].append(out)
                seconds += s
                shares.append(share)
            base.setdefault(name, finals[name])
            change = [(a - b).abs().mean().item() for a, b in zip(finals[name], base[name], strict=True)]
            sides[name] = {
                "seconds_per_image": round(seconds / len(prompts), 4),
                "full_pass_share": round(sum(shares) / len(shares), 4),
                "mean_abs_latent_change_vs_uncached": round(sum(change) / len(change), 5),
            }
        gap = max(
            (a - b).abs().max().item() for a, b in zip(finals["pictor"], finals["diffusers"], strict=True)
        )
        rows.append({"threshold": threshold, **sides, "max_abs_diff_pictor_vs_diffusers": gap})
        print(json.dumps(rows[-1]), flush=True)
    guided.FirstBlockCache = FirstBlockCache  # type: ignore[misc]
    return rows


def adherence(pipe: Pipeline, k: int, thresholds: list[float]) -> list[dict[str, Any]]:
    rows = []
    for threshold in thresholds:
        start = time.perf_counter()
        report = run_shapes_eval(pipe, None, k, 0, None, cache_threshold=threshold)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "threshold": threshold,
                "overall": round(report["overall"], 4),
                "scorer_revision": report["scorer_revision"],
                "per_tag": {tag: round(v, 4) for tag, v in report["per_tag"].items()},
                "images": report["n_images"],
                "seconds_per_image": round(seconds / report["n_images"], 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--thresholds", default="0,0.05,0.1,0.2,0.3")
    parser.add_argument(
        "--adherence", type=int, default=0, metavar="K", help="also score K images per prompt"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    thresholds = [float(v) for v in args.thresholds.split(",")]
    if thresholds[0] != 0:
        raise SystemExit("--thresholds must start with 0: the uncached run the others are measured against")
    pipe = pictor.load(args.model, device="cpu")
    every = load_prompts()
    prompts = [every[i * len(every) // args.prompts]["prompt"] for i in range(args.prompts)]
    result: dict[str, Any] = {
        "config": {
            "model": {"name": pipe.name, "hash": pipe.hash[:12]},
            "prompts": prompts,
            "defaults": {k: pipe.defaults[k] for k in ("width", "height", "steps", "guidance", "sampler")},
            "threads": args.threads,
            "device": "cpu",
        },
        "side_by_side": side_by_side(pipe, prompts, thresholds),
    }
    if args.adherence:
        result["adherence"] = adherence(pipe, args.adherence, thresholds)
    result["torch"] = torch.__version__
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
