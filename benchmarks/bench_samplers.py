"""Sampler convergence and cost on the shipped default model, printed as JSON.

For --prompts shapes-dev prompts (spread over the file; prompt k uses seed k), each sampler makes the image
at each of --steps (default 10 and 20) with the model's defaults otherwise (flux schedule, CFG 4, 64x64),
and is compared with a --reference-steps (100) Euler image of the same prompt and seed: the mean absolute
pixel difference (0-255 scale), averaged over the prompts. For the deterministic samplers this measures how
close a few steps come to the ODE's solution. The stochastic samplers (euler_ancestral, dpmpp_2m_sde, lcm,
dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde, res_multistep_ancestral,
er_sde, seeds_2, seeds_3, exp_heun_2_x0_sde and the ancestral CFG++ ones) solve no ODE: their images
follow their own fresh noise, so their distance does not go to 0 and measures how far they stray, not their
error. Seconds per image are the median wall time of the whole `Pipeline.generate` (text, sampling, decode)
at batch 1 (the median: a shared machine's slow moments do not move it); each row gives the sampler's model
calls per image (before CFG doubling): dpm_2, heunpp2, seeds_2, seeds_3, exp_heun_2_x0(_sde) and the
two-call stochastic samplers make more than one per step.

Usage: python benchmarks/bench_samplers.py [--prompts 12] [--steps 10,20] [--reference-steps 100]
    [--samplers euler,dpmpp_2m,...] (default: every sampler but heun, the new ipndm_v,
    res_multistep_ancestral and er_sde among them) [--threads 2] [--out FILE]
(A run of a few samplers prints only their rows; benchmarks/results/samplers.json merges such runs, all on
the same prompts, seeds and reference.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pictor
from pictor.eval.shapes import load_prompts
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.sampling import SAMPLERS, model_evals


def _image(pipe: Pipeline, prompt: str, seed: int, steps: int, sampler: str) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    (g,) = pipe.generate(GenerationRequest(prompt, seed=seed, steps=steps, sampler=sampler))
    return np.asarray(g.image).astype(np.float64), time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--steps", default="10,20")
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--samplers", default=",".join(n for n in SAMPLERS if n != "heun"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps_list = [int(s) for s in args.steps.split(",")]
    samplers = args.samplers.split(",")

    pipe = pictor.load(args.model, device="cpu")
    every = load_prompts()
    stride = max(1, len(every) // args.prompts)
    prompts = [p["prompt"] for p in every[::stride][: args.prompts]]
    _image(pipe, prompts[0], 0, 2, "euler")  # warm-up: first-call allocations and kernel selection

    started = time.perf_counter()
    references = [_image(pipe, p, k, args.reference_steps, "euler")[0] for k, p in enumerate(prompts)]
    results: dict[str, Any] = {}
    for sampler in samplers:
        row: dict[str, Any] = {}
        for steps in steps_list:
            dists, secs = [], []
            for k, p in enumerate(prompts):
                img, s = _image(pipe, p, k, steps, sampler)
                dists.append(float(np.abs(img - references[k]).mean()))
                secs.append(s)
            row[str(steps)] = {
                "mean_abs_pixel_diff_vs_reference": round(float(np.mean(dists)), 3),
                "max_over_prompts": round(float(np.max(dists)), 3),
                "median_seconds_per_image": round(float(np.median(secs)), 4),
                "model_calls_per_image": model_evals(sampler, steps),
            }
        results[sampler] = row
    report = {
        "config": {
            "model": {"name": pipe.name, "hash": pipe.hash[:12]},
            "prompts": prompts,
            "seeds": list(range(len(prompts))),
            "reference": f"euler, {args.reference_steps} steps",
            "defaults": {k: pipe.defaults.get(k) for k in ("width", "height", "guidance", "schedule")},
            "threads": args.threads,
            "device": "cpu",
        },
        "samplers": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
