"""Aspect-ratio buckets: a fixed set of (w, h) shapes of about the same area, and a batch sampler that
keeps every batch inside one bucket (as in NovelAI's and kohya's trainers).

Training on buckets instead of square crops keeps whole subjects in frame for wide and tall images, while
each batch still stacks into one tensor. Buckets are (width, height) tuples everywhere in this package;
tensors are [C, H, W].

`BucketBatchSampler` is deterministic per (seed, epoch), sharded across ranks, and resumable at the exact
batch: its state is (epoch, position) and the order of an epoch never depends on where it was resumed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pictor.notices import PictorWarning

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(base: int, multiple: int = 16, max_ratio: float = 2.0) -> list[Bucket]:
    """Buckets with w*h ~= base**2, both sides multiples of `multiple`, long/short side <= max_ratio.

    Built from the landscape side and mirrored, so the set is symmetric: (w, h) in it <=> (h, w) in it.
    Sorted by aspect ratio w/h, tallest first. `multiple` is the model's pixel multiple (e.g. 2 x the
    autoencoder's downsample factor, so the latent packs into 2x2 patches)."""
    if base <= 0 or multiple <= 0:
        raise ValueError(f"base and multiple must be positive, got base={base}, multiple={multiple}")
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio is long side / short side, so it must be >= 1, got {max_ratio}")
    area = base * base
    square = max(multiple, round(base / multiple) * multiple)
    found: set[Bucket] = {(square, square)}
    # h runs over the short side of landscape buckets; w is the multiple that keeps the area nearest.
    for h in range(multiple, square + 1, multiple):
        w = max(multiple, round(area / h / multiple) * multiple)
        if w >= h and w / h <= max_ratio + 1e-9:
            found.update({(w, h), (h, w)})
    return sorted(found, key=lambda b: b[0] / b[1])


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to width/height (in log space, so 2:1 and 1:2 are
    equally far from 1:1). Ties go to the earlier bucket."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def cover_crop(size: tuple[int, int], bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where `resize_to_bucket` takes an image of `size` (w, h): the resized size and the crop box in it."""
    bw, bh = bucket
    w, h = size
    scale = max(bw / w, bh / h)
    # ceil, so rounding never leaves the resized image a pixel short of the bucket.
    nw, nh = max(bw, math.ceil(w * scale - 1e-6)), max(bh, math.ceil(h * scale - 1e-6))
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return (nw, nh), (left, top, left + bw, top + bh)


# Past this many times the bucket's area, the cover resize is not made whole (a 16x20000 strip would grow
# to 256x320000, 330 MB, for one 256x256 item): only the part the crop keeps is resized.
_WHOLE_RESIZE_LIMIT = 4


def resize_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize so the image covers the bucket (keeping its aspect), then crop the centre to exactly it."""
    resized, crop = cover_crop(image.size, bucket)
    if resized[0] * resized[1] > _WHOLE_RESIZE_LIMIT * bucket[0] * bucket[1]:
        sx, sy = image.width / resized[0], image.height / resized[1]
        box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
        return image.resize(bucket, Image.Resampling.LANCZOS, box=box)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    return image.crop(crop)


class BucketBatchSampler:
    """Batches of dataset indices where every batch holds one bucket only.

    dataset_buckets[i] is item i's bucket. Per epoch: each bucket's indices are shuffled, cut into
    batches, and the batches shuffled together, all from (seed, epoch) only. Ranks take every
    world_size-th batch of that one global list, so shards are disjoint and, together, complete.

    drop_last=True drops each bucket's short tail batch and trims the batch count to a multiple of
    world_size (shards stay disjoint, some items sit out the epoch). drop_last=False keeps every item and,
    like torch's DistributedSampler, repeats the first batches so that every rank gets the same number of
    batches: DDP hangs when ranks disagree on that.

    Iterating yields the rest of the current epoch from `position`, then moves to the next epoch, so a
    trainer that never calls `set_epoch` still gets a fresh order each epoch. `state_dict()` taken after
    consuming k batches and loaded into a new sampler resumes at batch k+1 of the same order. With a
    prefetching DataLoader (num_workers > 0) the sampler runs ahead of the training loop, maybe into the
    next epoch: pass how many batches the loop actually took since this sampler was made, loaded or moved
    to another epoch by `set_epoch`, `state_dict(consumed=k)`.
    """

    def __init__(
        self,
        dataset_buckets: Sequence[Bucket],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.item_buckets = [tuple(b) for b in dataset_buckets]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches of this rank's current epoch already handed out
        if drop_last:
            counts: dict[tuple[int, ...], int] = {}
            for b in self.item_buckets:
                counts[b] = counts.get(b, 0) + 1
            small = {b: n for b, n in sorted(counts.items()) if n < batch_size}
            if small:
                names = ", ".join(f"{'x'.join(map(str, b))} ({n})" for b, n in small.items())
                warnings.warn(
                    f"{sum(small.values())} items never train: with drop_last their buckets hold fewer "
                    f"than batch size {batch_size}: {names}; lower the batch size or use drop_last=False",
                    PictorWarning,
                    stacklevel=2,
                )
        self._start = (0, 0)  # (epoch, position) that `state_dict(consumed=k)` counts from

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. Re-selecting the current epoch keeps the position, so a resumed
        trainer that calls set_epoch(e) at the top of its loop does not lose its place."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        if epoch != self._start[0]:  # a loop that sets each epoch counts `consumed` within it
            self._start = (epoch, 0)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches for `epoch`, before sharding and padding."""
        rng = np.random.default_rng([self.seed, epoch])
        by_bucket: dict[tuple[int, ...], list[int]] = {}
        for i, b in enumerate(self.item_buckets):
            by_bucket.setdefault(b, []).append(i)
        batches: list[list[int]] = []
        for b in sorted(by_bucket):  # sorted: the order must not depend on dict insertion history
            idx = np.asarray(by_bucket[b])
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size].tolist()
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`, in order."""
        batches = self.global_batches(epoch)
        n, ws = len(batches), self.world_size
        if self.drop_last:
            batches = batches[: n - n % ws]
        elif n % ws and n:
            pad = ws - n % ws
            batches = batches + [batches[j % n] for j in range(pad)]
        return batches[self.rank :: ws]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank, and for every epoch)."""
        return len(self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            # Count before yielding: once the consumer holds batch k, the state says k were consumed.
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self, consumed: int | None = None, position: int | None = None) -> dict[str, Any]:
        """Where to resume: after the batches handed out so far, or after `consumed` batches counted from
        where this sampler was made, loaded or set (the loop's own count, behind a prefetching loader).
        `position` (the older form) is a count within the sampler's current epoch: wrong once a
        prefetching loader has run the sampler into the next one, which `consumed` allows for."""
        epoch, pos = self.epoch, self.position if position is None else position
        per_epoch = len(self.rank_batches(epoch))  # the same for every epoch
        if consumed is not None and per_epoch:
            epoch, pos = divmod(self._start[0] * per_epoch + self._start[1] + consumed, per_epoch)
        if pos >= per_epoch:
            epoch, pos = epoch + 1, 0  # a finished epoch resumes at the start of the next
        return {
            "epoch": epoch,
            "position": pos,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "num_items": len(self.item_buckets),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at (epoch, position). The position only means the same data if the seed, batch size,
        world size and dataset are unchanged; strict raises when they differ, otherwise it warns."""
        mine = self.state_dict()
        diff = [
            f"{k}: saved {state[k]!r}, now {mine[k]!r}"
            for k in ("seed", "batch_size", "world_size", "drop_last", "num_items")
            if k in state and state[k] != mine[k]
        ]
        if diff:
            msg = "sampler state does not match this sampler, so the resumed order differs: " + "; ".join(
                diff
            )
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._start = (self.epoch, self.position)
