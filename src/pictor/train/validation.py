"""The validation loss of `--validation-split`: the flow loss on the held-out images at fixed timesteps
and fixed noise, so that one number per eval says how well the model fits images it never trained on,
comparable across evals, resumes and runs with the same seed (the SD3 paper's measure of training).

Each held-out image is scored at VALIDATION_TIMESTEPS (the midpoints of four equal bins of [0, 1], so
easy and hard noise levels weigh alike, whatever the run's training timestep distribution), with noise
drawn from its own generator (seed, STREAM_VALIDATION, image, timestep), its full caption and no mirror,
and what the stage conditions on besides: its layout (layout stage), its reference picture (reference
stage; a folder's image is its own reference) or its control picture (a ControlNet's, read with the
data), so an adapter is measured on the task it learns; with loss masks (`pictor.data.loss_masks`), under
its mask, as it would train, and with the run's loss type (`--loss-type`), as kohya's validation is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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
    cases: dict[tuple[int, ...], list[_Case]] = {}
    for index in indices.tolist():
        image, caption, meta = ds[index]
        meta = meta if isinstance(meta, dict) else {}
        for j in range(len(VALIDATION_TIMESTEPS)):
            case = _Case(
                image,
                caption,
                index,
                j,
                meta.get("layout"),
                meta.get("reference"),
                meta.get("control"),
                meta.get("mask"),
            )
            cases.setdefault(tuple(image.shape), []).append(case)
    total, count = 0.0, 0
    was_training = fwd.training
    fwd.eval()  # no adapter dropout while measuring
    try:
        total, count = _score(stage, fwd, cases, batch_size, factor, channels)
    finally:
        fwd.train(was_training)
    return {"val_loss": total / count, "val_images": len(indices)}


class _Case(NamedTuple):
    """One held-out image at one of the VALIDATION_TIMESTEPS (number j), with its conditions."""

    image: np.ndarray
    caption: str
    index: int
    j: int
    layout: list[dict[str, Any]] | None
    reference: tuple[np.ndarray, str] | None
    control: np.ndarray | None
    mask: torch.Tensor | None  # uint8 [1, H, W]: the loss mask, where the data has them


def _score(
    stage: Any,
    fwd: nn.Module,
    cases: dict[tuple[int, ...], list[_Case]],
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
                        generator=sample_generator(stage.cfg.seed, c.index * 16 + c.j, STREAM_VALIDATION),
                    )
                    for c in part
                ]
            )
            draws = {
                "drop": torch.zeros(len(part), dtype=torch.bool),
                "t": torch.tensor([VALIDATION_TIMESTEPS[c.j] for c in part], dtype=torch.float32),
                "noise": noise,
            }
            if all(c.mask is not None for c in part):
                draws["mask"] = torch.stack([c.mask for c in part])  # type: ignore[misc]
            references = [c.reference for c in part if c.reference is not None]
            batch = Batch(
                to_tensor([c.image for c in part]),
                [c.caption for c in part],
                [c.index for c in part],
                draws,
                [c.layout for c in part],
                to_tensor([r[0] for r in references]) if len(references) == len(part) else None,
                [r[1] for r in references] if len(references) == len(part) else None,
                to_tensor([c.control for c in part]) if all(c.control is not None for c in part) else None,
            )
            loss, parts = stage.loss(fwd, batch)
            # The flow loss alone: a stage with a loss of its own besides (the reference adapter's direct
            # loss, which ignores noise and timestep) reports that in training, not here, so val_loss means
            # the same in every stage.
            total += float(parts.get("flow_loss", loss)) * len(part)
            count += len(part)
    return total, count
