from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.data.buckets import BucketBatchSampler, assign_bucket, make_buckets, resize_to_bucket
from pictor.data.folder import DatasetWarning, ImageFolderDataset, UnreadableImageError, collate, to_rgb

from broken_images import undecodable_png

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another: shows where a rotation or crop moved things."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return Image.fromarray(arr)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _halves(96, 48).save(root / "wide.png")
    (root / "wide.txt").write_text("  a wide red and blue image \n", encoding="utf-8")
    _noise(40, 80).save(root / "sub" / "tall.jpg", quality=95)
    (root / "sub" / "tall.txt").write_text("a tall photo", encoding="utf-8")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.save(root / "sub" / "clear.png")
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    pal.save(root / "sub" / "deeper" / "pal.bmp")
    Image.new("L", (20, 20), 128).save(root / "grey.webp", lossless=True)
    # EXIF orientation 6: stored 60x30 (red left), shown rotated 90 degrees clockwise as 30x60 (red on top).
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves(60, 30).save(root / "rotated.jpg", quality=95, exif=exif)
    # Broken ones.
    (root / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    _noise(8, 8).save(root / "tiny.png")
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    _noise(64, 64).save(root / "cut.png")
    data = (root / "cut.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    _noise(64, 64, seed=1).save(root / "cut.jpg", quality=90)
    data = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    _noise(32, 32).save(root / ".hidden" / "ignored.png")  # hidden folders are not scanned
    (root / "orphan.txt").write_text("a caption without an image", encoding="utf-8")
    return root


def _load(root: Path, **kw) -> ImageFolderDataset:
    with pytest.warns(DatasetWarning):
        return ImageFolderDataset(root, **kw)


def _by_name(ds: ImageFolderDataset) -> dict[str, int]:
    return {p.name: i for i, p in enumerate(ds.paths)}


def test_scan_skips_and_reports_broken_files(folder: Path) -> None:
    with pytest.warns(DatasetWarning) as rec:
        ds = ImageFolderDataset(folder, size=64)
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert set(reasons) == {"corrupt.jpg", "tiny.png", "dot.png", "cut.png", "cut.jpg"}
    assert reasons["corrupt.jpg"].startswith("unreadable")
    assert reasons["tiny.png"] == "too small: 8x8 < 16 px"
    assert reasons["dot.png"] == "too small: 1x1 < 16 px"
    assert "truncated" in reasons["cut.jpg"]
    assert reasons["cut.png"].startswith("truncated")
    skip_msgs = [str(w.message) for w in rec if "skipped" in str(w.message)]
    assert len(skip_msgs) == 1 and skip_msgs[0].startswith("5 images skipped")
    assert "dot.png: too small" in skip_msgs[0]
    assert sorted(_by_name(ds)) == [
        "clear.png",
        "grey.webp",
        "pal.bmp",
        "rotated.jpg",
        "tall.jpg",
        "wide.png",
    ]


def test_skip_report_lists_first_few_only(tmp_path: Path) -> None:
    for i in range(8):
        Image.new("RGB", (4, 4)).save(tmp_path / f"small{i}.png")
    _noise(32, 32).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    with pytest.warns(DatasetWarning, match=r"8 images skipped[\s\S]*and 3 more"):
        ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 1 and len(ds.skipped) == 8


def test_check_modes(folder: Path) -> None:
    fast = _load(folder)
    assert [p for p, _ in _load(folder, check="decode").skipped] == [p for p, _ in fast.skipped]
    # Header-only scanning trusts the truncated files; loading one then fails naming the file.
    lax = _load(folder, check="header")
    names = _by_name(lax)
    assert "cut.jpg" in names and "cut.png" in names and "corrupt.jpg" not in names
    with pytest.raises(UnreadableImageError, match=r"cannot decode .*cut\.png"):
        lax.load_image(names["cut.png"])
    # As an item it is not fatal: the next decodable image of its bucket stands in, reported once.
    with pytest.warns(DatasetWarning, match=r"cut\.png.*stands in") as rec:
        item = lax[names["cut.png"]]
        again = lax[names["cut.png"]]
    assert len(rec) == 1
    assert item["path"] == again["path"] != str(folder / "cut.png")
    assert item["bucket"] == lax.item_buckets[names["cut.png"]]


def test_empty_folder_and_bad_metadata_lines(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no usable images"):
        ImageFolderDataset(tmp_path)
    _noise(20, 20).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "ok"}\nnot json\n{"text": "x"}\n'
    )
    with pytest.warns(DatasetWarning, match="2 metadata.jsonl lines ignored") as rec:
        ds = ImageFolderDataset(tmp_path)
    assert ds.captions == ["ok"] and rec[0].filename == __file__


def test_decompression_bomb_guard_stays_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _noise(40, 40).save(tmp_path / "big.png")
    _noise(10, 10).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 px > 2 * 500: Pillow raises
    with pytest.warns(DatasetWarning):
        ds = ImageFolderDataset(tmp_path, min_side=4)
    assert [Path(p).name for p, _ in ds.skipped] == ["big.png"]
    assert ds.skipped[0][1].startswith("decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == 500  # the dataset did not switch the guard off


def test_captions_txt_and_missing(folder: Path) -> None:
    with pytest.warns(DatasetWarning) as rec:
        ds = ImageFolderDataset(folder)
    by = _by_name(ds)
    assert ds.captions[by["wide.png"]] == "a wide red and blue image"
    assert ds.captions[by["tall.jpg"]] == "a tall photo"
    assert ds[by["clear.png"]]["caption"] == ""
    assert sorted(Path(p).name for p in ds.missing_captions) == [
        "clear.png",
        "grey.webp",
        "pal.bmp",
        "rotated.jpg",
    ]
    assert any(str(w.message).startswith("4 images in") and "no caption" in str(w.message) for w in rec)


def test_captions_metadata_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("a/one.png", "two.png", "three.png"):
        _noise(20, 20).save(tmp_path / name)
    (tmp_path / "three.txt").write_text("from the txt", encoding="utf-8")
    lines = [
        {"file_name": "a/one.png", "text": "first"},
        {"file_name": "two.png", "caption": "second", "extra": 1},
        {"file_name": "three.png", "text": "metadata wins"},
        {"file_name": "gone.png", "text": "no such file, ignored"},
    ]
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8"
    )
    ds = ImageFolderDataset(tmp_path)  # nothing missing, nothing broken: no warning expected
    caps = {ds.rel_path(i): c for i, c in enumerate(ds.captions)}
    assert caps == {"a/one.png": "first", "two.png": "second", "three.png": "metadata wins"}
    assert ds.skipped == [] and ds.missing_captions == []


def test_items_shapes_range_and_modes(folder: Path) -> None:
    ds = _load(folder, size=64)
    for i in range(len(ds)):
        item = ds[i]
        w, h = item["bucket"]
        assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        assert item["bucket"] in ds.available_buckets and w % 16 == 0 and h % 16 == 0
        assert item["path"] == str(ds.paths[i])
    by = _by_name(ds)
    assert ds.item_buckets[by["wide.png"]][0] > ds.item_buckets[by["wide.png"]][1]
    assert ds.item_buckets[by["tall.jpg"]][0] < ds.item_buckets[by["tall.jpg"]][1]
    assert torch.allclose(ds[by["clear.png"]]["image"], torch.ones(1))  # transparent -> white
    pal = ds[by["pal.bmp"]]["image"]
    assert torch.allclose(pal[:, 4, 4], torch.tensor([-1.0, 1.0, -1.0]))  # palette green, not index 0
    grey = ds[by["grey.webp"]]["image"]
    assert torch.allclose(grey, torch.full_like(grey, 128 / 127.5 - 1), atol=1e-6)


def test_exif_orientation_applied(folder: Path) -> None:
    ds = _load(folder, size=64)
    i = _by_name(ds)["rotated.jpg"]
    assert ds.sizes[i] == (30, 60)  # the scan already reports the displayed size
    w, h = ds.item_buckets[i]
    assert h > w  # stored landscape, shown portrait
    img = ds[i]["image"]
    top, bottom = img[:, : h // 4].mean(dim=(1, 2)), img[:, -h // 4 :].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < -0.8  # red on top: rotated 90 degrees clockwise
    assert bottom[2] > 0.8 and bottom[0] < -0.8


def test_exif_orientation_png(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display: the red left half goes to the bottom
    _halves(60, 30).save(tmp_path / "r.png", exif=exif)
    (tmp_path / "r.txt").write_text("r", encoding="utf-8")
    ds = ImageFolderDataset(tmp_path, size=64)
    assert ds.sizes == [(30, 60)] and ds.item_buckets == [(48, 80)]
    img = ds[0]["image"]
    assert img[0, -10:].mean() > 0.9 and img[2, :10].mean() > 0.9


def test_no_buckets_gives_square(folder: Path) -> None:
    ds = _load(folder, size=32, buckets=False)
    assert set(ds.item_buckets) == {(32, 32)}
    wide = ds[_by_name(ds)["wide.png"]]["image"]
    assert wide.shape == (3, 32, 32)
    # 96x48 -> covers 32x32 at 64x32, centre crop keeps columns 16..48: half red, half blue.
    assert torch.allclose(wide[:, :, :15].mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
    assert torch.allclose(wide[:, :, 17:].mean(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)


def test_hflip_is_deterministic_per_epoch(folder: Path) -> None:
    ds = _load(folder, size=64, hflip=True, seed=3)
    flips0 = [ds.flip_for(i) for i in range(len(ds))]
    assert flips0 == [ds.flip_for(i) for i in range(len(ds))]
    epochs = []
    for e in range(6):
        ds.set_epoch(e)
        epochs.append([ds.flip_for(i) for i in range(len(ds))])
    assert (
        len({tuple(f) for f in epochs}) > 1
        and any(any(f) for f in epochs)
        and not all(all(f) for f in epochs)
    )
    i = _by_name(ds)["wide.png"]
    e = next(e for e, f in enumerate(epochs) if f[i])
    ds.set_epoch(e)
    item = ds[i]
    assert item["flip"] and torch.equal(item["image"], ds.load_image(i).flip(-1))
    assert not ImageFolderDataset.__init__.__kwdefaults__["hflip"]  # off by default


# -- buckets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "multiple", "max_ratio"), [(64, 16, 2.0), (256, 16, 2.0), (512, 64, 4.0)])
def test_make_buckets(base: int, multiple: int, max_ratio: float) -> None:
    buckets = make_buckets(base, multiple, max_ratio)
    assert (base, base) in buckets and len(buckets) >= 3
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert max(w / h, h / w) <= max_ratio
        # Nearest multiple on one side keeps the area within one strip of `multiple` of base^2.
        assert abs(w * h - base * base) <= multiple * max(w, h) / 2
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(buckets)) == len(buckets)


def test_assign_bucket_and_resize() -> None:
    buckets = make_buckets(64, 16)
    assert buckets == [(48, 80), (64, 64), (80, 48)]
    assert assign_bucket(100, 100, buckets) == (64, 64)
    assert assign_bucket(300, 170, buckets) == (80, 48)
    assert assign_bucket(170, 300, buckets) == (48, 80)
    assert assign_bucket(1000, 100, buckets) == (80, 48)  # beyond max_ratio: the widest there is
    img = resize_to_bucket(_halves(203, 97), (80, 48))
    assert img.size == (80, 48)
    arr = np.asarray(img)
    assert (arr[:, :38, 0] > 200).all() and (arr[:, 42:, 2] > 200).all()  # centre crop keeps the middle
    assert resize_to_bucket(_noise(3, 200), (48, 80)).size == (48, 80)  # extreme shapes still fill it


# -- sampler ---------------------------------------------------------------------------------------------

ITEM_BUCKETS = [(64, 64)] * 13 + [(80, 48)] * 7 + [(48, 80)] * 5


def _epoch(s: BucketBatchSampler) -> list[list[int]]:
    return list(iter(s))


def test_sampler_single_bucket_batches_and_determinism() -> None:
    s = BucketBatchSampler(ITEM_BUCKETS, batch_size=4, seed=7)
    e0, e1 = _epoch(s), _epoch(s)
    assert s.epoch == 2
    for batch in e0 + e1:
        assert len({ITEM_BUCKETS[i] for i in batch}) == 1 and 1 <= len(batch) <= 4
    assert sorted(i for b in e0 for i in b) == list(range(len(ITEM_BUCKETS)))
    assert e0 != e1  # a fresh order each epoch
    again = BucketBatchSampler(ITEM_BUCKETS, batch_size=4, seed=7)
    assert _epoch(again) == e0 and _epoch(again) == e1
    other = BucketBatchSampler(ITEM_BUCKETS, batch_size=4, seed=8)
    assert _epoch(other) != e0
    assert len(s) == len(e0) == 4 + 2 + 2


def test_sampler_drop_last() -> None:
    s = BucketBatchSampler(ITEM_BUCKETS, batch_size=4, seed=0, drop_last=True)
    batches = _epoch(s)
    assert len(batches) == 3 + 1 + 1 and all(len(b) == 4 for b in batches)
    # A bucket smaller than a batch would never train: said when the sampler is made.
    with pytest.warns(UserWarning, match=r"3 items never train: .*batch size 4: 48x80 \(3\)"):
        BucketBatchSampler([(64, 64)] * 8 + [(48, 80)] * 3, batch_size=4, drop_last=True)


def test_sampler_exact_resume() -> None:
    ref = BucketBatchSampler(ITEM_BUCKETS, batch_size=3, seed=1)
    full = _epoch(ref) + _epoch(ref)
    s = BucketBatchSampler(ITEM_BUCKETS, batch_size=3, seed=1)
    _epoch(s)
    it = iter(s)
    seen = [next(it), next(it), next(it)]
    state = json.loads(json.dumps(s.state_dict()))  # it must survive a JSON checkpoint
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = BucketBatchSampler(ITEM_BUCKETS, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a trainer re-selecting the same epoch keeps the position
    rest = _epoch(resumed)
    n0 = len(full) // 2
    assert seen + rest == full[n0:]
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(ITEM_BUCKETS, batch_size=4, seed=1).load_state_dict(state)


def test_sampler_finished_epoch_state_points_to_next() -> None:
    s = BucketBatchSampler(ITEM_BUCKETS, batch_size=5, seed=0)
    it = iter(s)
    for _ in range(len(s)):
        next(it)
    assert (s.state_dict()["epoch"], s.state_dict()["position"]) == (1, 0)
    # The loop's own count, when a prefetching loader has taken the sampler past the end of the epoch.
    assert (s.state_dict(consumed=2)["epoch"], s.state_dict(consumed=2)["position"]) == (0, 2)


def test_sampler_state_behind_a_prefetching_loader_resumes_where_the_loop_is() -> None:
    items = [(64, 64)] * 6  # 3 batches of 2 per epoch
    s = BucketBatchSampler(items, batch_size=2, seed=3)
    loader = torch.utils.data.DataLoader(
        list(range(6)), batch_sampler=s, num_workers=1, prefetch_factor=4, persistent_workers=False
    )
    it = iter(loader)
    taken = [next(it).tolist() for _ in range(2)]  # the worker has fetched further, into epoch 1
    state = s.state_dict(consumed=2)
    assert (state["epoch"], state["position"]) == (0, 2)
    resumed = BucketBatchSampler(items, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    whole = s.rank_batches(0) + s.rank_batches(1)
    assert taken + _epoch(resumed) == whole[:3]  # the rest of epoch 0, nothing skipped
    more = [b for _, b in zip(range(2), iter(resumed), strict=False)]
    assert more == whole[3:5]
    assert resumed.state_dict(consumed=3)["epoch"] == 1 and resumed.state_dict(consumed=3)["position"] == 2
    del it
    # A loop that sets each epoch and counts within it: the count is taken from that epoch's start, even
    # when the sampler had already run into it ahead of the loop.
    per_epoch = BucketBatchSampler(items, batch_size=2, seed=3)
    list(per_epoch)  # epoch 0 consumed (the sampler moves on to epoch 1 by itself)
    per_epoch.set_epoch(1)
    next(iter(per_epoch))
    state = per_epoch.state_dict(consumed=1)
    assert (state["epoch"], state["position"]) == (1, 1)
    assert per_epoch.state_dict(position=1)["position"] == 1  # the older form still works


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_rank_sharding(world_size: int) -> None:
    # 24 items in one bucket, batch 4: 6 batches split evenly, so shards are disjoint and complete.
    even = [(64, 64)] * 24
    shards = [
        _epoch(BucketBatchSampler(even, 4, seed=5, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    flat = [sorted(i for b in sh for i in b) for sh in shards]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not set(flat[a]) & set(flat[b])
    assert sorted(i for f in flat for i in f) == list(range(24))
    # Uneven: every rank still gets the same number of batches (DDP needs it) and every item is seen.
    counts = [
        len(BucketBatchSampler(ITEM_BUCKETS, 4, seed=5, rank=r, world_size=world_size))
        for r in range(3)[:world_size]
    ]
    assert len(set(counts)) == 1
    seen = {
        i
        for r in range(world_size)
        for b in _epoch(BucketBatchSampler(ITEM_BUCKETS, 4, seed=5, rank=r, world_size=world_size))
        for i in b
    }
    assert seen == set(range(len(ITEM_BUCKETS)))
    dropped = [
        _epoch(BucketBatchSampler(ITEM_BUCKETS, 4, seed=5, drop_last=True, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    ids = [i for sh in dropped for b in sh for i in b]
    assert len(ids) == len(set(ids)) and len({len(sh) for sh in dropped}) == 1


def test_dataloader_with_bucket_sampler(folder: Path) -> None:
    ds = _load(folder, size=64)
    sampler = BucketBatchSampler(ds.item_buckets, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    n = 0
    for batch in loader:
        w, h = batch["bucket"]
        assert batch["image"].shape == (len(batch["caption"]), 3, h, w)
        n += len(batch["path"])
    assert n == len(ds)


def test_an_image_that_passes_the_scan_but_not_decoding_costs_one_item(tmp_path: Path) -> None:
    for i in range(3):
        _noise(32, 32, seed=i).save(tmp_path / f"ok{i}.png")
    undecodable_png(tmp_path / "bad.png")
    ds = _load(tmp_path, buckets=False)  # warns: no captions
    bad = _by_name(ds)["bad.png"]  # the fast scan let it through
    with pytest.warns(DatasetWarning, match=r"cannot decode .*bad\.png.*stands in"):
        item = ds[bad]
    assert item["path"] == str(ds.paths[(bad + 1) % len(ds)])  # the next one in the folder's order
    # Another reader of the same folder (a resumed run, another rank) picks the same stand-in.
    other = _load(tmp_path, buckets=False)
    with pytest.warns(DatasetWarning):
        assert other[bad]["path"] == item["path"]
    assert torch.equal(other[bad]["image"], item["image"])
    # The other items are untouched.
    for i in range(len(ds)):
        if i != bad:
            assert ds[i]["path"] == str(ds.paths[i])


def test_metadata_problems_are_reported_by_line(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        _noise(20, 20).save(tmp_path / f"{name}.png")
    (tmp_path / "sub").mkdir()
    _noise(20, 20).save(tmp_path / "sub" / "e.png")
    lines = [
        b'\xef\xbb\xbf{"file_name": "a.png", "text": "first line after a BOM"}',
        b'{"file_name": "b.png", "text": "caf\xe9 in Latin-1"}',
        b'{"file_name": 5, "text": "a number"}',
        b'{"file_name": null, "text": "nothing"}',
        b'{"file_name": "c.png", "text": "ok"}',
        b'{"file_name": "sub/e.png", "text": "from the root"}',
    ]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text('{"file_name": "e.png", "text": "from sub"}\n')
    with pytest.warns(DatasetWarning) as rec:
        ds = ImageFolderDataset(tmp_path, min_side=4)
    messages = "\n".join(str(w.message) for w in rec)
    assert "3 metadata.jsonl lines ignored" in messages
    assert "metadata.jsonl:2: not UTF-8 (byte 0xe9)" in messages
    assert "metadata.jsonl:3: file_name must be a path string, got 5" in messages
    assert "metadata.jsonl:4: file_name must be a path string, got None" in messages
    assert "1 images captioned twice in metadata.jsonl (the later line wins)" in messages
    assert "sub/metadata.jsonl:1: e.png: used instead of" in messages and "metadata.jsonl:6's" in messages
    captions = {p.name: c for p, c in zip(ds.paths, ds.captions, strict=True)}
    assert captions == {
        "a.png": "first line after a BOM",
        "b.png": "",  # its line was not UTF-8: reported, and the image has no caption
        "c.png": "ok",
        "d.png": "",
        "e.png": "from sub",
    }


def test_sixteen_bit_grey_scales_by_its_depth_and_colour_keys_are_transparent() -> None:
    def grey16(values: list[int]) -> Image.Image:
        return Image.fromarray(np.array([values], dtype=np.uint16)).convert("I;16")

    # The same stored value gives the same 8-bit value, whatever else the frame holds.
    dark, brighter = to_rgb(grey16([200, 200])), to_rgb(grey16([200, 300]))
    assert np.asarray(dark)[0, 0].tolist() == np.asarray(brighter)[0, 0].tolist() == [1, 1, 1]
    assert np.asarray(to_rgb(grey16([65535])))[0, 0].tolist() == [255, 255, 255]
    # A PNG colour key (RGB or L) marks transparent pixels, composited on white like alpha.
    for image in (Image.new("RGB", (2, 2), (0, 0, 0)), Image.new("L", (2, 2), 0)):
        image.info["transparency"] = (0, 0, 0) if image.mode == "RGB" else 0
        assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


def test_symlinked_folders_are_scanned_once_without_looping(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        _noise(20, 20, seed=i).save(real / f"im{i}.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "set1").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(root, target_is_directory=True)  # a link back up
    ds = _load(root)
    assert sorted(p.name for p in ds.paths) == ["im0.png", "im1.png", "im2.png"]


def test_a_long_strip_is_resized_only_where_the_crop_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recording(self: Image.Image, size, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    strip = Image.new("RGB", (16, 20000), (10, 200, 30))
    out = resize_to_bucket(strip, (256, 256))
    assert out.size == (256, 256) and sizes == [(256, 256)]  # not 256 x 320000 first (330 MB)
    assert np.asarray(out).reshape(-1, 3).tolist()[0] == [10, 200, 30]
    # An ordinary image still takes the whole resize and the crop.
    sizes.clear()
    assert resize_to_bucket(_halves(96, 48), (64, 64)).size == (64, 64) and sizes == [(128, 64)]


def test_exif_orientation_after_a_pngs_pixels_sets_the_bucket(tmp_path: Path) -> None:
    """PNG allows the eXIf chunk after the image data; the fast scan must find it there too, or a 96x48
    image shown as 48x96 gets a wide bucket and loses most of its height to the crop."""
    import struct
    import zlib

    _halves(96, 48).save(tmp_path / "turned.png")
    data = (tmp_path / "turned.png").read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    chunk = struct.pack(">I", len(raw)) + b"eXIf" + raw + struct.pack(">I", zlib.crc32(b"eXIf" + raw))
    end = data.index(b"IEND") - 4
    (tmp_path / "turned.png").write_bytes(data[:end] + chunk + data[end:])
    with Image.open(tmp_path / "turned.png") as im:
        assert "exif" not in im.info  # not in the header: only after the pixels
    ds = _load(tmp_path)  # warns: no caption
    assert ds.sizes == [(48, 96)] and ds.item_buckets[0][0] < ds.item_buckets[0][1]  # a tall bucket
    assert ds[0]["image"].shape[1] > ds[0]["image"].shape[2]
