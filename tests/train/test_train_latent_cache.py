"""`--cache-latents`: a folder encoded once, before training, and the run trained from the stored latents.

On the tiny preset: the losses are those of the uncached run (up to the rounding of batched encodes)
while the autoencoder's `encode` is never called during the run; mirrored latents are cached with
--flip-aug; a second run on the same cache encodes nothing; resumes are bit for bit.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.data.folder import DatasetWarning, ImageFolderDataset
from pictor.data.latent_cache import LatentCacheError
from pictor.models.autoencoder import AutoEncoder
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import make_dataset, training_items
from pictor.train.distributed import DistInfo
from pictor.train.latent_table import build_latent_table
from pictor.train.logs import read_jsonl
from pictor.train.loop import train

from broken_images import undecodable_png
from tiny_bundle import tiny_models

SIZE = 16
COMMON = {
    "image_size": SIZE,
    "eval_every": 0,
    "sample_every": 0,
    "progress": False,
    "warmup_steps": 0,
    "batch_size": 2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(40, 20), (20, 40), (30, 30), (32, 32), (40, 22), (22, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}, red, round")
    return root


def _run(base: Path, data: Path, out: Path, steps: int, resume: bool = False, **settings: object) -> list:
    cfg = TrainConfig(
        out=str(out),
        base=str(base),
        data=str(data),
        max_steps=steps,
        **{**COMMON, "stage": "lora", **settings},  # type: ignore[arg-type]
    )
    train(cfg, resume=resume)
    return [row["loss"] for row in read_jsonl(out / "log.jsonl")]


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("ae-*/shard-*.safetensors"))


def test_cached_latents_train_as_the_autoencoder_would(base: Path, folder: Path, tmp_path: Path) -> None:
    plain = _run(base, folder, tmp_path / "plain", 4)
    cache = tmp_path / "latents"
    with mock.patch.object(AutoEncoder, "encode", side_effect=AssertionError("encode called in training")):
        cached = _run(base, folder, tmp_path / "cached", 4, cache_latents=True, latent_cache_dir=str(cache))
    np.testing.assert_allclose(cached, plain, rtol=1e-4)
    shards = _shards(cache)
    assert shards
    with mock.patch.object(ImageFolderDataset, "load_image", side_effect=AssertionError("file decoded")):
        again = _run(base, folder, tmp_path / "again", 4, cache_latents=True, latent_cache_dir=str(cache))
    assert again == cached and _shards(cache) == shards  # nothing encoded, nor decoded, the second time


def test_mirrored_and_bucketed_latents_resume_bit_for_bit(base: Path, folder: Path, tmp_path: Path) -> None:
    settings = {"cache_latents": True, "flip_aug": True, "buckets": True}
    plain = _run(base, folder, tmp_path / "plain", 6, flip_aug=True, buckets=True)
    whole = _run(base, folder, tmp_path / "whole", 6, **settings)
    np.testing.assert_allclose(whole, plain, rtol=1e-4)  # the right latent for each mirrored sample
    _run(base, folder, tmp_path / "parts", 3, save_every=3, **settings)
    with mock.patch.object(ImageFolderDataset, "load_image", side_effect=AssertionError("file decoded")):
        assert _run(base, folder, tmp_path / "parts", 6, resume=True, **settings) == whole
    # both ways round for each of the 6 pictures, in the run's own folder by default
    from safetensors import safe_open

    names = set()
    for shard in _shards(tmp_path / "whole" / "latent-cache"):
        with safe_open(shard, "pt") as f:
            names |= {k.split("/")[0] for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert len(names) == 12


def test_the_cache_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    for settings, words in (
        ({"stage": "t2i", "data": "shapes", "cache_latents": True}, "--cache-latents: for image folders"),
        ({"stage": "autoencoder", "data": str(tmp_path), "cache_latents": True}, "--cache-latents"),
        ({"stage": "t2i", "data": str(tmp_path), "latent_cache_dir": "x"}, "pass --cache-latents too"),
    ):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(out=str(tmp_path / "r"), preset="tiny", **settings).resolve()  # type: ignore[arg-type]


def test_the_reference_stage_takes_its_pictures_from_the_cache_too(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    settings = {"stage": "reference", "ema_decay": 0.0, "cache_latents": False}
    plain = _run(base, folder, tmp_path / "plain", 3, **settings)
    settings.update(cache_latents=True, latent_cache_dir=str(tmp_path / "latents"))
    with mock.patch.object(AutoEncoder, "encode", side_effect=AssertionError("encode called in training")):
        cached = _run(base, folder, tmp_path / "cached", 3, **settings)
    np.testing.assert_allclose(cached, plain, rtol=1e-4)
    # a second run on the same cache neither encodes nor decodes: its pictures are the cached latents
    with mock.patch.object(ImageFolderDataset, "load_image", side_effect=AssertionError("file decoded")):
        assert _run(base, folder, tmp_path / "again", 3, **settings) == cached


def test_a_cache_is_for_one_precision(base: Path, folder: Path, tmp_path: Path) -> None:
    """bf16 and float32 encodes differ by about 1e-3 of the loss: a float32 run re-encodes."""
    cache = tmp_path / "latents"
    _run(
        base,
        folder,
        tmp_path / "bf16",
        1,
        cache_latents=True,
        latent_cache_dir=str(cache),
        mixed_precision="bf16",
    )
    first = _shards(cache)
    _run(
        base,
        folder,
        tmp_path / "fp32",
        1,
        cache_latents=True,
        latent_cache_dir=str(cache),
        mixed_precision="no",
    )
    assert len(list(cache.glob("ae-*"))) == 2 and len(_shards(cache)) > len(first)


def test_the_table_reads_each_latent_from_disk_when_it_is_wanted(folder: Path, tmp_path: Path) -> None:
    """The table keeps entry ids, not latents (a folder's latents held on every rank would not fit): a
    lookup reads the stored mean, which is the autoencoder's, and a shard gone from disk is named."""
    ds = ImageFolderDataset(folder, size=SIZE)
    ae = tiny_models()[2].eval()
    view = SimpleNamespace(folder=ds)  # as pictor.train.data holds a folder
    table, cache = build_latent_table(view, ae, tmp_path / "c", both_flips=True, info=DistInfo(), amp=False)
    assert len(table) == 12 and cache.encoded == 12
    assert not any(isinstance(v, torch.Tensor) for v in vars(table).values())
    assert len(pickle.dumps(table)) < 4096  # paths and ids only: cheap to hand to spawned workers
    with torch.no_grad():
        for i, flip in ((0, False), (1, True), (4, True)):
            mean = ae.encode_moments(ds.load_image(i, flip)[None])[0][0]
            torch.testing.assert_close(table[(i, flip)], mean, rtol=1e-5, atol=1e-5)
    for shard in _shards(tmp_path / "c"):
        shard.unlink()
    with pytest.raises(LatentCacheError, match="removed or damaged"):
        table[(2, False)]


def test_a_cached_sample_is_the_decoded_one_without_its_pixels(tmp_path: Path) -> None:
    """With the cache the stream describes an item instead of decoding it: the same caption, layout and
    size, the stand-in's for a file that does not decode, as its latent in the table is the stand-in's."""
    root = tmp_path / "pictures"
    root.mkdir()
    for i, (w, h) in enumerate([(32, 32), (40, 20), (32, 32), (20, 40)]):
        Image.new("RGB", (w, h), (60 * i, 90, 30)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    undecodable_png(root / "1b.png")  # square, so a square picture stands in for it
    (root / "1b.txt").write_text("the broken one")
    ds = make_dataset(str(root), 32, 0, buckets=True, multiple=8)
    with pytest.warns(DatasetWarning, match=r"1b\.png"):
        decoded = [ds[i] for i in range(len(ds))]
    assert len(decoded) == 5 and "the broken one" not in [caption for _, caption, _ in decoded]
    assert len({image.shape for image, _, _ in decoded}) == 3
    for i, (image, caption, meta) in enumerate(decoded):
        assert ds.describe(i) == (image.shape[:2], caption, meta)


def test_held_out_images_are_not_encoded(base: Path, folder: Path, tmp_path: Path) -> None:
    """A validation split's held-out images are scored from their pixels, so the cache skips them; a run
    with both trains and reports its validation loss."""
    ds = make_dataset(str(folder), SIZE, 0, validation_split=0.34)
    training = training_items(ds).tolist()
    assert len(training) == 4
    table, cache = build_latent_table(
        ds, tiny_models()[2].eval(), tmp_path / "c", both_flips=True, info=DistInfo(), amp=False
    )
    assert sorted(table) == sorted((i, flip) for i in training for flip in (False, True))
    assert cache.encoded == 8
    settings = {"cache_latents": True, "flip_aug": True, "validation_split": 0.34, "eval_every": 2}
    _run(base, folder, tmp_path / "run", 2, **settings)
    assert [row["val_images"] for row in read_jsonl(tmp_path / "run" / "eval.jsonl")] == [2]
