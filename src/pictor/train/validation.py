"""The validation loss of `--validation-split`: the flow loss on the held-out images at fixed timesteps
and fixed noise, so that one number per eval says how well the model fits images it never trained on,
comparable across evals, resumes and runs with the same seed (the SD3 paper's measure of training).

Each held-out image is scored at VALIDATION_TIMESTEPS (the midpoints of four equal bins of [0, 1], so
easy and hard noise levels weigh alike, whatever the run's training timestep distribution), with noise
drawn from its own generator (seed, STREAM_VALIDATION, image, timestep), its full caption and no mirror.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pictor.train.data import Batch, sample_generator, to_tensor
from pictor.train.holdout_split import STREAM_VALIDATION

VALIDATION_TIMESTEPS = (0.125, 0.375, 0.625, 0.875)


@torch.no_grad()
def validation_loss(stage: Any, fwd: nn.Module, ds: Any, indices: np.ndarray, batch_size: int = 16) -> dict:
    """{"val_loss": mean flow loss, "val_images": n} of `stage.loss` through `fwd` on items `indices`."""
    factor = stage.ae.params.downsample_factor
    channels = stage.ae.params.z_channels
    cases: dict[tuple[int, ...], list[tuple[np.ndarray, str, int, int]]] = {}
    for index in indices.tolist():
        image, caption, _ = ds[index]
        for j in range(len(VALIDATION_TIMESTEPS)):
            cases.setdefault(tuple(image.shape), []).append((image, caption, index, j))
    total, count = 0.0, 0
    was_training = fwd.training
    fwd.eval()  # no adapter dropout while measuring
    try:
        total, count = _score(stage, fwd, cases, batch_size, factor, channels)
    finally:
        fwd.train(was_training)
    return {"val_loss": total / count, "val_images": len(indices)}


def _score(
    stage: Any,
    fwd: nn.Module,
    cases: dict[tuple[int, ...], list[tuple[np.ndarray, str, int, int]]],
    batch_size: int,
    factor: int,
    channels: int,
) -> tuple[float, int]:
    total, count = 0.0, 0
    for shape, items in cases.items():  # batches of one size: buckets give images of several
        noise_shape = (channels, shape[0] // factor, shape[1] // factor)
        for start in range(0, len(items), batch_size):
            part = items[start : start + batch_size]
            noise = torch.stack(
                [
                    torch.randn(
                        noise_shape,
                        generator=sample_generator(stage.cfg.seed, index * 16 + j, STREAM_VALIDATION),
                    )
                    for _, _, index, j in part
                ]
            )
            draws = {
                "drop": torch.zeros(len(part), dtype=torch.bool),
                "t": torch.tensor([VALIDATION_TIMESTEPS[j] for *_, j in part], dtype=torch.float32),
                "noise": noise,
            }
            batch = Batch(to_tensor([p[0] for p in part]), [p[1] for p in part], [p[2] for p in part], draws)
            loss, _ = stage.loss(fwd, batch)
            total += float(loss) * len(part)
            count += len(part)
    return total, count
