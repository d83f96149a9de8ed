"""A disk cache of autoencoder latents, so the autoencoder runs once per image, not once per epoch.

Layout: `cache_dir/ae-<sha256(key)[:16]>/shard-*.safetensors` (+ `key.txt` for people). `key` names the
autoencoder (e.g. its weights hash): a different key is a different folder, so a changed autoencoder can
never read stale latents. Inside, an entry's id hashes (the image's path relative to the dataset root,
its size and mtime_ns, or its content sha256, the bucket, the flip), so an edited file or a new bucket
is a miss and re-encodes; stale entries are merely unused.

Shards are safetensors (never pickle), one per batch of new entries, written to a temporary file, fsynced
and renamed into place, so a crash never leaves a half-written shard. Other processes (DDP ranks) that
share the folder see each other's shards: a miss rescans the folder before encoding.

`encode_fn` takes a float [B, 3, H, W] image batch in [-1, 1] and returns the latent mean [B, C, h, w], or
(mean, logvar), or an object with `.mean` and `.logvar` (diffusers' `latent_dist`). Whatever space it
returns is what is stored: e.g. `lambda x: ae.encode_moments(x.to(dev))` stores raw moments, and the
trainer samples `mean + exp(logvar / 2) * noise` and applies the scale/shift itself.

Use the cache from the main process (DataLoader num_workers=0, or `CachedLatentDataset.precompute()`
before training): the autoencoder should not run inside DataLoader workers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor
from tqdm import tqdm

from pictor.data.folder import UnreadableImageError

FORMAT = "pictor-latent-cache-v1"
T = TypeVar("T")
Entry = dict[str, Tensor]  # {"mean": [C, h, w]} and, when the encoder gives it, "logvar"


class LatentCacheError(RuntimeError):
    """A cache entry that was indexed can no longer be read (its shard removed or damaged)."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _split_output(out: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1]
    if hasattr(out, "mean") and hasattr(out, "logvar"):
        return out.mean, out.logvar
    raise TypeError(f"encode_fn must return a Tensor, (mean, logvar) or a distribution, got {type(out)}")


def read_stored_mean(shard: Path, eid: str) -> Tensor:
    """Entry `eid`'s mean from `shard`: the shard is memory-mapped, so only this tensor is read. A free
    function of plain arguments, so that what calls it pickles into DataLoader workers of any start method."""
    try:
        with safe_open(shard, framework="pt") as f:
            return f.get_tensor(f"{eid}/mean")
    except (OSError, SafetensorError) as exc:
        raise LatentCacheError(
            f"latent cache: {shard} was removed or damaged after it was indexed ({exc}); start again "
            "(pictor train --resume): the cache re-encodes what it no longer holds"
        ) from exc


class LatentCache:
    """get_or_encode(items) -> latent means [B, C, h, w]; every image is encoded at most once per key.

    An item is a mapping with "path", "bucket", optional "rel_path" (preferred in the entry id, so moving
    the dataset folder keeps the cache valid), optional "flip" and "image": a [3, H, W] tensor or a
    zero-argument callable returning one, called only on a miss.
    fingerprint: "stat" (size + mtime_ns, no reading) or "sha256" (content; survives touch and copy).
    store_dtype: e.g. torch.float16 to halve the disk; None keeps the encoder's dtype.
    Counters: hits, misses, encode_calls (calls to encode_fn), encoded (images through encode_fn).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        encode_fn: Callable[[Tensor], Any],
        key: str,
        *,
        fingerprint: Literal["stat", "sha256"] = "stat",
        store_dtype: torch.dtype | None = None,
    ) -> None:
        if not key:
            raise ValueError("key must identify the autoencoder (e.g. its weights hash), got ''")
        if fingerprint not in ("stat", "sha256"):
            raise ValueError(f"fingerprint must be 'stat' or 'sha256', got {fingerprint!r}")
        self.encode_fn, self.key, self.fingerprint, self.store_dtype = (
            encode_fn,
            key,
            fingerprint,
            store_dtype,
        )
        self.dir = Path(cache_dir) / f"ae-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.txt"
        if not key_file.exists():
            _write_atomic(key_file, key.encode() + b"\n")
        self._index: dict[str, Path] = {}  # entry id -> shard holding it
        self._known_shards: set[Path] = set()
        self.hits = self.misses = self.encode_calls = self.encoded = 0
        self.refresh()

    def __len__(self) -> int:
        return len(self._index)

    def refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._known_shards:
                continue
            self._known_shards.add(shard)
            try:
                with safe_open(shard, framework="pt") as f:
                    meta, names = f.metadata() or {}, list(f.keys())
            except Exception as exc:  # a damaged shard costs re-encoding, never the run
                warnings.warn(f"latent cache: ignoring unreadable shard {shard}: {exc}", stacklevel=2)
                continue
            if meta.get("format") != FORMAT or meta.get("key") != self.key:
                warnings.warn(f"latent cache: ignoring {shard}, written for another key/format", stacklevel=2)
                continue
            for name in names:
                self._index[name.split("/", 1)[0]] = shard

    def entry_id(self, item: Mapping[str, Any]) -> str:
        path = Path(item["path"])
        if self.fingerprint == "sha256":
            file_id: list[Any] = ["sha256", _file_sha256(path)]
        else:
            st = path.stat()
            file_id = [item.get("rel_path") or str(path.resolve()), st.st_size, st.st_mtime_ns]
        w, h = item["bucket"]
        record = json.dumps([*file_id, int(w), int(h), bool(item.get("flip", False))])
        return hashlib.sha256(record.encode()).hexdigest()[:32]

    def _read(self, ids: Sequence[str]) -> dict[str, Entry]:
        by_shard: dict[Path, list[str]] = {}
        for eid in ids:
            by_shard.setdefault(self._index[eid], []).append(eid)
        out: dict[str, Entry] = {}
        for shard, eids in by_shard.items():
            with safe_open(shard, framework="pt") as f:
                names = set(f.keys())
                for eid in eids:
                    out[eid] = {
                        k: f.get_tensor(f"{eid}/{k}") for k in ("mean", "logvar") if f"{eid}/{k}" in names
                    }
        return out

    def _write(self, entries: Mapping[str, Entry]) -> None:
        tensors = {f"{eid}/{k}": t for eid, e in entries.items() for k, t in e.items()}
        shard = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        _write_atomic(shard, save(tensors, metadata={"format": FORMAT, "key": self.key}))
        self._known_shards.add(shard)
        self._index.update(dict.fromkeys(entries, shard))

    def _encode(self, images: list[Tensor]) -> list[Entry]:
        with torch.inference_mode():
            mean, logvar = _split_output(self.encode_fn(torch.stack(images)))
        self.encode_calls += 1
        self.encoded += len(images)
        entries = []
        for i in range(len(images)):
            # clone: safetensors refuses tensors that share storage (rows of one batch do).
            e = {"mean": mean[i]} if logvar is None else {"mean": mean[i], "logvar": logvar[i]}
            dtype = self.store_dtype
            entries.append({k: v.detach().to("cpu", dtype or v.dtype).clone() for k, v in e.items()})
        return entries

    def _store_missing(self, items: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, Entry]]:
        """The items' entry ids, after encoding and storing those the cache lacks (returned too)."""
        ids = [self.entry_id(it) for it in items]
        if any(eid not in self._index for eid in ids):
            self.refresh()
        missing = [i for i, eid in enumerate(ids) if eid not in self._index]
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        new: dict[str, Entry] = {}
        groups: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        queued: set[str] = set()
        for i in missing:
            if ids[i] in queued:
                continue  # the same image twice in one batch (a padded epoch): encode it once
            queued.add(ids[i])
            img = items[i]["image"]
            img = img() if callable(img) else img
            groups.setdefault(tuple(img.shape), []).append((i, img))
        for group in groups.values():
            for (i, _), entry in zip(group, self._encode([img for _, img in group]), strict=True):
                new[ids[i]] = entry
        if new:
            self._write(new)
        return ids, new

    def ensure(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        """The items' entry ids, encoding what the cache lacks but reading nothing back (`read_mean`
        reads one entry when it is wanted)."""
        return self._store_missing(items)[0]

    def shard_of(self, eid: str) -> Path:
        """The shard that holds stored entry `eid`."""
        return self._index[eid]

    def read_mean(self, eid: str) -> Tensor:
        """One stored entry's mean (see `read_stored_mean`)."""
        return read_stored_mean(self._index[eid], eid)

    def get_entries(self, items: Sequence[Mapping[str, Any]]) -> list[Entry]:
        """One entry per item, in order; misses are encoded (one encode_fn call per image shape)."""
        ids, new = self._store_missing(items)
        found = self._read([eid for eid in dict.fromkeys(ids) if eid not in new])
        found.update(new)
        entries = [found[eid] for eid in ids]
        dtypes = {t.dtype for e in entries for t in e.values()}
        if len(dtypes) > 1:  # entries written by caches that stored other dtypes: one batch, one dtype
            common = self.store_dtype or functools.reduce(torch.promote_types, dtypes)
            entries = [{k: t.to(common) for k, t in e.items()} for e in entries]
        return entries

    def get_or_encode(self, items: Sequence[Mapping[str, Any]]) -> Tensor:
        """Latent means for a one-bucket batch, stacked to [B, C, h, w]."""
        means = [e["mean"] for e in self.get_entries(items)]
        if len({tuple(m.shape) for m in means}) > 1:
            raise ValueError("items span several buckets; use get_entries, or batch with BucketBatchSampler")
        return torch.stack(means)


class CachedLatentDataset(torch.utils.data.Dataset):
    """A dataset of latents: wraps an `ImageFolderDataset`-like dataset (len, item_info(i) with path,
    bucket, flip; load_image(i, flip)) and a `LatentCache`. Pixels are decoded only on a cache miss.

    Items: dict(latent [C, h, w] (the mean), caption, path, rel_path, bucket, flip, and logvar when
    stored). `__getitems__` fetches a whole batch with one encode call, and DataLoader uses it with a
    batch_sampler. `item_buckets` is the wrapped dataset's, for `BucketBatchSampler`.
    """

    def __init__(self, dataset: Any, cache: LatentCache) -> None:
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def item_buckets(self) -> list[tuple[int, int]]:
        return self.dataset.item_buckets

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _items(self, indices: Iterable[int], flips: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        return [self._item(i, None if flips is None else flips[n]) for n, i in enumerate(indices)]

    def _item(self, i: int, flip: bool | None) -> dict[str, Any]:
        if hasattr(self.dataset, "stand_ins"):  # a file already known not to decode: its stand-in at once
            i = next(iter(self.dataset.stand_ins(i)), i)
        info = self.dataset.item_info(i)
        if flip is not None:
            info["flip"] = flip
        failed: list[UnreadableImageError] = []

        def load(i: int = i, f: bool = info["flip"]) -> Tensor:
            try:
                return self.dataset.load_image(i, f)
            except UnreadableImageError as exc:
                failed.append(exc)  # the item learns which file failed, for `_entries`
                raise

        info["image"], info["_index"], info["_failed"] = load, i, failed
        return info

    def _entries(self, items: list[dict[str, Any]]) -> list[Entry]:
        """The cache's entries for `items`; an item whose file does not decode takes the next decodable
        item of its bucket instead (`ImageFolderDataset.stand_ins`), as the dataset itself does."""
        return self._stored(items, self.cache.get_entries)

    def _stored(self, items: list[dict[str, Any]], fetch: Callable[[list[dict[str, Any]]], T]) -> T:
        """`fetch(items)` (the cache's entries or ids), replacing undecodable items by stand-ins."""
        while True:
            try:
                return fetch(items)
            except UnreadableImageError:
                if not hasattr(self.dataset, "stand_ins"):
                    raise
                for n, info in enumerate(items):
                    if info["_failed"]:
                        self.dataset.mark_broken(info["_index"], info["_failed"][0])
                        stand_in = next(iter(self.dataset.stand_ins(info["_index"])), None)
                        if stand_in is None:
                            raise
                        items[n] = self._item(stand_in, info["flip"])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        items = self._items(indices)
        out = []
        for info, entry in zip(items, self._entries(items), strict=True):
            del info["_index"], info["_failed"]
            del info["image"]
            info["latent"] = entry["mean"]
            if "logvar" in entry:
                info["logvar"] = entry["logvar"]
            out.append(info)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def means(self, indices: Sequence[int], flip: bool = False) -> list[Tensor]:
        """The latent means of items `indices`, mirrored if `flip` (whatever the dataset's own flips),
        encoding any the cache lacks."""
        items = self._items(indices, [flip] * len(indices))
        return [entry["mean"] for entry in self._entries(items)]

    def entry_ids(self, indices: Sequence[int], flip: bool = False) -> list[str]:
        """The cache's entry ids for items `indices`, mirrored if `flip`, encoding any the cache lacks
        but reading none (an undecodable file's id is its stand-in's): for `LatentCache.read_mean`."""
        return self._stored(self._items(indices, [flip] * len(indices)), self.cache.ensure)

    def precompute(
        self, batch_size: int = 16, both_flips: bool | None = None, progress: bool = False
    ) -> None:
        """Encode every item ahead of training, batch by batch within each bucket. both_flips (default:
        whether the dataset flips) also caches the mirrored latents, so later epochs never encode."""
        if both_flips is None:
            both_flips = bool(getattr(self.dataset, "hflip", False))
        flips = [False, True] if both_flips else [False]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.item_buckets):
            by_bucket.setdefault(tuple(b), []).append(i)
        jobs = [
            (idx[s : s + batch_size], flip)
            for idx in by_bucket.values()
            for flip in flips
            for s in range(0, len(idx), batch_size)
        ]
        if progress:
            jobs = tqdm(jobs, desc="encoding latents", unit="batch")
        for idx, flip in jobs:
            self._entries(self._items(idx, [flip] * len(idx)))
