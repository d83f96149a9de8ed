"""Per-rank training memory of the transformer under DDP and under FSDP (`pictor train t2i --fsdp`), side by
side in one run. Prints one JSON object.

Each mode runs under `torchrun --nproc_per_node N` (gloo on the CPU, NCCL on GPUs): a FLUX-layout
transformer of the given size, built and wrapped as the trainer does it, takes `--steps` AdamW steps on
random tokens with an EMA update after each. DDP: every rank builds the whole model, `distributed.wrap`,
a whole EMA copy (`EMA`). FSDP: rank 0 builds the whole model, the other ranks only its meta-device
architecture, `distributed.shard` (one unit per double/single block) sends each rank its shards, and the
EMA is sharded too (`ShardedEMA`). Each rank then counts the bytes it holds, exactly: parameters,
gradients, AdamW state and EMA (local shards under FSDP), plus its peak resident memory while building
and wrapping the model and over the whole run (ru_maxrss, which also holds Python, torch and activations,
so it shrinks less than the counted bytes do) and the median step time.

    python benchmarks/bench_fsdp_memory.py [--nproc 2] [--hidden 768] [--heads 12] [--depth 4]
        [--single 8] [--steps 3] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids
    from pictor.train import distributed
    from pictor.train.ema import EMA, ShardedEMA, meta_copy

    info = distributed.setup(args.device)
    torch.manual_seed(0)
    head = args.hidden // args.heads
    axes = [head - 2 * (head * 3 // 8), head * 3 // 8, head * 3 // 8]
    params = FluxParams(
        in_channels=16,
        out_channels=16,
        vec_in_dim=384,
        context_in_dim=384,
        hidden_size=args.hidden,
        mlp_ratio=4.0,
        num_heads=args.heads,
        depth=args.depth,
        depth_single_blocks=args.single,
        axes_dim=axes,
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    )
    ema: EMA | ShardedEMA
    if args.mode == "fsdp":
        if info.is_main:
            model = Flux(params).init_weights()
        else:
            with torch.device("meta"):
                model = Flux(params)
        skeleton = meta_copy(model)
        distributed.shard(model, [*model.double_blocks, *model.single_blocks], info.device)
        ema = ShardedEMA(model, skeleton, 0.999)
        forward = model
    else:
        model = Flux(params).init_weights().to(info.device)
        ema = EMA(model, 0.999)
        forward = distributed.wrap(model, info)
    n_params = sum(p.numel() for p in model.parameters())
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak while building
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, side, length = 1, 16, 32
    gen = torch.Generator().manual_seed(info.rank)
    img = torch.randn(batch, (side // 2) ** 2, 16, generator=gen).to(info.device)
    txt = torch.randn(batch, length, 384, generator=gen).to(info.device)
    vec = torch.randn(batch, 384, generator=gen).to(info.device)
    img_ids = make_img_ids(batch, side, side).to(info.device)
    txt_ids = make_txt_ids(batch, length).to(info.device)
    t = torch.rand(batch, generator=gen).to(info.device)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        loss = forward(img, img_ids, txt, txt_ids, t, vec).pow(2).mean()
        loss.backward()
        optimizer.step()
        ema.update(model, i + 1)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i < args.steps - 1:  # the last step's gradients stay, to be counted
            optimizer.zero_grad(set_to_none=True)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    report = {
        "rank": info.rank,
        "parameters": n_params,
        "param_bytes": _bytes(model.parameters()),
        "grad_bytes": _bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_bytes": _bytes(state),
        "ema_bytes": _bytes(ema.shards.values())
        if isinstance(ema, ShardedEMA)
        else _bytes(ema.module.parameters()),
        "build_peak_rss_bytes": built_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s_median": statistics.median(times[1:] or times),
    }
    if info.device.type == "cuda":
        report["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(info.device)
    reports: list[Any] = [None] * info.world_size
    if info.distributed:
        torch.distributed.all_gather_object(reports, report)
    else:
        reports = [report]
    if info.is_main:
        Path(args.result).write_text(json.dumps(reports))
    distributed.teardown(info)


def run_mode(mode: str, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    result = folder / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    cmd += [__file__, "--worker", "--mode", mode, "--result", str(result)]
    for flag in ("hidden", "heads", "depth", "single", "steps"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        modes = {mode: run_mode(mode, args, Path(tmp)) for mode in ("ddp", "fsdp")}

    def per_rank(mode: str, key: str) -> int:
        return max(r[key] for r in modes[mode])

    counted = ("param_bytes", "grad_bytes", "optimizer_bytes", "ema_bytes")
    summary = {
        mode: {
            "parameters": modes[mode][0]["parameters"],
            "counted_bytes_per_rank": sum(per_rank(mode, key) for key in counted),
            **{key: per_rank(mode, key) for key in (*counted, "peak_rss_bytes")},
            # FSDP: rank 0 alone builds the whole model; the others hold only their shards
            "build_peak_rss_bytes_by_rank": [r["build_peak_rss_bytes"] for r in modes[mode]],
            "step_s_median": max(r["step_s_median"] for r in modes[mode]),
            "ranks": modes[mode],
        }
        for mode in modes
    }
    out = {
        "benchmark": "transformer training memory per rank: DDP vs FSDP",
        "nproc": args.nproc,
        "model": {k: getattr(args, k) for k in ("hidden", "heads", "depth", "single")},
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        **summary,
        "fsdp_over_ddp_counted": summary["fsdp"]["counted_bytes_per_rank"]
        / summary["ddp"]["counted_bytes_per_rank"],
        "fsdp_over_ddp_peak_rss": summary["fsdp"]["peak_rss_bytes"] / summary["ddp"]["peak_rss_bytes"],
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
