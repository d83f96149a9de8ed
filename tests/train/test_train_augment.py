"""Folder data augmentation in the training stream: --flip-aug, --shuffle-caption, --keep-tokens,
--caption-tag-dropout and --caption-ext. Augmenting stream sample k is a pure function of (seed, k), so
workers, resumes and ranks see the same samples, and a run without the options is the stream it was."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.data.reference_pairs import ReferencePairs
from pictor.notices import PictorWarning
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import (
    Augment,
    Batch,
    SampleDraws,
    augmentation,
    make_dataset,
    micro_batches,
    stream_index,
)
from pictor.train.distributed import DistInfo
from pictor.train.loop import Trainer

SIZE, SEED = 16, 5
TAGS = ["trigger", "red", "blue", "green", "yellow", "big", "small"]
ALL_ON = {"flip": True, "shuffle_caption": True, "keep_tokens": 1, "tag_dropout": 0.2}


def _folder(root: Path, n: int = 4, layouts: bool = False) -> Path:
    """n images, none symmetric left to right, captioned with oddly spaced tags (kept as written when no
    caption option is on)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(" ,".join(TAGS[: 3 + i]) + " ")
        box = [0.1, 0.2, 0.4 + 0.1 * i, 0.9]
        lines.append(json.dumps({"file_name": f"{i}.png", "layout": [{"box": box, "phrase": "a thing"}]}))
    if layouts:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _batch(ds, n: int, position: int = 0, **kwargs) -> Batch:
    return next(micro_batches(ds, SEED, position, n, **kwargs))


def _mirrored(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)  # uint8 [B, 3, H, W]: the W axis reversed


def test_flip_mirrors_about_half_exactly_and_leaves_captions_and_draws(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    draws = SampleDraws(SEED, (4, 2, 2), timesteps=True, caption_dropout=0.1)
    plain = _batch(make_dataset(str(root), SIZE, SEED), 200, draws=draws)
    flipped = _batch(make_dataset(str(root), SIZE, SEED, flip=True), 200, draws=draws)
    same = (flipped.images == plain.images).flatten(1).all(1)
    mirror = (flipped.images == _mirrored(plain.images)).flatten(1).all(1)
    assert bool((same ^ mirror).all())  # every image is either itself or exactly mirrored
    assert 0.4 < float(mirror.float().mean()) < 0.6
    # Drawn per stream sample, not per image: each image (known by its caption) comes both ways.
    for caption in set(plain.captions):
        ways = {bool(m) for m, c in zip(mirror, plain.captions, strict=True) if c == caption}
        assert ways == {True, False}
    assert flipped.captions == plain.captions
    for key in ("noise", "t", "drop"):  # the sample's own random numbers are untouched
        assert torch.equal(flipped.draws[key], plain.draws[key])


def test_options_off_give_the_stream_as_before(tmp_path: Path) -> None:
    """No option on: no augmentation at all, the items are the dataset's own (pixels and captions as
    written, spacing included), as the stream gave them before augmentation existed."""
    root = _folder(tmp_path / "d")
    ds = make_dataset(str(root), SIZE, SEED, keep_tokens=0, caption_ext=".txt")
    assert augmentation(ds) is None
    batch = _batch(ds, 12)
    items = [ds[stream_index(4, k, SEED)] for k in range(12)]
    assert torch.equal(batch.images, torch.from_numpy(np.stack([i[0] for i in items])).permute(0, 3, 1, 2))
    assert batch.captions == [i[1] for i in items]
    assert set(batch.captions) == {(root / f"{i}.txt").read_text().strip() for i in range(4)}


def test_shuffle_and_tag_dropout_show_in_batches(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    plain = _batch(make_dataset(str(root), SIZE, SEED), 64)
    aug = _batch(
        make_dataset(str(root), SIZE, SEED, shuffle_caption=True, keep_tokens=1, tag_dropout=0.2), 64
    )
    assert torch.equal(aug.images, plain.images)  # caption options alone leave the pixels
    reordered = dropped = 0
    for before, after in zip(plain.captions, aug.captions, strict=True):
        tags, original = after.split(", "), [t.strip() for t in before.split(",")]
        assert tags[0] == "trigger" and len(set(tags)) == len(tags) and set(tags) <= set(original)
        dropped += len(tags) < len(original)
        reordered += [t for t in original if t in tags] != tags
    assert reordered > 20 and dropped > 20


def test_augmented_items_depend_on_the_stream_position_only(tmp_path: Path) -> None:
    """Workers, a stream read from a later position (a resume), and two ranks: the same items."""
    ds = make_dataset(str(_folder(tmp_path / "d")), SIZE, SEED, **ALL_ON)
    whole = _batch(ds, 16)
    later = _batch(ds, 8, position=8)
    in_worker = _batch(ds, 8, position=8, num_workers=1)
    for b in (later, in_worker):
        assert torch.equal(b.images, whole.images[8:]) and b.captions == whole.captions[8:]
    ranks = [_batch(ds, 8, rank=r, world_size=2) for r in (0, 1)]
    for r, b in enumerate(ranks):
        assert b.indices == list(range(r, 16, 2))
        assert torch.equal(b.images, whole.images[r::2]) and b.captions == whole.captions[r::2]
    assert len(set(whole.captions)) > 8  # the images repeat every 4 samples; their captions do not


def test_a_flipped_image_carries_its_layout_mirrored(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", layouts=True)
    plain = _batch(make_dataset(str(root), SIZE, SEED), 32)
    flipped = _batch(make_dataset(str(root), SIZE, SEED, flip=True), 32)
    mirror = (flipped.images == _mirrored(plain.images)).flatten(1).all(1)
    for i, was in enumerate(plain.layouts):
        assert was is not None and flipped.layouts[i] is not None
        (before,), (after,) = was, flipped.layouts[i]
        x0, y0, x1, y1 = before["box"]
        expected = [1.0 - x1, y0, 1.0 - x0, y1] if mirror[i] else [x0, y0, x1, y1]
        assert after["box"] == pytest.approx(expected) and after["phrase"] == before["phrase"]
    assert bool(mirror.any()) and not bool(mirror.all())


def test_wrapped_data_is_augmented_and_its_reference_picture_is_not(tmp_path: Path) -> None:
    """The reference stage wraps the data (ReferencePairs): the augmentation is found through it; the
    reference, the image as it is in the folder, stays unmirrored, so it carries content, not placement."""
    ds = make_dataset(str(_folder(tmp_path / "d")), SIZE, SEED, flip=True, shuffle_caption=True)
    assert augmentation(ReferencePairs(ds)) == Augment(flip=True, shuffle=True)
    plain = _batch(make_dataset(str(tmp_path / "d"), SIZE, SEED), 32)
    pairs = _batch(ReferencePairs(ds), 32)
    assert pairs.references is not None and torch.equal(pairs.references, plain.images)
    assert not torch.equal(pairs.images, plain.images) and pairs.captions != plain.captions
    assert pairs.reference_captions == plain.captions


def test_caption_ext_picks_the_caption_files(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", n=2)
    (root / "0.caption").write_text("from the caption file\n")
    with pytest.warns(Warning, match=r"no caption \(no metadata.jsonl line, no \.caption file"):
        ds = make_dataset(str(root), SIZE, SEED, caption_ext=".caption")
    captions = {ds[i][2]["rel_path"]: ds[i][1] for i in range(2)}
    assert captions == {"0.png": "from the caption file", "1.png": ""}
    assert make_dataset(str(root), SIZE, SEED)[0][1] == "trigger ,red ,blue"


@pytest.mark.parametrize(
    ("option", "flag"),
    [
        ({"flip": True}, "--flip-aug"),
        ({"shuffle_caption": True}, "--shuffle-caption"),
        ({"keep_tokens": 2}, "--keep-tokens"),
        ({"tag_dropout": 0.1}, "--caption-tag-dropout"),
        ({"caption_ext": ".caption"}, "--caption-ext"),
    ],
)
def test_the_shapes_world_refuses_folder_options(option: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=f"^{flag}: for image folders only"):
        make_dataset("shapes", SIZE, SEED, **option)


def test_keep_tokens_alone_warns_and_changes_nothing(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    with pytest.warns(PictorWarning, match="--keep-tokens only keeps tags out of"):
        ds = make_dataset(str(root), SIZE, SEED, keep_tokens=1)
    assert augmentation(ds) is None


def test_the_flags_reach_the_trainers_data(tmp_path: Path) -> None:
    """`pictor train` flags -> TrainConfig -> the Trainer's dataset (no steps run); --data shapes with
    one of them stops the run before any model is built, naming the flag."""
    root = _folder(tmp_path / "d", n=2)
    (root / "0.caption").write_text("trigger, a, b, c")
    (root / "1.caption").write_text("trigger, d, e, f")
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "autoencoder", "--out", str(tmp_path / "run"), "--data", str(root), "--preset", "tiny"]
    argv += ["--image-size", str(SIZE), "--device", "cpu", "--flip-aug", "--shuffle-caption"]
    argv += ["--keep-tokens", "1", "--caption-tag-dropout", "0.25", "--caption-ext", ".caption"]
    args = parser.parse_args(argv)
    cfg = config_from_args(args).resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PictorWarning)  # each image has its .caption: no warning
        trainer = Trainer(cfg, DistInfo())
    assert augmentation(trainer.ds) == Augment(flip=True, shuffle=True, keep_tokens=1, tag_dropout=0.25)
    assert sorted(trainer.ds.folder.captions) == ["trigger, a, b, c", "trigger, d, e, f"]  # type: ignore[attr-defined]
    shapes = TrainConfig(stage="autoencoder", out=str(tmp_path / "s"), preset="tiny", flip_aug=True)
    with pytest.raises(ConfigError, match="--flip-aug: for image folders only"):
        Trainer(shapes.resolve(), DistInfo())


def test_a_lora_run_caches_text_only_when_captions_repeat(tmp_path: Path) -> None:
    """Shuffled or thinned tags make nearly every caption new: the text cache would only fill up."""
    from pictor.checkpoint import save_bundle
    from pictor.train.lora import CachedText, LoRAStage

    from tiny_bundle import tiny_models

    cfg_bundle, flux, ae = tiny_models("base", trained=True)
    base = tmp_path / "base"
    save_bundle(base, cfg_bundle, flux.state_dict(), ae.state_dict())
    data = _folder(tmp_path / "data")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    for options, cached in (
        ({}, True),
        ({"caption_shuffle": True}, False),
        ({"caption_tag_dropout": 0.1}, False),
    ):
        cfg = TrainConfig(
            stage="lora",
            out=str(tmp_path / "run"),
            base=str(base),
            data=str(data),
            image_size=SIZE,
            **options,
        ).resolve()  # type: ignore[arg-type]
        stage = LoRAStage(cfg, make_dataset(str(data), SIZE, SEED), info)
        assert isinstance(stage.text, CachedText) is cached, options
