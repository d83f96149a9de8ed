"""Training memory on a frozen base: gradient checkpointing (pictor's against diffusers'
`enable_gradient_checkpointing`), pictor's FP8 base (`pictor train lora --fp8-base`) and its GGML-quantized
bases (`train lora --base` of a GGUF import or a `convert dtype --dtype q8_0|q4_0` bundle).

A FLUX.1-width transformer (hidden 3072, 24 heads, context 4096, guidance embedding) with --double double and
--single single blocks, random weights, frozen; one training step's forward and backward of batch 1 with
--tokens image tokens and 128 text tokens, the gradient taken with respect to the input tokens, so that every
block's activations are needed exactly as when training a LoRA on a frozen base (the adapters' own memory is
negligible). Six runs, each in a fresh process: pictor and diffusers (same weights, mapped by
benchmarks/_flux_reference.py), each without and with checkpointing, and pictor with the blocks' weights in
FP8 (widened per layer, forward and backward), without and with checkpointing; then pictor with them in Q8_0,
and in Q4_0 without and with checkpointing (dequantized per layer, forward and backward).

Per run: the highest memory while it steps (CPU: resident set polled every millisecond; CUDA:
max_memory_allocated) and its rise over the moment before the first step (the built model), seconds per step
(median of --repeats after one warm-up step), and how far the input gradient is from pictor's without
checkpointing.

Usage: python benchmarks/bench_training_memory.py [--double 1] [--single 2] [--tokens 1024] [--device cpu]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _flux_reference import build_reference, reference_forward
from _fresh_runs import emit, measure, parse_args, rel_err, run_each
from bench_fp8 import N_TXT, flux_width_params, inputs, random_state

from pictor.bundle_storage import quantize_block_linears
from pictor.checkpoint import load_into
from pictor.models.flux import Flux
from pictor.models.weight_storage import FP8_STORAGE, store_fp8

RUNS = (
    "pictor",
    "pictor_checkpointed",
    "diffusers",
    "diffusers_checkpointed",
    "pictor_fp8",
    "pictor_fp8_checkpointed",
    "pictor_q8_0",
    "pictor_q4_0",
    "pictor_q4_0_checkpointed",
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
        quantized = next((f for f in ("q8_0", "q4_0") if f in args.run), None)
        if quantized:  # as `convert dtype --dtype q4_0` stores them; load_into builds QuantizedLinear layers
            quantize_block_linears(sd, quantized.upper(), "random weights")
        with torch.device("meta"):
            model: Any = Flux(params)
        load_into(model, sd, args.run)
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

    measure(step, args.repeats, device, args.save, model)


def main() -> None:
    args = parse_args(__doc__, RUNS, repeats=3)
    if args.worker:
        worker(args)
        return
    runs, grads = run_each(__file__, RUNS, args)
    for run, numbers in runs.items():
        numbers["grad_rel_err_vs_pictor"] = rel_err(grads[run], grads["pictor"])
    for impl in ("pictor", "diffusers", "pictor_fp8", "pictor_q4_0"):
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
    emit(result, args.out)


if __name__ == "__main__":
    main()
