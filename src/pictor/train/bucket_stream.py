"""Aspect-ratio buckets in the training stream (kohya's `--enable_bucket`): which image is stream sample k
when every global micro-batch must hold images of one bucket.

The stream model of `pictor.train.data` stays: sample k is a pure function of (seed, k), and the global
micro-batch at data position p is samples p .. p + G - 1 (G = batch size x processes), split over the
ranks. Per epoch, each bucket's images are shuffled and cut into groups of G, the last group filled up
by wrapping around the bucket's own shuffled list, and the groups shuffled together; the epoch is their
concatenation. Positions advance by G from 0, so every micro-batch is exactly one group, and one bucket.
All of it comes from (seed, epoch), so a resumed run, a run with DataLoader workers and a run on more
processes with the same G see the same samples. A different G is another stream: resuming a bucketed run
with another batch size or number of processes is refused (`check_group`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pictor.data.buckets import Bucket

STREAM_BUCKETS = 4  # a seed stream of its own (pictor.train.data numbers 1 to 3)


class BucketStream:
    """Dataset index of stream sample k, for items in `item_buckets` (one bucket per dataset index) and
    global micro-batches of `group` samples."""

    def __init__(self, item_buckets: Sequence[Bucket], group: int, seed: int) -> None:
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        if not item_buckets:
            raise ValueError("no items to stream")
        self.group, self.seed = group, seed
        by_bucket: dict[Bucket, list[int]] = {}
        for i, bucket in enumerate(item_buckets):
            by_bucket.setdefault((int(bucket[0]), int(bucket[1])), []).append(i)
        # sorted: the order must not depend on the folder's listing order
        self.buckets = {b: np.asarray(by_bucket[b]) for b in sorted(by_bucket)}
        self.epoch_length = group * sum(-(-len(v) // group) for v in self.buckets.values())
        self._cached: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The dataset indices of one epoch, `epoch_length` of them, in stream order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, STREAM_BUCKETS, epoch])
        groups: list[np.ndarray] = []
        for items in self.buckets.values():
            shuffled = items[rng.permutation(len(items))]
            filled = np.resize(shuffled, -(-len(items) // self.group) * self.group)  # wraps around
            groups.extend(filled.reshape(-1, self.group))
        order = np.concatenate([groups[j] for j in rng.permutation(len(groups))])
        self._cached = (epoch, order)
        return order

    def index(self, k: int) -> int:
        epoch, offset = divmod(k, self.epoch_length)
        return int(self.order(epoch)[offset])

    def small_buckets(self) -> dict[Bucket, int]:
        """Buckets with fewer images than a micro-batch: their batches repeat images."""
        return {b: len(v) for b, v in self.buckets.items() if len(v) < self.group}


def folder_view(ds: Any) -> Any:
    """The view of an image folder behind training data `ds` (`pictor.train.data`'s, which holds the
    `ImageFolderDataset` as ``.folder``), looking through wrappers that keep the data they wrap as
    ``.ds`` (such as the reference stage's); None for the shapes world."""
    seen = ds
    while seen is not None:
        inner = getattr(seen, "ds", None)
        if inner is None:  # a wrapper may pass its data's folder through: the view is the innermost
            return seen if getattr(seen, "folder", None) is not None else None
        seen = inner
    return None


def folder_of(ds: Any) -> Any:
    """The image folder (`ImageFolderDataset`) behind training data `ds`, or None (the shapes world)."""
    view = folder_view(ds)
    return view.folder if view is not None else None


def bucket_stream(ds: Any, group: int, seed: int, subset: Sequence[int] | None = None) -> BucketStream | None:
    """The bucketed stream of training data `ds` when it is an image folder on more than one bucket; else
    None, and the stream is the plain per-epoch permutation of `pictor.train.data.stream_index`. With
    `subset` (dataset indices) the stream walks those items, and its indices are positions in `subset`."""
    folder = folder_of(ds)
    if folder is not None and len(getattr(folder, "available_buckets", ())) > 1:
        buckets = folder.item_buckets
        return BucketStream([buckets[i] for i in subset] if subset is not None else buckets, group, seed)
    return None


def check_group(saved: int | None, now: int, position: int) -> str | None:
    """Why a bucketed run cannot resume with global micro-batch `now` (None if it can)."""
    if saved is not None and saved != now:
        return (
            f"this run trained on aspect-ratio buckets with {saved} images per global micro-batch (batch "
            f"size x processes); resuming with {now} would put images of different buckets in one batch: "
            "resume with the run's own --batch-size and number of processes"
        )
    if position % now:
        return (
            f"data position {position} is not a multiple of the global micro-batch {now}: the checkpoint "
            "was not written by a bucketed run of this micro-batch; resume it without --buckets, or start a "
            "new --out"
        )
    return None
