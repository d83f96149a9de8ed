"""One rank's micro-batches of the stream: the DataLoader view whose item k is stream sample k (image or
cached latent, caption, draws, layout, reference and control picture, loss mask), the batch sampler that
walks this rank's indices from a data position on, and the collation into a `Batch`.

Separate from `pictor.train.data` because it is the loader side of the stream (workers, collation,
tensors), while that module builds the datasets the stream reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pictor.train.bucket_stream import bucket_stream, folder_view
from pictor.train.sample_stream import (
    ImageCaptionDataset,
    SampleDraws,
    dataset_length,
    rank_indices,
    stream_index,
)
from pictor.train.stream_augment import Augment


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> uint8 [B, 3, H, W] (converted to float on the device, 4x less copying)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [-1, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


class Batch:
    """One rank's micro-batch: images uint8 [B, 3, H, W] (None when cached latents stand for them),
    captions, the stream index of each sample, and its random numbers stacked (e.g. draws["noise"]
    [B, ...], draws["t"] [B], draws["drop"] [B] bool)."""

    def __init__(
        self,
        images: torch.Tensor | None,
        captions: list[str],
        indices: list[int],
        draws: dict[str, torch.Tensor] | None = None,
        layouts: list[list[dict[str, Any]] | None] | None = None,
        references: torch.Tensor | None = None,
        reference_captions: list[str] | None = None,
        controls: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.captions = captions
        self.indices = indices
        self.draws = draws or {}
        # Per sample: the image's boxes with phrases where the data knows them (the shapes world), else None.
        self.layouts = layouts if layouts is not None else [None] * len(indices)
        # uint8 [B, 3, H, W]: each sample's reference picture, where the data pairs one with each image
        # (the reference stage's data), and a caption of each; else None.
        self.references = references
        self.reference_captions = reference_captions
        # uint8 [B, 3, H, W]: each sample's control picture where the data has them (a ControlNet's folder
        # with --control-dir), cropped and mirrored with its image; else None.
        self.controls = controls

    def __len__(self) -> int:
        return len(self.indices)


# (image (None when a cached latent stands for it), caption, stream index, random draws, layout or None,
# (reference picture, its caption) or None, control picture or None)
_Reference = tuple[np.ndarray | None, str]  # the picture is None when its cached latent stands for it
_Item = tuple[
    np.ndarray | None,
    str,
    int,
    dict[str, torch.Tensor],
    list[dict[str, Any]] | None,
    _Reference | None,
    np.ndarray | None,
]


class _StreamItems(Dataset):
    """Map-style view of the stream for DataLoader workers: item k is stream sample k."""

    def __init__(
        self,
        ds: ImageCaptionDataset,
        seed: int,
        draws: SampleDraws | None,
        group: int = 1,
        latents: Mapping[tuple[int, bool], torch.Tensor] | None = None,
    ) -> None:
        self.ds, self.seed, self.len, self.draws = ds, seed, dataset_length(ds), draws
        self.latents = latents  # --cache-latents: (dataset index, mirrored) -> latent mean
        # With the cache, a folder's samples are described rather than decoded (the folder view and the
        # reference stage's pairs both describe their items; the shapes world has no cache).
        self.describe = getattr(ds, "describe", None) if latents is not None else None
        self.augment = augmentation(ds)
        # --validation-split: the stream walks the training items only (dataset indices), else all.
        self.subset = training_items(ds)
        # Bucketed folder data: each global micro-batch (`group` samples) is one bucket's images.
        self.buckets = bucket_stream(ds, group, seed, self.subset)

    def __getitem__(self, k: int) -> _Item:
        length = len(self.subset) if self.subset is not None else self.len
        j = self.buckets.index(k) if self.buckets is not None else stream_index(length, k, self.seed)
        index = int(self.subset[j]) if self.subset is not None else j
        if self.describe is not None:
            image, (hw, caption, meta) = None, self.describe(index)
        else:
            image, caption, meta = self.ds[index]
            hw = image.shape[:2]
        layout = meta.get("layout") if isinstance(meta, dict) else None
        reference = meta.get("reference") if isinstance(meta, dict) else None
        control = meta.pop("control", None) if isinstance(meta, dict) else None
        mask = meta.pop("mask", None) if isinstance(meta, dict) else None  # uint8 [1, H, W]
        if self.augment is not None and self.augment.mirrors(self.seed, k):  # mirrored with the image, below
            control = np.ascontiguousarray(control[:, ::-1]) if control is not None else None
            mask = mask.flip(-1) if mask is not None else None
        if self.augment is not None:
            # The reference picture (the reference stage's) stays as it is: like the shapes world's
            # pairs, it then carries what is in the image rather than where.
            image, caption, layout = self.augment(self.seed, k, image, caption, layout)
        draws = self.draws(k, hw) if self.draws is not None else {}
        if mask is not None:  # a micro-batch is one bucket's, so the masks stack like the noise
            draws["mask"] = mask
        if self.latents is not None:
            mirrored = self.augment.mirrors(self.seed, k) if self.augment is not None else False
            draws["latent"] = self.latents[(index, mirrored)]
            if reference is not None:  # a folder's reference picture is its image, never mirrored
                draws["reference_latent"] = self.latents[(index, False)]
        return image, caption, k, draws, layout, reference, control


def training_items(ds: ImageCaptionDataset) -> np.ndarray | None:
    """The dataset indices the training stream walks when a validation split holds some out, else None."""
    view = folder_view(ds)
    return view.training if view is not None else None


def validation_items(ds: ImageCaptionDataset) -> np.ndarray | None:
    """The dataset indices a validation split holds out of training (--validation-split), else None."""
    view = folder_view(ds)
    return view.validation if view is not None else None


def augmentation(ds: ImageCaptionDataset) -> Augment | None:
    """The augmentation `make_dataset` gave the data (looking through a stage's wrappers, such as the
    reference stage's ReferencePairs), or None when there is none."""
    view = folder_view(ds)
    return view.augment if view is not None else None


def _collate(items: list[_Item]) -> Batch:
    draws = {key: torch.cat([i[3][key].unsqueeze(0) for i in items]) for key in items[0][3]}
    if "t" in draws:
        draws["t"], draws["drop"] = draws["t"].reshape(-1), draws["drop"].reshape(-1)
    images = [i[0] for i in items if i[0] is not None]
    if images and len(images) != len(items):
        raise ValueError("a micro-batch mixed decoded images with cached latents; that is a pictor bug")
    return Batch(
        to_tensor(images) if images else None,
        [i[1] for i in items],
        [i[2] for i in items],
        draws,
        [i[4] for i in items],
        *_references([i[5] for i in items]),
        _controls([i[6] for i in items]),
    )


def _controls(controls: list[np.ndarray | None]) -> torch.Tensor | None:
    """The batch's control pictures, where every sample has one."""
    if all(c is None for c in controls):
        return None
    if any(c is None for c in controls):
        raise ValueError(
            "a micro-batch mixed samples with and without control pictures; that is a pictor bug"
        )
    return to_tensor([c for c in controls if c is not None])


def _references(refs: list[_Reference | None]) -> tuple[torch.Tensor | None, list[str] | None]:
    """The batch's reference pictures and captions; no pictures when cached latents stand for them."""
    if any(r is None for r in refs):
        return None, None
    pairs = [r for r in refs if r is not None]
    pictures = [picture for picture, _ in pairs if picture is not None]
    if pictures and len(pictures) != len(pairs):
        raise ValueError("a micro-batch mixed reference pictures with cached latents; that is a pictor bug")
    return (to_tensor(pictures) if pictures else None), [caption for _, caption in pairs]


class _MicroBatches:
    """Batch sampler: this rank's index lists from a data position on, forever (order is fixed)."""

    def __init__(self, position: int, batch_size: int, rank: int, world_size: int) -> None:
        self.position, self.batch_size, self.rank, self.world_size = position, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.position
        while True:
            yield rank_indices(pos, self.batch_size, self.rank, self.world_size)
            pos += self.batch_size * self.world_size


def micro_batches(
    ds: ImageCaptionDataset,
    seed: int,
    position: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    draws: SampleDraws | None = None,
    latents: Mapping[tuple[int, bool], torch.Tensor] | None = None,
) -> Iterator[Batch]:
    """This rank's micro-batches from `position` on. Workers prefetch, but DataLoader keeps the order, so
    the stream is the same with any number of workers. With `latents` (--cache-latents) each sample's
    draws carry its stored latent mean as "latent"."""
    loader = DataLoader(
        _StreamItems(ds, seed, draws, batch_size * world_size, latents),
        batch_sampler=_MicroBatches(position, batch_size, rank, world_size),
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=False,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return iter(loader)
