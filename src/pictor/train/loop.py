"""The training loop shared by both stages: accumulation, clipping, AMP, EMA, logs, checkpoints, resume.

One optimizer step:
    reseed every RNG from (seed, step)        nothing depends on what ran before or on wall time
    lr <- schedule(step)
    grad_accum micro-batches: loss / grad_accum, backward (DDP syncs on the last one only)
    clip the gradient norm, AdamW step, EMA update
    log (rank 0), then checkpoint / sample grid / eval at their cadence

Resuming restores the raw weights, the EMA, the optimizer, the RNG states, the step and the data
position, so a run killed at any moment continues with bit-identical losses (on the same device and
number of threads).
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pictor.checkpoint import UnreadableFileError
from pictor.data.folder import DatasetWarning
from pictor.models.controlnet import FluxControlNet
from pictor.models.flux import Flux
from pictor.notices import PictorWarning
from pictor.train import distributed, run_outputs
from pictor.train.bucket_stream import check_group
from pictor.train.config import TrainConfig
from pictor.train.data import (
    ImageCaptionDataset,
    data_change,
    data_fingerprint,
    default_workers,
    make_dataset,
    micro_batches,
)
from pictor.train.ema import EMA, ShardedEMA, meta_copy
from pictor.train.epochs import with_epochs
from pictor.train.logs import RunLog
from pictor.train.optim import build_optimizer, lr_at, set_lr
from pictor.train.run_data import cached_latent_table, pixel_multiple, warn_small_buckets
from pictor.train.stages import AutoencoderStage, Stage
from pictor.train.state import clean_leftovers, find_latest, read_checkpoint, restore
from pictor.train.t2i import T2IStage


def build_stage(
    cfg: TrainConfig, ds: ImageCaptionDataset, info: distributed.DistInfo, resume: Path | None
) -> Stage:
    if cfg.stage == "autoencoder":
        return AutoencoderStage(cfg, ds, info)
    return T2IStage(cfg, ds, info, resume)


LOCK_FILE = ".lock"  # kept: an flock on it marks the run folder in use
_DAMAGED = "the newest checkpoint is damaged: move its folder away to resume from the one before"


class TrainingError(ValueError):
    """The run cannot go on (a non-finite loss, an output folder in use); the message says why."""


@dataclass
class TrainResult:
    out: Path
    step: int
    final: Path
    loss: float
    resumed_from: int


def seed_everything(seed: int, step: int) -> None:
    """Per-step seeds: whatever draws from a global RNG (dropout, a library) is a function of the step."""
    s = int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint32)[0])
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, resume: bool = False) -> None:
        self.cfg, self.info, self.device = cfg, info, info.device
        if cfg.fsdp and not info.distributed:
            raise TrainingError(
                "--fsdp shards the model over torchrun's processes: run under torchrun --nproc_per_node N "
                "(N >= 2), or drop --fsdp"
            )
        self.out = Path(cfg.out)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_leftovers(self.out)
        distributed.barrier(info)
        latest = find_latest(self.out)
        if latest is not None and not resume:
            raise TrainingError(
                f"{self.out} already holds checkpoints ({latest.name}); pass --resume to continue that "
                "run, or choose another --out"
            )
        try:
            ckpt = read_checkpoint(latest) if latest is not None else None
        except UnreadableFileError as exc:
            raise TrainingError(f"{exc}; {_DAMAGED}") from exc

        assert cfg.image_size is not None
        self.ds = make_dataset(
            cfg.data,
            cfg.image_size,
            cfg.seed,
            caption_ext=cfg.caption_ext,
            flip=cfg.flip_aug,
            shuffle_caption=cfg.caption_shuffle,
            keep_tokens=cfg.keep_tokens,
            tag_dropout=cfg.caption_tag_dropout,
            buckets=cfg.buckets,
            validation_split=cfg.validation_split,
            control_dir=cfg.control_dir,
            control_metadata=cfg.control == "metadata",
            repeat_folders=cfg.folder_repeats,
            loss_mask="alpha" if cfg.alpha_mask else "folder" if cfg.mask_dir is not None else None,
            mask_dir=cfg.mask_dir,
            multiple=pixel_multiple(cfg, ckpt.path if ckpt else None) if cfg.buckets else 16,
        )
        cfg, epochs = with_epochs(cfg, self.ds, info.world_size)  # --max-epochs, --save-every-epochs
        self.cfg = cfg
        if epochs is not None and info.is_main:
            print(f"pictor train: {epochs}", file=sys.stderr, flush=True)
        self.data_print = data_fingerprint(self.ds)
        if cfg.buckets and info.is_main:
            warn_small_buckets(self.ds, cfg.batch_size * info.world_size, cfg.seed)
        resume_path = ckpt.path if ckpt else None
        if cfg.stage == "lora":
            from pictor.train.lora import LoRAStage  # builds on the t2i stage

            self.stage: Stage = LoRAStage(cfg, self.ds, info, resume_path)
        elif cfg.stage == "layout":
            from pictor.train.layout import LayoutStage  # builds on the LoRA stage's frozen base

            self.stage = LayoutStage(cfg, self.ds, info, resume_path)
        elif cfg.stage == "reference":
            from pictor.train.reference import ReferenceStage  # likewise, with image prompts

            self.stage = ReferenceStage(cfg, self.ds, info, resume_path)
        elif cfg.stage == "controlnet":
            from pictor.train.controlnet import ControlNetStage  # likewise, with control pictures

            self.stage = ControlNetStage(cfg, self.ds, info, resume_path)
        else:
            self.stage = build_stage(cfg, self.ds, info, resume_path)
        self.ds = self.stage.ds  # a stage may pair its data with more (the reference stage's pictures)
        self.latents = cached_latent_table(self) if cfg.cache_latents else None
        self.model = self.stage.module
        assert cfg.ema_decay is not None
        self.ema: EMA | ShardedEMA
        if cfg.fsdp:  # the EMA is sharded as the weights are; rank 0 gathers it to sample, eval and write
            assert isinstance(self.stage, T2IStage)  # TrainConfig.resolve allows --fsdp for t2i only
            skeleton = meta_copy(self.model)
            distributed.shard(self.model, self.stage.shard_units(), self.device)
            self.ema = ShardedEMA(self.model, skeleton, cfg.ema_decay, cfg.ema_warmup)
        else:
            self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        self.optimizer = build_optimizer(self.model, cfg)
        self.step, self.position, self.elapsed = 0, 0, 0.0
        if ckpt is not None:
            try:
                restore(ckpt, self.model, self.optimizer)
                self.ema.load(self.stage.ema_weights(ckpt.path))
            except UnreadableFileError as exc:  # a file cut short or corrupt (not a config mismatch)
                raise TrainingError(f"{exc}; {_DAMAGED}") from exc
            self.step = ckpt.step
            self.position = int(ckpt.state["data_position"])
            saved_optimizer = ckpt.state.get("config", {}).get("optimizer", "adamw")
            if saved_optimizer != cfg.optimizer:
                raise TrainingError(
                    f"{ckpt.path}: this run's optimizer state is {saved_optimizer}'s; resume with "
                    f"--optimizer {saved_optimizer}, or start a new --out"
                )
            self._check_buckets(ckpt.state)
            change = data_change(ckpt.state.get("data"), self.data_print)
            if change and info.is_main:
                warnings.warn(change, DatasetWarning, stacklevel=2)
            saved_precision = ckpt.state.get("precision")  # absent in checkpoints written before it was kept
            if saved_precision not in (None, self.stage.precision) and info.is_main:
                warnings.warn(
                    f"this run trained in {saved_precision} and resumes in {self.stage.precision} "
                    f"(--mixed-precision {cfg.mixed_precision} on {self.device.type}), so its loss curve "
                    "will differ from an uninterrupted run's (and --cache-latents encodes its latents "
                    "again, as a cache is for one precision); --mixed-precision "
                    f"{'bf16' if saved_precision == 'bf16' else 'no'} keeps {saved_precision}",
                    PictorWarning,
                    stacklevel=2,
                )
            self.elapsed = float(ckpt.state.get("elapsed", 0.0))
        self.resumed_from = self.step
        if cfg.compile and self.device.type == "cuda" and hasattr(self.model, "compile"):
            self.model.compile()  # after the EMA copy: the shadow module stays a plain one
        for module in self.stage.forward_module.modules():  # the trained model, the frozen base, a ControlNet
            if isinstance(module, Flux | FluxControlNet):
                module.gradient_checkpointing = cfg.gradient_checkpointing
        # FSDP already reduces gradients in its hooks; otherwise DDP (or nothing, on one process).
        # --module-dropout leaves adapters out of a step (kohya's): DDP must not wait for their gradients.
        self.forward = (
            self.stage.forward_module
            if cfg.fsdp
            else distributed.wrap(self.stage.forward_module, info, unused=cfg.module_dropout > 0)
        )

    def _check_buckets(self, state: dict[str, Any]) -> None:
        """A bucketed run resumes only with the global micro-batch its stream was cut into."""
        if not self.cfg.buckets:
            return
        saved = state.get("config", {})
        group = int(saved.get("batch_size", 0)) * int(state.get("world_size", 1))
        now = self.cfg.batch_size * self.info.world_size
        refusal = check_group(group if saved.get("buckets") else None, now, self.position)
        if refusal:
            raise TrainingError(f"--resume: {refusal}")

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        workers = cfg.num_workers if cfg.num_workers is not None else default_workers(self.device)
        batches = micro_batches(
            self.ds,
            cfg.seed,
            self.position,
            cfg.batch_size,
            info.rank,
            info.world_size,
            workers,
            self.stage.draws(),
            self.latents,
        )
        global_batch = cfg.global_batch(info.world_size)
        log = (
            RunLog(self.out, self.step, cfg.max_steps, cfg.progress, f"train {cfg.stage}")
            if info.is_main
            else None
        )
        started = time.perf_counter() - self.elapsed
        deadline = None if cfg.max_minutes is None else time.perf_counter() + 60.0 * cfg.max_minutes
        loss_value = math.nan
        stopped_by = "max_steps"
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                self.step += 1
                seed_everything(cfg.seed, self.step)
                lr = lr_at(self.step, cfg)
                set_lr(self.optimizer, lr)
                sums: dict[str, torch.Tensor] = {}
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    with distributed.no_sync(self.forward, skip=micro < cfg.grad_accum - 1):
                        loss, extras = self.stage.loss(self.forward, batch)
                        (loss / cfg.grad_accum).backward()
                    for key, value in {"loss": loss.detach(), **extras}.items():
                        sums[key] = sums.get(key, 0) + value.float() / cfg.grad_accum
                self.position += global_batch
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
                grad_norm = distributed.full_tensor(grad_norm)  # a DTensor under FSDP
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                after = self.stage.after_step()  # --scale-weight-norms: the same numbers on every rank
                self.ema.update(self.model, self.step)
                means = distributed.mean(torch.stack(list(sums.values())), info).tolist()
                values = dict(zip(sums, means, strict=True))
                loss_value = values["loss"]
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"step {self.step}: loss is {loss_value}; lower --lr or raise warmup_steps, and "
                        "resume from the last checkpoint"
                    )
                now = time.perf_counter()
                if log is not None:
                    record = {
                        "step": self.step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "images_per_s": global_batch / max(now - t0, 1e-9),
                        "time": now - started,
                        **{k: v for k, v in values.items() if k != "loss"},
                        **after,
                    }
                    log.step(record)
                self.elapsed = now - started
                self._periodic(log)
                if deadline is not None and self._out_of_time(deadline):
                    if info.is_main:
                        print(
                            f"pictor train: stopped at step {self.step} of {cfg.max_steps}: "
                            f"--max-minutes {cfg.max_minutes:g} reached; --resume continues",
                            file=sys.stderr,
                        )
                    stopped_by = "max_minutes"
                    break
            self.save()  # the end of the run is always a checkpoint (a no-op if this step has one)
            with self.ema.whole(keep=info.is_main) as ema:  # every rank: under FSDP a gather
                final = run_outputs.write_final(self, ema)
                run_outputs.write_summary(self, loss_value, stopped_by, ema)
        finally:
            if log is not None:
                log.close()
        return TrainResult(self.out, self.step, final, loss_value, self.resumed_from)

    def _out_of_time(self, deadline: float) -> bool:
        """Whether any rank is past the deadline: all ranks must stop at the same step or DDP hangs."""
        late = torch.tensor([1.0 if time.perf_counter() >= deadline else 0.0], device=self.device)
        return bool(distributed.mean(late, self.info).item() > 0)

    def _periodic(self, log: RunLog | None) -> None:
        cfg, step = self.cfg, self.step
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()
        sample = bool(cfg.sample_every) and step % cfg.sample_every == 0
        evaluate = bool(cfg.eval_every) and step % cfg.eval_every == 0
        if not (sample or evaluate):
            return
        # Rank 0 samples and evaluates; every rank enters whole() (under FSDP it gathers the EMA's shards).
        with self.ema.whole(keep=log is not None, device=self.device) as ema:
            if ema is None or log is None:
                return
            if sample:
                self.samples(ema)
            if evaluate:
                result = self.stage.evaluate(ema)
                if result is not None:
                    log.eval({"step": step, **result})

    # -- outputs (`pictor.train.run_outputs`) -----------------------------------------------------------

    def save(self) -> Path | None:
        """Checkpoint this step (rank 0 writes; every rank waits so none runs ahead of a half-written one)."""
        return run_outputs.save(self)

    def samples(self, ema: nn.Module) -> Path:
        return run_outputs.samples(self, ema)


@contextmanager
def run_lock(out: Path, hold: bool) -> Iterator[None]:
    """One training process per run folder (rank 0's): a second `--resume` of a run still going would
    write the same checkpoints, and its clean-up would delete the first one's half-written ones. An flock,
    so a run killed even by SIGKILL leaves no stale lock behind."""
    if not hold:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise TrainingError(
                f"{out} is in use by a training run still going ({holder}); wait for it to end, or "
                "choose another --out"
            ) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            yield
        finally:
            # Explicitly: DataLoader workers forked during the run share this open file, and would
            # otherwise keep the folder locked after a failure until they exit.
            fcntl.flock(f, fcntl.LOCK_UN)


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Run (or, with resume, continue) a training run described by `cfg` (resolved here if needed)."""
    cfg = cfg.resolve()
    info = distributed.setup(cfg.device)
    with run_lock(Path(cfg.out), info.is_main):
        result = Trainer(cfg, info, resume).run()  # a failure leaves without teardown (see there)
    distributed.teardown(info)
    return result
