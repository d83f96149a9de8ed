"""Benchmarks that run each variant in a fresh process (so its memory is its own), shared by bench_fp8.py
and bench_training_memory.py: the parent's loop over the variants, the worker's measure of memory and time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _memory import RssSampler, rss_now
from safetensors.torch import load_file, save_file


def parse_args(doc: str, runs: Sequence[str], repeats: int, hidden: Sequence[str] = ()) -> argparse.Namespace:
    """The flags of these benchmarks (a FLUX.1-width model of --double + --single blocks), and the hidden
    ones the parent passes to each worker (``hidden``: a benchmark's own, e.g. where its files are)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (1024: a 512x512 picture)")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", choices=runs, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    for flag in hidden:
        ap.add_argument(f"--{flag}", help=argparse.SUPPRESS)
    return ap.parse_args()


# The settings every worker of these benchmarks gets from the parent.
SHARED_FLAGS = ("device", "double", "single", "tokens", "repeats", "threads")


def run_each(
    script: str, runs: Sequence[str], args: argparse.Namespace, flags: Sequence[str] = SHARED_FLAGS
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Each run in a fresh process of ``script`` with ``flags`` copied from ``args``: its printed numbers and
    the tensor it saved (its output, for the accuracy columns)."""
    numbers: dict[str, dict[str, Any]] = {}
    saved: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            save = str(Path(tmp) / f"{run}.safetensors")
            cmd = [sys.executable, script, "--worker", "--run", run, "--save", save]
            for flag in flags:
                cmd += [f"--{flag}", str(getattr(args, flag))]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            numbers[run] = json.loads(done.stdout.strip().splitlines()[-1])
            saved[run] = load_file(save)["out"]
            print(f"{run}: {numbers[run]}", file=sys.stderr)
    return numbers, saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{float((a - b).norm() / b.norm()):.3g}")


def measure(
    step: Callable[[], torch.Tensor], repeats: int, device: torch.device, save: str, model: torch.nn.Module
) -> None:
    """One warm-up call of ``step`` and ``repeats`` timed ones; prints the worker's JSON line and saves the
    last output. Memory counts from before the first call: a warm-up's freed memory would stay in the
    allocator's pool and hide the call's own rise (CPU: resident set polled every millisecond; CUDA:
    max_memory_allocated)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_now()
    seconds = []
    with RssSampler() as rss:
        out = step()  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            out = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    save_file({"out": out.detach().float().cpu().contiguous()}, save)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "weights_gb": round(weights / 1e9, 3),
                "peak_gb": round(peak / 1e9, 3),
                "rise_gb": round((peak - before) / 1e9, 3),
                "seconds": round(statistics.median(seconds), 2),
            }
        )
    )


def emit(result: dict[str, Any], out: str | None) -> None:
    """Print the benchmark's JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
