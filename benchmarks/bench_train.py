"""Training throughput of `pictor train` on a preset (default shapes-small): images/s, and on CUDA the
model FLOPs utilization. Prints one JSON object.

Each stage runs the real training loop (`pictor.train.loop.Trainer`) for `--warmup + --steps` optimizer
steps into a temporary folder, with checkpoints, samples and evals off. The autoencoder stage runs first;
its (barely trained) output feeds the t2i stage, so nothing is downloaded or needs to exist beforehand.
Step times come from the run's own log.jsonl (each step ends with a device sync when its loss is read);
the first `--warmup` steps are dropped and the median of the rest is reported.

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward
of the TRAINED module on one image (matmuls, convolutions and attention, exactly), times the images per
second. The frozen parts of a t2i step (autoencoder encode, text encoder) are reported separately and not
counted in the MFU, as is customary. Peak bf16 dense FLOP/s: from `--peak-tflops`, else looked up by the
GPU's name (H100/H200 SXM 989, A100 312).

`--mixed-precision no,bf16` runs each stage once per setting, side by side in one report (on a CPU with
AMX or AVX-512 BF16, bf16 autocast is what `pictor train --mixed-precision bf16` uses there).

    python benchmarks/bench_train.py [--stage both|autoencoder|t2i] [--preset shapes-small]
        [--batch-size 8] [--steps 6] [--warmup 2] [--device cpu|cuda] [--compile] [--workers N]
        [--mixed-precision auto|bf16|no[,...]]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pictor.models.flux import make_img_ids, make_txt_ids
from pictor.train import distributed
from pictor.train.config import TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import Trainer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def count_flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def trained_flops_per_image(trainer: Trainer) -> dict[str, int]:
    """Forward + backward FLOPs of the trained module for one image (and frozen-part FLOPs for t2i)."""
    stage, cfg = trainer.stage, trainer.cfg
    size = int(cfg.image_size or 64)
    device = trainer.device
    x = torch.zeros(1, 3, size, size, device=device)
    if stage.name == "autoencoder":
        fwd = stage.forward_module
        f = stage.module.params.downsample_factor
        noise = torch.zeros(1, stage.module.params.z_channels, size // f, size // f, device=device)
        return {"trained": count_flops(lambda: sum(t.sum() for t in fwd(x, noise)).backward())}
    ae, text, model = stage.ae, stage.text, stage.module
    f = ae.params.downsample_factor
    h = size // f
    frozen = count_flops(lambda: (ae.encode(x), text.encode(["a red circle"])))
    emb = text.encode(["a red circle"])
    img = torch.zeros(1, (h // 2) ** 2, model.params.in_channels, device=device)
    args = (img, make_img_ids(1, h, h, device), emb.tokens, make_txt_ids(1, emb.tokens.shape[1], device))
    t, y = torch.full((1,), 0.5, device=device), emb.pooled
    trained = count_flops(lambda: model(*args, t, y).sum().backward())
    model.zero_grad(set_to_none=True)
    return {"trained": trained, "frozen": frozen}


def bench_stage(
    cfg: TrainConfig, info: distributed.DistInfo, warmup: int, peak: float | None
) -> dict[str, Any]:
    started = time.perf_counter()
    trainer = Trainer(cfg.resolve(), info)
    build_s = time.perf_counter() - started
    flops = trained_flops_per_image(trainer)
    trainer.model.zero_grad(set_to_none=True)
    trainer.run()
    log = read_jsonl(Path(cfg.out) / "log.jsonl")[warmup:]
    step_s = statistics.median(cfg.global_batch() / r["images_per_s"] for r in log)
    images_per_s = cfg.global_batch() / step_s
    n_params = sum(p.numel() for p in trainer.model.parameters())
    result: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "timed_steps": len(log),
        "step_s_median": round(step_s, 4),
        "images_per_s": round(images_per_s, 2),
        "trained_params": n_params,
        "train_flops_per_image": flops["trained"],
        "achieved_tflops": round(flops["trained"] * images_per_s / 1e12, 3),
        "build_s": round(build_s, 2),
        "last_loss": round(log[-1]["loss"], 4),
    }
    if "frozen" in flops:
        result["frozen_flops_per_image"] = flops["frozen"]
    if peak:
        result["mfu"] = round(flops["trained"] * images_per_s / (peak * 1e12), 4)
    return result


def cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("both", "autoencoder", "t2i"), default="both")
    parser.add_argument("--preset", default="shapes-small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=None, help="data loader processes")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--autoencoder", default=None, help="t2i: use this AE instead of a fresh one")
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        help="auto, bf16 or no; a comma list (no,bf16) measures each, side by side",
    )
    args = parser.parse_args()
    precisions = [p.strip() for p in args.mixed_precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("auto", "bf16", "no")]
    if bad or not precisions:
        parser.error(f"--mixed-precision: {bad or 'nothing'} is not auto, bf16 or no")
    if args.threads:
        torch.set_num_threads(args.threads)

    info = distributed.setup(args.device)
    peak = peak_tflops(info.device, args.peak_tflops)
    report: dict[str, Any] = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_tflops": peak,
    }
    common = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "max_steps": args.warmup + args.steps,
        "warmup_steps": 1,
        "save_every": 0,
        "sample_every": 0,
        "eval_every": 0,
        "progress": False,
        "device": args.device,
        "num_workers": args.workers,
        "compile": args.compile,
    }
    for precision in precisions:
        results: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            ae = args.autoencoder
            run = {**common, "mixed_precision": precision}
            if args.stage in ("both", "autoencoder") or ae is None:
                cfg = TrainConfig(stage="autoencoder", out=f"{tmp}/ae", **run)
                results["autoencoder"] = bench_stage(cfg, info, args.warmup, peak)
                ae = f"{tmp}/ae"
            if args.stage in ("both", "t2i"):
                cfg = TrainConfig(
                    stage="t2i", out=f"{tmp}/t2i", autoencoder_path=ae, latent_stats_images=64, **run
                )
                results["t2i"] = bench_stage(cfg, info, args.warmup, peak)
        if len(precisions) == 1:
            report.update(results, mixed_precision=precision)
        else:
            report[f"mixed_precision={precision}"] = results
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
