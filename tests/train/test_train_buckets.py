"""`--buckets`: training on aspect-ratio buckets (kohya's --enable_bucket) instead of square crops.

A folder of wide, tall and square pictures on the tiny preset (16x16: buckets 20x12, 16x16 and 12x20):
every micro-batch holds one bucket, each image's noise has its own latent size, a LoRA run trains on all
three shapes, resumes bit for bit, and refuses to resume with another micro-batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import save_bundle
from pictor.data.folder import DatasetWarning
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import SampleDraws, make_dataset, micro_batches, validation_items
from pictor.train.logs import read_jsonl
from pictor.train.loop import TrainingError, train
from pictor.train.stages import holdout_batches

SIZE = 16
SHAPES = {"wide": (40, 20), "tall": (20, 40), "square": (30, 30)}
COMMON = {"image_size": SIZE, "eval_every": 0, "sample_every": 0, "progress": False, "warmup_steps": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for kind, (w, h) in SHAPES.items():
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{kind}{i}.png")
            (root / f"{kind}{i}.txt").write_text(f"a {kind} picture")
    return root


def test_each_micro_batch_is_one_bucket_with_noise_of_its_latent_size(folder: Path) -> None:
    ds = make_dataset(str(folder), SIZE, 0, buckets=True, multiple=4)
    draws = SampleDraws(0, (4, 8, 8), timesteps=True, latent_factor=2)
    shapes = set()
    batches = micro_batches(ds, 0, 0, batch_size=2, rank=0, world_size=2, draws=draws)
    for _ in range(12):
        batch = next(batches)
        h, w = batch.images.shape[2:]
        shapes.add((w, h))
        assert batch.draws["noise"].shape == (2, 4, h // 2, w // 2)
        kinds = {caption.split()[1] for caption in batch.captions}
        assert len(kinds) == 1  # one bucket, so one kind of picture
    assert shapes == {(20, 12), (16, 16), (12, 20)}
    # rank 1 holds the other half of the same global micro-batch: the same bucket
    other = micro_batches(ds, 0, 0, batch_size=2, rank=1, world_size=2, draws=draws)
    mine = micro_batches(ds, 0, 0, batch_size=2, rank=0, world_size=2, draws=draws)
    for _ in range(6):
        assert next(other).images.shape == next(mine).images.shape


def test_without_buckets_the_stream_is_the_square_one_it_was(folder: Path) -> None:
    plain = make_dataset(str(folder), SIZE, 0)
    draws = SampleDraws(0, (4, 8, 8), timesteps=True)
    for batch in (next(micro_batches(plain, 0, p, 3, draws=draws)) for p in (0, 3, 12)):
        assert batch.images.shape[2:] == (SIZE, SIZE)
        assert batch.draws["noise"].shape == (3, 4, 8, 8)


def test_held_out_images_come_in_batches_of_one_size(folder: Path) -> None:
    ds = make_dataset(str(folder), SIZE, 0, buckets=True, multiple=4)
    batches = list(holdout_batches(ds, 12, 3))
    assert sum(len(b) for b in batches) == 12
    assert all(b.shape[0] <= 3 for b in batches)
    assert {tuple(b.shape[2:]) for b in batches} == {(12, 20), (16, 16), (20, 12)}


def _run(base: Path, data: Path, out: Path, steps: int, resume: bool = False, **settings: object) -> list:
    cfg = TrainConfig(
        stage="lora",
        out=str(out),
        base=str(base),
        data=str(data),
        buckets=True,
        max_steps=steps,
        **{**COMMON, "batch_size": 2, **settings},  # type: ignore[arg-type]
    )
    train(cfg, resume=resume)
    return [row["loss"] for row in read_jsonl(out / "log.jsonl")]


def test_a_bucketed_lora_run_resumes_bit_for_bit(base: Path, folder: Path, tmp_path: Path) -> None:
    whole = _run(base, folder, tmp_path / "whole", 6)
    _run(base, folder, tmp_path / "parts", 3, save_every=3)
    parts = _run(base, folder, tmp_path / "parts", 6, resume=True)
    assert len(whole) == 6 and all(np.isfinite(whole))
    assert parts == whole
    with pytest.raises(TrainingError, match="resume with the run's own --batch-size"):
        _run(base, folder, tmp_path / "parts", 8, resume=True, batch_size=4)


def test_buckets_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    for settings, words in (
        ({"stage": "t2i", "data": "shapes"}, "the shapes world is drawn square"),
        ({"stage": "autoencoder", "data": str(tmp_path)}, "the autoencoder stage trains on square crops"),
    ):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(out=str(tmp_path / "r"), preset="tiny", buckets=True, **settings).resolve()  # type: ignore[arg-type]


def test_t2i_buckets_follow_the_autoencoder_it_trains_on(folder: Path, tmp_path: Path) -> None:
    """--autoencoder may be deeper than the preset's (shapes-small's factor 4 under tiny's factor 2, the
    same latent channels): the buckets must fit the autoencoder the run loads, or latents come out odd."""
    from pictor.checkpoint import BundleConfig
    from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
    from pictor.models.flux import Flux, FluxParams
    from pictor.presets import get_preset

    tiny, small = get_preset("tiny"), get_preset("shapes-small")
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams.from_dict(small["autoencoder"]))
    flux = Flux(FluxParams.from_dict(tiny["model"]))
    config = BundleConfig(
        name="ae",
        preset="shapes-small",
        model=tiny["model"],
        autoencoder=small["autoencoder"],
        text_encoder=tiny["text_encoder"],
        defaults=tiny["defaults"],
        trained=True,
    )
    save_bundle(tmp_path / "ae", config, flux.state_dict(), ae.state_dict())
    settings = {**COMMON, "image_size": 32, "batch_size": 1, "latent_stats_images": 4}
    out = tmp_path / "run"
    cfg = TrainConfig(
        stage="t2i",
        preset="tiny",
        out=str(out),
        data=str(folder),
        autoencoder_path=str(tmp_path / "ae"),
        buckets=True,
        max_steps=3,
        save_every=2,
        **settings,  # type: ignore[arg-type]
    )
    train(cfg)
    train(dataclasses.replace(cfg, max_steps=4), resume=True)  # from the checkpoint's autoencoder
    assert len(read_jsonl(out / "log.jsonl")) == 4


def test_the_small_bucket_warning_counts_the_images_that_train(folder: Path) -> None:
    """A validation split takes images out of the stream: a bucket is small by what is left of it."""
    from pictor.train.run_data import warn_small_buckets

    ds = make_dataset(str(folder), SIZE, 0, buckets=True, multiple=4, validation_split=0.25)
    held = [ds.folder.item_buckets[i] for i in validation_items(ds)]
    with pytest.warns(DatasetWarning, match="repeat their images") as caught:
        warn_small_buckets(ds, 4, 0)
    for w, h in set(held):
        left = ds.folder.item_buckets.count((w, h)) - held.count((w, h))
        assert f"{w}x{h} ({left})" in str(caught[0].message)
