"""The data side of setting up a training run: the side length aspect-ratio buckets are cut to, the warning
for buckets smaller than a micro-batch, and the `--cache-latents` table.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pictor.data.folder import DatasetWarning
from pictor.train.bucket_stream import bucket_stream
from pictor.train.config import TrainConfig
from pictor.train.data import training_items
from pictor.train.stages import find_autoencoder
from pictor.train.t2i import T2IStage

if TYPE_CHECKING:
    from pictor.train.loop import Trainer

__all__ = ["cached_latent_table", "pixel_multiple", "warn_small_buckets"]


def pixel_multiple(cfg: TrainConfig, checkpoint: Path | None) -> int:
    """Image sides the transformer takes: 2x2 patches of latents of the autoencoder's factor. A t2i run's
    autoencoder is its checkpoint's or --autoencoder's (--init's is already the config's), not the
    preset's, and may be deeper or shallower."""
    ae = cfg.autoencoder
    source = checkpoint or (cfg.autoencoder_path if cfg.init is None else None)
    if cfg.stage == "t2i" and source is not None:
        ae = find_autoencoder(source)[0]
    assert ae is not None
    return 2 * 2 ** (len(ae["ch_mult"]) - 1)


def warn_small_buckets(ds: Any, group: int, seed: int) -> None:
    items = training_items(ds)  # held-out images never come; each picture once, whatever its repeats
    stream = bucket_stream(ds, group, seed, None if items is None else np.unique(items))
    small = stream.small_buckets() if stream is not None else {}
    if small:
        names = ", ".join(f"{w}x{h} ({n})" for (w, h), n in small.items())
        warnings.warn(
            f"aspect-ratio buckets with fewer images than a micro-batch ({group}) repeat their images "
            f"within a batch: {names}; a smaller --batch-size avoids it",
            DatasetWarning,
            stacklevel=3,
        )


def cached_latent_table(trainer: Trainer) -> Mapping[tuple[int, bool], torch.Tensor]:
    """--cache-latents: every image (both ways round with --flip-aug) encoded once, then read."""
    from pictor.train.latent_table import build_latent_table

    assert isinstance(trainer.stage, T2IStage)  # TrainConfig.validate allows the cache for these only
    cfg = trainer.cfg
    folder = cfg.latent_cache_dir or str(trainer.out / "latent-cache")
    table, cache = build_latent_table(
        trainer.ds,
        trainer.stage.ae,
        folder,
        both_flips=cfg.flip_aug,
        info=trainer.info,
        amp=trainer.stage.amp,
        progress=cfg.progress and trainer.info.is_main,
    )
    if trainer.info.is_main:
        print(
            f"pictor train: latent cache {folder}: {len(table)} latents ({cache.encoded} encoded here now)",
            file=sys.stderr,
        )
    return table
