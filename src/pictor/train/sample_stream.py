"""Stream sample k: which dataset item it is, which rank's micro-batch takes it, and the random numbers
that belong to it (noise, timestep, caption dropout), all pure functions of (run seed, k).

Separate from `pictor.train.data` because this is the determinism contract of the data stream (see that
module's docstring), which the stages, the loop and the batches rely on without building a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pictor.flow import sample_t

# Separate seed streams, so that e.g. the noise of sample k is unrelated to its caption-dropout draw.
STREAM_TRAIN = 1
STREAM_HOLDOUT = 2
STREAM_AUGMENT = 3  # a stream of its own: augmenting leaves a sample's noise and timestep as they were
# Held-out items of an infinite dataset (previews, latent statistics) come from far beyond any run.
HOLDOUT_OFFSET = 10**12


class ImageCaptionDataset(Protocol):
    """What the trainer needs: ``ds[i] -> (uint8 [H, W, 3], caption, spec_or_metadata)``.

    Infinite datasets (the shapes world) define no ``__len__``; finite ones (image folders) do, and the
    stream walks them epoch by epoch in a seeded order.
    """

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, Any]: ...


def dataset_length(ds: ImageCaptionDataset) -> int | None:
    try:
        return len(ds)  # type: ignore[arg-type]
    except TypeError:
        return None


def stream_index(ds_len: int | None, k: int, seed: int) -> int:
    """Dataset index of stream sample k: identity for infinite data, a seeded permutation per epoch else."""
    if ds_len is None:
        return k
    epoch, offset = divmod(k, ds_len)
    perm = np.random.default_rng([seed, STREAM_TRAIN, epoch]).permutation(ds_len)
    return int(perm[offset])


def holdout_index(ds_len: int | None, i: int) -> int:
    """Items for previews and statistics: far outside the training stream, or the first of a folder."""
    return HOLDOUT_OFFSET + i if ds_len is None else i % ds_len


def sample_generator(seed: int, k: int, stream: int = STREAM_TRAIN) -> torch.Generator:
    """A CPU generator for the random numbers of stream sample k (well mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, stream, k]).generate_state(1, np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state) & ((1 << 63) - 1))


def rank_indices(position: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Stream indices of this rank's micro-batch at data position `position`.

    The global micro-batch is position .. position + batch_size * world_size - 1; rank r takes every
    world_size-th of them starting at r, so ranks never share a sample and together cover all.
    """
    return [position + rank + world_size * j for j in range(batch_size)]


@dataclass(frozen=True)
class SampleDraws:
    """The random numbers of one sample, drawn from its own generator in a fixed order: caption dropout
    (t2i), timestep (t2i), then Gaussian noise of `noise_shape`. A pure function of (seed, k), evaluated
    in the data loader's workers so the training process does not spend time on it."""

    seed: int
    noise_shape: tuple[int, ...]
    timesteps: bool = False
    caption_dropout: float = 0.0
    t_kind: str = "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0  # "shift" / "flux_shift" timesteps: see pictor.flow.sample_t
    # Pixels per latent: with it, the noise takes each image's own latent size (aspect-ratio buckets);
    # noise_shape's first entry is the latent channels. 0: always noise_shape.
    latent_factor: int = 0

    def __call__(self, k: int, image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        g = sample_generator(self.seed, k)
        shape = self.noise_shape
        if self.latent_factor and image_hw is not None:
            shape = (shape[0], image_hw[0] // self.latent_factor, image_hw[1] // self.latent_factor)
        out = {}
        if self.timesteps:
            out["drop"] = torch.rand(1, generator=g) < self.caption_dropout
            out["t"] = sample_t(
                1,
                self.t_kind,  # type: ignore[arg-type]
                generator=g,
                mean=self.t_mean,
                std=self.t_std,
                shift=self.t_shift,
            )
        out["noise"] = torch.randn(shape, generator=g)
        return out
