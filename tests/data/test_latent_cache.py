from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from pictor.data.buckets import BucketBatchSampler
from pictor.data.folder import DatasetWarning, ImageFolderDataset, collate
from pictor.data.latent_cache import CachedLatentDataset, LatentCache, LatentCacheError

from broken_images import undecodable_png

SIZES = [(64, 64), (40, 40), (96, 48), (100, 50), (48, 96), (50, 90), (70, 70)]


class FakeEncoder:
    """Stands in for an autoencoder: 8x average pooling plus a 4th channel, counting what it sees."""

    def __init__(self, moments: bool = False) -> None:
        self.calls = self.images = 0
        self.moments = moments

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        self.images += x.shape[0]
        pooled = F.avg_pool2d(x, 8)  # [B, 3, H/8, W/8]
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return (mean, torch.full_like(mean, -2.0)) if self.moments else mean


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    return root


def _epoch(cds: CachedLatentDataset, sampler: BucketBatchSampler) -> list[dict]:
    loader = torch.utils.data.DataLoader(cds, batch_sampler=sampler, collate_fn=collate)
    return list(loader)


def test_encodes_each_image_once_across_epochs(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    enc = FakeEncoder()
    cache = LatentCache(tmp_path / "cache", enc, key="ae-v1")
    cds = CachedLatentDataset(ds, cache)
    sampler = BucketBatchSampler(cds.item_buckets, batch_size=2, seed=0)
    first = _epoch(cds, sampler)
    assert enc.images == len(ds) == 7 and enc.calls == len(first)
    assert (cache.misses, cache.hits) == (7, 0)

    def no_pixels(*_a: object, **_k: object) -> torch.Tensor:
        raise AssertionError("a cache hit must not decode the image")

    ds.load_image = no_pixels  # type: ignore[method-assign]
    second = _epoch(cds, sampler)
    assert enc.images == 7 and (cache.misses, cache.hits) == (7, 7)
    assert [b["path"] for b in second] != [b["path"] for b in first]  # a reshuffled epoch, same latents
    for batch in second:
        w, h = batch["bucket"]
        assert batch["latent"].shape == (len(batch["caption"]), 4, h // 8, w // 8)
        assert all(c.startswith("caption ") for c in batch["caption"])


def test_cached_latent_is_the_encoders_output(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    cds = CachedLatentDataset(ds, LatentCache(tmp_path / "c", FakeEncoder(), key="k"))
    ref = FakeEncoder()
    for i in (0, 2, 5):
        item = cds[i]
        assert torch.allclose(item["latent"], ref(ds[i]["image"][None])[0], atol=1e-6)
        assert item["caption"] == f"caption {ds.paths[i].stem}" and item["bucket"] == ds.item_buckets[i]
        assert "image" not in item and "logvar" not in item


def test_entry_ids_encode_misses_read_nothing_and_read_mean_reads_one(folder: Path, tmp_path: Path) -> None:
    """What a training run's latent table keeps: ids, each read from its shard when it is wanted."""
    ds = ImageFolderDataset(folder, size=64)
    enc = FakeEncoder()
    cds = CachedLatentDataset(ds, LatentCache(tmp_path / "c", enc, key="k"))
    ids = cds.entry_ids([0, 2, 5], flip=True)
    assert enc.images == 3 and len(set(ids)) == 3

    def no_reads(*_a: object) -> None:
        raise AssertionError("entry_ids read a stored latent back")

    cds.cache._read = no_reads  # type: ignore[method-assign]
    assert cds.entry_ids([0, 2, 5], flip=True) == ids and enc.images == 3  # hits: neither read nor encoded
    ref = FakeEncoder()
    for i, eid in zip((0, 2, 5), ids, strict=True):
        mirrored = ds.load_image(i, True)
        assert torch.allclose(cds.cache.read_mean(eid), ref(mirrored[None])[0], atol=1e-6)
    for shard in (tmp_path / "c").glob("ae-*/shard-*.safetensors"):
        shard.unlink()  # a shard removed under a running trainer: a clear error, not a KeyError
    with pytest.raises(LatentCacheError, match=r"shard-.*removed or damaged.*--resume"):
        cds.cache.read_mean(ids[0])


def test_persisted_and_keyed_by_autoencoder(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    CachedLatentDataset(ds, LatentCache(tmp_path / "c", FakeEncoder(), key="ae-a")).precompute(batch_size=4)
    again = FakeEncoder()
    cache = LatentCache(tmp_path / "c", again, key="ae-a")  # a new process, same autoencoder
    assert len(cache) == len(ds)
    CachedLatentDataset(ds, cache).precompute()
    assert again.images == 0 and cache.hits == len(ds)
    other = FakeEncoder()
    changed = LatentCache(tmp_path / "c", other, key="ae-b")  # new weights: nothing may be reused
    assert len(changed) == 0
    CachedLatentDataset(ds, changed).precompute()
    assert other.images == len(ds) and changed.misses == len(ds)


def test_changed_file_is_re_encoded(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    enc = FakeEncoder()
    cds = CachedLatentDataset(ds, LatentCache(tmp_path / "c", enc, key="k"))
    cds.precompute()
    before = cds[3]["latent"]
    path = ds.paths[3]
    Image.new("RGB", SIZES[3], (10, 200, 30)).save(path)  # same size on screen, new pixels
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cds.precompute()
    assert enc.images == len(ds) + 1  # only the edited image is encoded again
    assert (cds.cache.misses, cds.cache.hits) == (len(ds) + 1, 1 + len(ds) - 1)
    after = cds[3]["latent"]
    assert not torch.allclose(before, after) and torch.allclose(
        after[1], torch.full_like(after[1], 200 / 127.5 - 1)
    )


def test_sha256_fingerprint_ignores_touch(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    enc = FakeEncoder()
    cds = CachedLatentDataset(ds, LatentCache(tmp_path / "c", enc, key="k", fingerprint="sha256"))
    cds[0]
    os.utime(ds.paths[0], ns=(1, 10**18))  # touched, not changed
    cds[0]
    assert enc.images == 1
    stat_enc = FakeEncoder()
    stat = CachedLatentDataset(ds, LatentCache(tmp_path / "s", stat_enc, key="k"))
    stat[0]
    os.utime(ds.paths[0], ns=(1, 2 * 10**18))
    stat[0]
    assert stat_enc.images == 2  # the stat fingerprint cannot tell a touch from an edit


def test_flip_is_cached_per_item_and_flip(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64, hflip=True, seed=1)
    enc = FakeEncoder()
    cds = CachedLatentDataset(ds, LatentCache(tmp_path / "c", enc, key="k"))
    cds.precompute(batch_size=3)
    assert enc.images == 2 * len(ds)
    ref = FakeEncoder()
    flipped_seen = False
    for epoch in range(4):
        cds.set_epoch(epoch)
        for i in range(len(ds)):
            item = cds[i]
            flipped_seen |= item["flip"]
            expected = ref(ds.load_image(i, flip=item["flip"])[None])[0]
            assert torch.allclose(item["latent"], expected, atol=1e-6)
    assert flipped_seen and enc.images == 2 * len(ds)


@pytest.mark.parametrize("kind", ["tuple", "distribution"])
def test_logvar_is_stored(folder: Path, tmp_path: Path, kind: str) -> None:
    inner = FakeEncoder(moments=True)

    def encode(x: torch.Tensor) -> object:
        mean, logvar = inner(x)
        return (mean, logvar) if kind == "tuple" else SimpleNamespace(mean=mean, logvar=logvar, std=None)

    ds = ImageFolderDataset(folder, size=64)
    cds = CachedLatentDataset(ds, LatentCache(tmp_path / "c", encode, key="k", store_dtype=torch.float16))
    cds.precompute()
    fresh = CachedLatentDataset(ds, LatentCache(tmp_path / "c", encode, key="k"))
    item = fresh[4]
    assert item["latent"].dtype == torch.float16 and item["logvar"].shape == item["latent"].shape
    assert torch.all(item["logvar"] == -2.0) and inner.images == len(ds)


def test_a_batch_of_entries_stored_in_other_dtypes_comes_back_in_one(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    items = [{**ds.item_info(i), "image": ds.load_image(i)} for i in range(4)]
    LatentCache(tmp_path / "c", FakeEncoder(), key="k", store_dtype=torch.float16).get_entries(items[:2])
    full = LatentCache(tmp_path / "c", FakeEncoder(), key="k")  # reads the fp16 two, encodes two in fp32
    entries = full.get_entries(items)
    assert full.hits == 2 and {e["mean"].dtype for e in entries} == {torch.float32}
    half = LatentCache(tmp_path / "c", FakeEncoder(), key="k", store_dtype=torch.float16)
    assert {e["mean"].dtype for e in half.get_entries(items)} == {torch.float16}


def test_shards_are_safetensors_written_atomically(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    cache = LatentCache(tmp_path / "c", FakeEncoder(), key="weights-sha256:abc")
    CachedLatentDataset(ds, cache).precompute(batch_size=2)
    files = sorted(p.name for p in cache.dir.iterdir())
    shards = [f for f in files if f != "key.txt"]
    assert "key.txt" in files and all(f.startswith("shard-") and f.endswith(".safetensors") for f in shards)
    assert len(shards) == 4  # one per batch of new entries: buckets of 3, 2, 2 items in batches of 2
    assert (cache.dir / "key.txt").read_text().strip() == "weights-sha256:abc"
    names = []
    for shard in cache.dir.glob("shard-*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            assert f.metadata()["key"] == "weights-sha256:abc"
            names += list(f.keys())
    assert len(names) == len(ds) and all(n.endswith("/mean") for n in names)
    # A damaged shard is ignored with a warning and its entries are encoded again, not a crash.
    victim = next(cache.dir.glob("shard-*.safetensors"))
    victim.write_bytes(b"garbage")
    enc = FakeEncoder()
    with pytest.warns(UserWarning, match="unreadable shard"):
        again = LatentCache(tmp_path / "c", enc, key="weights-sha256:abc")
    CachedLatentDataset(ds, again).precompute()
    assert 1 <= enc.images <= 2


def test_get_or_encode_direct(tmp_path: Path) -> None:
    enc = FakeEncoder()
    cache = LatentCache(tmp_path / "c", enc, key="k")
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(bytes([i]) * (i + 1))
    imgs = [torch.rand(3, 16, 32) * 2 - 1 for _ in files]
    items = [{"path": f, "bucket": (32, 16), "image": im} for f, im in zip(files, imgs, strict=True)]
    out = cache.get_or_encode([*items, items[0]])  # a repeated item (padded epoch) is encoded once
    assert out.shape == (4, 4, 2, 4) and enc.images == 3 and enc.calls == 1
    assert torch.equal(out[0], out[3])
    assert torch.equal(cache.get_or_encode(items[:1])[0], out[0]) and enc.images == 3
    mixed = [items[0], {"path": files[1], "bucket": (16, 32), "image": torch.zeros(3, 32, 16)}]
    with pytest.raises(ValueError, match="buckets"):
        cache.get_or_encode(mixed)
    assert enc.calls == 2  # get_entries groups by shape; only the new (16, 32) entry was encoded


def test_two_processes_share_a_cache(folder: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(folder, size=64)
    a, b = FakeEncoder(), FakeEncoder()
    rank0 = CachedLatentDataset(ds, LatentCache(tmp_path / "c", a, key="k"))
    rank1 = CachedLatentDataset(ds, LatentCache(tmp_path / "c", b, key="k"))  # opened before rank0 wrote
    rank0.precompute()
    rank1.precompute()
    assert a.images == len(ds) and b.images == 0


def test_an_undecodable_image_takes_a_stand_in_as_in_the_dataset(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200)).save(root / f"ok{i}.png")
    undecodable_png(root / "bad.png")  # first in the folder's order; passes the fast scan
    with pytest.warns(DatasetWarning):  # no captions
        ds = ImageFolderDataset(root, size=32, buckets=False)
    bad = [p.name for p in ds.paths].index("bad.png")
    cds = CachedLatentDataset(ds, LatentCache(tmp_path / "c", FakeEncoder(), key="k"))
    with pytest.warns(DatasetWarning, match=r"cannot decode .*bad\.png.*stands in"):
        item = cds[bad]
    with pytest.warns(DatasetWarning):
        plain = ImageFolderDataset(root, size=32, buckets=False)
    with pytest.warns(DatasetWarning):
        assert item["path"] == plain[bad]["path"] != str(root / "bad.png")  # the dataset's own choice
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # reported once: the file is known broken now
        cds.precompute()  # the whole folder, the bad file included, without stopping
    assert len(cds.cache) == 3
    with pytest.warns(DatasetWarning):
        unseen = ImageFolderDataset(root, size=32, buckets=False)  # has not met the bad file yet
    fresh = CachedLatentDataset(unseen, LatentCache(tmp_path / "d", FakeEncoder(), key="k"))
    with pytest.warns(DatasetWarning, match=r"bad\.png"):
        fresh.precompute()  # meeting the file first while precomputing
    assert len(fresh.cache) == 3
