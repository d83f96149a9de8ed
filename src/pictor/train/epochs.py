"""Epochs, for people who count in them (kohya's --max_train_epochs, --save_every_n_epochs).

pictor's training data is a stream (`pictor.train.data`): sample k is a pure function of (seed, k), and an
epoch is the stream's period over an image folder, every kept picture its repeats times (and, with
buckets, each bucket filled up to whole micro-batches). A step takes batch size x processes x gradient
accumulation samples, so `--max-epochs N` is the first step at or past N epochs of samples, and
`--save-every-epochs E` a checkpoint cadence of E epochs, rounded up to whole steps. The run itself still
counts steps: its LR schedule, checkpoints, logs and resumes are the step-counted ones, and the numbers are
worked out again from the folder at each start, so a resume after the folder changed follows the folder.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pictor.train.bucket_stream import bucket_stream
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import dataset_length, training_items


def epoch_samples(ds: Any, group: int, seed: int) -> int | None:
    """Samples in one epoch of the training stream over `ds` with global micro-batches of `group` samples;
    None for endless data (the shapes world)."""
    subset = training_items(ds)
    length = len(subset) if subset is not None else dataset_length(ds)
    if length is None:
        return None
    stream = bucket_stream(ds, group, seed, subset)
    return stream.epoch_length if stream is not None else length


def with_epochs(cfg: TrainConfig, ds: Any, world_size: int) -> tuple[TrainConfig, str | None]:
    """`cfg` with max_steps and save_every worked out from its max_epochs and save_every_epochs over `ds`
    (unchanged without them), and a line for the log that says how."""
    if cfg.max_epochs is None and cfg.save_every_epochs is None:
        return cfg, None
    group = cfg.batch_size * world_size
    samples = epoch_samples(ds, group, cfg.seed)
    if samples is None:
        raise ConfigError(
            "--max-epochs / --save-every-epochs: the shapes world is endless and has no epochs; give "
            "--max-steps and --save-every instead"
        )
    per_step = group * cfg.grad_accum
    changes: dict[str, int] = {}
    if cfg.max_epochs is not None:
        changes["max_steps"] = math.ceil(cfg.max_epochs * samples / per_step)
    if cfg.save_every_epochs is not None:
        changes["save_every"] = math.ceil(cfg.save_every_epochs * samples / per_step)
    parts = [f"{name} {value}" for name, value in changes.items()]
    note = (
        f"an epoch is {samples} samples, {samples / per_step:g} steps of {per_step} (batch "
        f"{cfg.batch_size} x {world_size} process(es) x grad-accum {cfg.grad_accum}): {', '.join(parts)}"
    )
    return dataclasses.replace(cfg, **changes), note
