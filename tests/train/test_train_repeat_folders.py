"""`--folder-repeats`: kohya's `<repeats>_<class tokens>` subfolders weight the training stream and caption
their uncaptioned images, and nothing changes for a folder trained without the option."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pictor.data.folder import DatasetWarning, ImageFolderDataset
from pictor.data.repeat_folders import MAX_REPEATS, folder_repeats
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import (
    SampleDraws,
    data_change,
    data_fingerprint,
    make_dataset,
    micro_batches,
    training_items,
    validation_items,
)
from pictor.train.distributed import DistInfo
from pictor.train.loop import Trainer, train
from pictor.train.state import STATE_FILE

SIZE = 16
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def _picture(path: Path, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def kohya_folder(tmp_path: Path) -> Path:
    """3 pictures of a subject repeated 4 times, 2 others once, one loose picture at the top."""
    root = tmp_path / "train"
    for i in range(3):
        _picture(root / "4_sks dog" / f"s{i}.png", i, (32, 16) if i else (16, 32))
    (root / "4_sks dog" / "s0.txt").write_text("sks dog on a sofa")  # a caption file wins
    for i in range(2):
        _picture(root / "1_dog" / f"d{i}.png", 10 + i)
    _picture(root / "loose.png", 20)
    (root / "loose.txt").write_text("a loose picture")
    return root


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("10_sks dog/a.png", (10, "sks dog", True)),
        ("12_sks_dog/deeper/a.png", (12, "sks_dog", True)),  # kohya keeps the underscores
        ("3_/a.png", (3, None, True)),
        ("10/a.png", (10, None, True)),  # kohya's name.split("_"): a number alone is a repeat folder
        ("dog/a.png", (1, None, False)),
        ("dog_10/a.png", (1, None, False)),
        ("10_x.png", (1, None, False)),  # a file at the top is in no folder
    ],
)
def test_a_folder_name_gives_repeats_and_class_tokens(rel: str, expected: tuple) -> None:
    assert folder_repeats(PurePath(rel)) == expected


@pytest.mark.parametrize("name", ["0_dog", f"{MAX_REPEATS + 1}_dog"])
def test_a_repeat_count_out_of_range_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=rf"repeat folder '{name}' asks for \d+ repeats.*rename the folder"):
        folder_repeats(PurePath(name, "a.png"))


def test_the_folder_reads_repeats_and_captions_by_class_tokens(kohya_folder: Path) -> None:
    _picture(kohya_folder / "0_off" / "o.png", 30)
    with pytest.warns(DatasetWarning, match="0_off"):
        ds = ImageFolderDataset(kohya_folder, SIZE, repeat_folders=True)
    got = {ds.rel_path(i): (r, c) for i, (r, c) in enumerate(zip(ds.repeats, ds.captions, strict=True))}
    assert got == {
        "4_sks dog/s0.png": (4, "sks dog on a sofa"),
        "4_sks dog/s1.png": (4, "sks dog"),
        "4_sks dog/s2.png": (4, "sks dog"),
        "1_dog/d0.png": (1, "dog"),
        "1_dog/d1.png": (1, "dog"),
        "loose.png": (1, "a loose picture"),
    }
    assert [Path(p).name for p in ds.class_captions] == ["d0.png", "d1.png", "s1.png", "s2.png"]
    assert ds.missing_captions == []
    assert [Path(p).name for p, _ in ds.skipped] == ["o.png"]


def test_without_the_option_a_repeat_folder_is_a_plain_folder(kohya_folder: Path) -> None:
    with pytest.warns(DatasetWarning, match="have no caption"):
        ds = ImageFolderDataset(kohya_folder, SIZE)
    assert ds.repeats == [1] * 6 and ds.class_captions == []
    assert sorted(ds.captions).count("") == 4


def test_the_option_on_a_folder_without_repeat_folders_warns(tmp_path: Path) -> None:
    _picture(tmp_path / "pets" / "a.png", 0)
    (tmp_path / "pets" / "a.txt").write_text("a pet")
    with pytest.warns(DatasetWarning, match="no image under .* is in a subfolder named <repeats>_<class"):
        ImageFolderDataset(tmp_path, SIZE, repeat_folders=True)


def _epochs(ds: object, epochs: int, per_epoch: int, batch: int = 2) -> list[Counter]:
    """Captions per epoch of the training stream, `per_epoch` samples an epoch."""
    draws = SampleDraws(0, (4, 8, 8), timesteps=True, latent_factor=2)
    stream = micro_batches(ds, 0, 0, batch, draws=draws)  # type: ignore[arg-type]
    captions = [c for _ in range(epochs * per_epoch // batch) for c in next(stream).captions]
    return [Counter(captions[e * per_epoch : (e + 1) * per_epoch]) for e in range(epochs)]


def test_each_epoch_of_the_stream_shows_an_image_its_repeats_times(kohya_folder: Path) -> None:
    ds = make_dataset(str(kohya_folder), SIZE, 0, repeat_folders=True)
    for epoch in _epochs(ds, 3, 3 * 4 + 2 + 1, batch=3):
        assert epoch == {"sks dog on a sofa": 4, "sks dog": 8, "dog": 2, "a loose picture": 1}
    with pytest.warns(DatasetWarning, match="have no caption"):
        plain = make_dataset(str(kohya_folder), SIZE, 0)
    assert _epochs(plain, 1, 6)[0] == {"sks dog on a sofa": 1, "": 4, "a loose picture": 1}


def test_buckets_follow_the_repeats_too(kohya_folder: Path) -> None:
    """With buckets each micro-batch is one bucket's, filled up within it, so an epoch is a whole number of
    batches per bucket: 4 + 4 samples of the two wide/tall subject pictures, and the square bucket's 4 + 2 + 1
    = 7 samples filled to 8."""
    ds = make_dataset(str(kohya_folder), SIZE, 0, repeat_folders=True, buckets=True, multiple=4)
    total = Counter()
    for epoch in _epochs(ds, 2, 16):
        assert epoch["sks dog"] == 8 and 4 <= epoch["sks dog on a sofa"] <= 5 and 2 <= epoch["dog"] <= 3
        assert sum(epoch.values()) == 16
        total += epoch
    assert total["sks dog on a sofa"] + total["dog"] + total["a loose picture"] == 16


def test_held_out_images_are_held_out_once_and_the_rest_repeat(kohya_folder: Path) -> None:
    ds = make_dataset(str(kohya_folder), SIZE, 0, repeat_folders=True, validation_split=0.34)
    held = validation_items(ds).tolist()
    assert len(held) == 2 and len(set(held)) == 2
    folder = ds.folder  # type: ignore[attr-defined]
    training = ds.training.tolist()  # type: ignore[attr-defined]
    assert not set(held) & set(training)
    assert Counter(training) == {i: folder.repeats[i] for i in range(len(folder)) if i not in held}


def test_a_resume_notices_when_the_repeats_changed(kohya_folder: Path, tmp_path: Path) -> None:
    with_repeats = data_fingerprint(make_dataset(str(kohya_folder), SIZE, 0, repeat_folders=True))
    with pytest.warns(DatasetWarning):
        without = data_fingerprint(make_dataset(str(kohya_folder), SIZE, 0))
    assert with_repeats is not None and without is not None
    assert with_repeats["images"] == without["images"] and with_repeats != without
    assert "repeats" in str(data_change(without, with_repeats))
    # a folder whose repeat folders all say 1 streams as it did without the option: the same fingerprint
    ones = tmp_path / "ones"
    _picture(ones / "1_cat" / "a.png", 0)
    (ones / "1_cat" / "a.txt").write_text("a cat")
    plain = data_fingerprint(make_dataset(str(ones), SIZE, 0))
    assert data_fingerprint(make_dataset(str(ones), SIZE, 0, repeat_folders=True)) == plain
    # the same files and captions, another stream: the repeats alone change the fingerprint
    (ones / "1_cat").rename(ones / "3_cat")
    assert data_fingerprint(make_dataset(str(ones), SIZE, 0, repeat_folders=True)) != data_fingerprint(
        make_dataset(str(ones), SIZE, 0)
    )


def test_the_command_line_option_reaches_the_run_and_shapes_refuses_it(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "lora", "--base", "b", "--data", str(tmp_path), "--out", "o"])
    assert config_from_args(args).folder_repeats is False
    args = parser.parse_args(
        ["train", "lora", "--base", "b", "--data", str(tmp_path), "--out", "o", "--folder-repeats"]
    )
    assert config_from_args(args).folder_repeats is True
    config = {"lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99], "folder_repeats": True}
    with pytest.raises(ConfigError, match="--folder-repeats: kohya's <repeats>_<class tokens> subfolders"):
        TrainConfig(out=str(tmp_path / "r"), preset="tiny", stage="t2i", data="shapes", **config).validate()  # type: ignore[arg-type]


def test_a_lora_run_keeps_the_option_and_resumes_with_it(
    base: Path, kohya_folder: Path, tmp_path: Path
) -> None:
    """A run stores the option in its checkpoint, and a resume without the flag keeps it (the stream
    depends on it): the resumed run ends on the same weights as an uninterrupted one."""
    common = {
        "stage": "lora",
        "base": str(base),
        "data": str(kohya_folder),
        "folder_repeats": True,
        "image_size": SIZE,
        "batch_size": 2,
        "sample_every": 0,
        "save_every": 2,
        "progress": False,
        "warmup_steps": 0,
        "lr": 1e-2,
    }
    train(TrainConfig(out=str(tmp_path / "whole"), max_steps=4, **common))  # type: ignore[arg-type]
    train(TrainConfig(out=str(tmp_path / "parts"), max_steps=2, **common))  # type: ignore[arg-type]
    looked = TrainConfig(out=str(tmp_path / "look"), max_steps=1, **common).resolve()  # type: ignore[arg-type]
    trainer = Trainer(looked, DistInfo(0, 1, 0, CPU))
    assert Counter(training_items(trainer.ds).tolist()) == dict.fromkeys(range(6), 1) | {  # type: ignore[union-attr]
        i: 4
        for i, r in enumerate(trainer.ds.folder.repeats)
        if r == 4  # type: ignore[attr-defined]
    }
    state = json.loads((tmp_path / "parts" / "checkpoints" / "step-000002" / STATE_FILE).read_text())
    assert state["config"]["folder_repeats"] is True
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "lora", "--base", str(base), "--data", str(kohya_folder), "--out"]
    argv.append(str(tmp_path / "parts"))
    resumed = config_from_args(parser.parse_args([*argv, "--resume", "--max-steps", "4"]))
    assert resumed.folder_repeats is True
    train(resumed, resume=True)
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000004" / "model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "checkpoints" / "step-000004" / "model.safetensors"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


def test_the_latent_cache_encodes_each_repeated_picture_once(
    base: Path, kohya_folder: Path, tmp_path: Path
) -> None:
    """Each rank encodes its share of the pictures, each once: with repeats the training items name a
    picture once per repeat, and a rank's share of those would be every picture."""
    from unittest import mock

    from pictor.checkpoint import load_bundle
    from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
    from pictor.train.latent_table import build_latent_table

    bundle = load_bundle(base)
    ae = AutoEncoder(AutoEncoderParams.from_dict(dict(bundle.config.autoencoder)))
    ae.load_state_dict(bundle.autoencoder)
    ds = make_dataset(str(kohya_folder), SIZE, 0, repeat_folders=True)
    rows: list[int] = []
    real = AutoEncoder.encode_moments

    def counting(self: AutoEncoder, x: torch.Tensor) -> Any:
        rows.append(int(x.shape[0]))
        return real(self, x)

    class Shared(Exception):  # stop at the barrier: what is encoded by then is this rank's own share
        pass

    def stop(info: DistInfo) -> None:
        raise Shared

    with (
        mock.patch.object(AutoEncoder, "encode_moments", counting),
        mock.patch("pictor.train.latent_table.distributed.patient_barrier", stop),
    ):
        for rank in (0, 1):
            with pytest.raises(Shared):
                build_latent_table(
                    ds, ae, tmp_path / "cache", both_flips=False, info=DistInfo(rank, 2, rank, CPU), amp=False
                )
    assert rows == [3, 3]  # each rank its 3 pictures once, not all 6 (their 15 repeats) on each


def test_an_epoch_past_the_streams_limit_is_refused(
    kohya_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pictor.train.data.MAX_EPOCH_SAMPLES", 10)
    with pytest.raises(ValueError, match=r"make an epoch of 15 samples, more than the 10 pictor streams"):
        make_dataset(str(kohya_folder), SIZE, 0, repeat_folders=True)


def test_a_bucket_of_fewer_pictures_than_a_batch_is_named_whatever_their_repeats(tmp_path: Path) -> None:
    """Its batches repeat one picture: the repeats do not make it more pictures."""
    from pictor.train.run_data import warn_small_buckets

    _picture(tmp_path / "4_wide" / "w.png", 0, (32, 16))  # one wide picture, 4 times an epoch
    for i in range(4):
        _picture(tmp_path / "1_square" / f"s{i}.png", i + 1)
    for path in tmp_path.rglob("*.png"):
        path.with_suffix(".txt").write_text(path.stem)
    ds = make_dataset(str(tmp_path), SIZE, 0, repeat_folders=True, buckets=True, multiple=4)
    with pytest.warns(DatasetWarning, match=r"fewer images than a micro-batch \(4\).*\(1\)"):
        warn_small_buckets(ds, 4, 0)
