"""`--cache-latents`: every image of a folder encoded once, before training, and the stream's samples
served from the stored latents instead of the autoencoder (kohya's --cache_latents_to_disk).

The disk side is `pictor.data.latent_cache` (atomic safetensors shards, keyed by the autoencoder's
weights and the precision it ran in, entries by file, size, mtime, bucket and mirror): each rank encodes
its share of what is missing (the i-th training image on rank i mod world size; the held-out images of a
validation split are not encoded), all wait for each other (on a barrier that outlasts NCCL's 10-minute
timeout), then every rank indexes the training images' entries (encoding what it cannot find, when OUT is
not on a shared file system). The table holds entry ids, not latents: a
lookup reads one latent from its memory-mapped shard, so a rank's memory does not grow with the folder
(held in memory, 10,000 FLUX.1 latents at 1024x1024 and their mirrors would be 20 GiB on every rank).
A stream sample looks up the latent of its dataset index and mirror bit; its noise, timestep and
caption are drawn as without the cache, so the losses differ only by the rounding of batched encodes.
The table holds the raw posterior means: the loss applies the autoencoder's scale and shift (which a
t2i run from scratch measures when it starts), so the table does not depend on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from pictor.checkpoint import state_dict_hash
from pictor.data.latent_cache import CachedLatentDataset, LatentCache, read_stored_mean
from pictor.models.autoencoder import AutoEncoder
from pictor.train import distributed, previews
from pictor.train.bucket_stream import folder_of, folder_view
from pictor.train.distributed import DistInfo


class LatentTable(Mapping[tuple[int, bool], Tensor]):
    """(dataset index, mirrored) -> latent mean [C, h, w] in float32, read from its shard on lookup. It
    holds paths and ids only, so DataLoader workers get it cheaply whether they fork or spawn."""

    def __init__(self, ids: dict[tuple[int, bool], tuple[Path, str]]) -> None:
        self.ids = ids  # (dataset index, mirrored) -> (shard, entry id)

    def __getitem__(self, key: tuple[int, bool]) -> Tensor:
        return read_stored_mean(*self.ids[key]).float()

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def build_latent_table(
    ds: Any,
    ae: AutoEncoder,
    cache_dir: str | Path,
    *,
    both_flips: bool,
    info: DistInfo,
    amp: bool,
    progress: bool = False,
    batch_size: int = 16,
) -> tuple[LatentTable, LatentCache]:
    """Encode this rank's share of the folder behind `ds` into `cache_dir` where needed, wait for the
    others, then read it all. Returns the table and the cache (its counters say what this rank encoded)."""
    folder = folder_of(ds)
    if folder is None:
        raise ValueError("--cache-latents needs an image folder as --data")
    device = next(ae.parameters()).device

    @torch.no_grad()
    def encode(x: Tensor) -> tuple[Tensor, Tensor]:
        with previews.autocast(device, amp):  # as the uncached loss encodes
            mean, logvar = ae.encode_moments(x.to(device))
        return mean.float(), logvar.float()

    was_training = ae.training
    ae.eval()
    # bf16 and float32 encodes differ (1e-3 of the loss), so a cache is for one precision
    precision = "bf16" if amp else "fp32"
    cache = LatentCache(cache_dir, encode, key=f"pictor-ae-{state_dict_hash(ae.state_dict())}-{precision}")
    latents = CachedLatentDataset(folder, cache)
    flips = (False, True) if both_flips else (False,)
    # Only the images the stream trains on: a validation split's held-out images are scored by decoding
    # them (pictor.train.validation), so their latents would never be read.
    view = folder_view(ds)
    training = getattr(view, "training", None)
    # (each picture once: with --folder-repeats the training items name a picture once per repeat)
    wanted = list(range(len(folder))) if training is None else sorted({int(i) for i in training})
    try:
        mine = wanted[info.rank :: info.world_size]
        chunks = [(mine[s : s + batch_size], flip) for flip in flips for s in range(0, len(mine), batch_size)]
        for indices, flip in tqdm(chunks, desc="encoding latents", unit="batch", disable=not progress):
            latents.entry_ids(indices, flip)  # encodes what the cache lacks
        distributed.patient_barrier(info)
        ids: dict[tuple[int, bool], tuple[Path, str]] = {}
        for flip in flips:
            for start in range(0, len(wanted), batch_size):
                indices = wanted[start : start + batch_size]
                for i, eid in zip(indices, latents.entry_ids(indices, flip), strict=True):
                    ids[(i, flip)] = (cache.shard_of(eid), eid)
        # A rank that could not see the others' shards (OUT not shared between machines) encoded the rest
        # just now; the others wait here rather than in DDP's first broadcast, under NCCL's timeout.
        distributed.patient_barrier(info)
    finally:
        ae.train(was_training)
    return LatentTable(ids), cache
