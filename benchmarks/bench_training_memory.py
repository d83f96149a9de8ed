"""Training memory on a frozen base: gradient checkpointing (pictor's against diffusers'
`enable_gradient_checkpointing`) and pictor's FP8 base (`pictor train lora --fp8-base`).

A FLUX.1-width transformer (hidden 3072, 24 heads, context 4096, guidance embedding) with --double double and
--single single blocks, random weights, frozen; one training step's forward and backward of batch 1 with
--tokens image tokens and 128 text tokens, the gradient taken with respect to the input tokens, so that every
block's activations are needed exactly as when training a LoRA on a frozen base (the adapters' own memory is
negligible). Six runs, each in a fresh process: pictor and diffusers (same weights, mapped by
benchmarks/_flux_reference.py), each without and with checkpointing, and pictor with the blocks' weights in
FP8 (widened per layer, forward and backward), without and with checkpointing.

Per run: the highest memory while it steps (CPU: resident set polled every millisecond; CUDA:
max_memory_allocated) and its rise over the moment before the first step (the built model), seconds per step
(median of --repeats after one warm-up step), and how far the input gradient is from pictor's without
checkpointing.

Usage: python benchmarks/bench_training_memory.py [--double 1] [--single 2] [--tokens 1024] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _flux_reference import build_reference, reference_forward
from _memory import RssSampler, rss_now
from bench_fp8 import N_TXT, flux_width_params, inputs, random_state
from safetensors.torch import load_file, save_file

from pictor.models.flux import Flux
from pictor.models.weight_storage import FP8_STORAGE, store_fp8

RUNS = (
    "pictor",
    "pictor_checkpointed",
    "diffusers",
    "diffusers_checkpointed",
    "pictor_fp8",
    "pictor_fp8_checkpointed",
)


def worker(args: argparse.Namespace) -> None:
    """One implementation, one way, in this fresh process; prints its numbers and saves the input gradient."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = flux_width_params(args.double, args.single)
    sd = random_state(params, dtype)
    checkpointed = args.run.endswith("checkpointed")
    if args.run.startswith("pictor"):
        with torch.device("meta"):
            model: Any = Flux(params)
        model.load_state_dict(sd, strict=True, assign=True)
        model.gradient_checkpointing = checkpointed
        if "fp8" in args.run:
            store_fp8(model, FP8_STORAGE)
        forward = model
    else:
        model = build_reference(params, sd)
        if checkpointed:
            model.enable_gradient_checkpointing()

        def forward(**kw: Any) -> torch.Tensor:
            return reference_forward(model, **kw)

    del sd
    model.to(device).train().requires_grad_(False)
    x = inputs(params, args.tokens, device, dtype)

    def step() -> torch.Tensor:
        img = x["img"].detach().requires_grad_(True)
        out = forward(**{**x, "img": img})
        (out.float() ** 2).mean().backward()
        assert img.grad is not None
        return img.grad

    # Memory from before the first step (a warm-up step's freed memory would stay in the allocator's pool
    # and hide the step's own rise); seconds from the steps after it.
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_now()
    seconds = []
    with RssSampler() as rss:
        step()  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            grad = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak, rise = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - before
    else:
        peak, rise = rss.peak, rss.peak - before
    save_file({"grad": grad.float().cpu().contiguous()}, args.save)
    print(
        json.dumps(
            {
                "weights_gb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 3),
                "peak_gb": round(peak / 1e9, 3),
                "rise_gb": round(rise / 1e9, 3),
                "seconds": round(statistics.median(seconds), 2),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (1024: a 512x512 picture)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[str, Any] = {}
    grads: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in RUNS:
            save = str(Path(tmp) / f"{run}.safetensors")
            cmd = [sys.executable, __file__, "--worker", "--run", run, "--save", save]
            cmd += ["--device", args.device]
            for flag in ("double", "single", "tokens", "repeats", "threads"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[run] = json.loads(done.stdout.strip().splitlines()[-1])
            grads[run] = load_file(save)["grad"]
            print(f"{run}: {runs[run]}", file=sys.stderr)
    base = grads["pictor"]
    for run, numbers in runs.items():
        numbers["grad_rel_err_vs_pictor"] = float(f"{float((grads[run] - base).norm() / base.norm()):.3g}")
    for impl in ("pictor", "diffusers", "pictor_fp8"):
        plain, ckpt = runs[impl], runs[f"{impl}_checkpointed"]
        plain["checkpointing_saves_gb"] = round(plain["rise_gb"] - ckpt["rise_gb"], 3)
        plain["checkpointing_time_factor"] = round(ckpt["seconds"] / plain["seconds"], 2)
    params = flux_width_params(args.double, args.single)
    result = {
        "config": {
            "hidden_size": params.hidden_size,
            "double_blocks": params.depth,
            "single_blocks": params.depth_single_blocks,
            "image_tokens": args.tokens,
            "text_tokens": N_TXT,
            "batch": 1,
            "device": args.device,
            "threads": args.threads,
            "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
            "what": "forward + backward to the input tokens, weights frozen (a LoRA run's activations)",
        },
        "runs": runs,
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
