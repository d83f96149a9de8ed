"""`--max-epochs` and `--save-every-epochs`: kohya's epoch counts, worked out into steps from the folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import make_dataset
from pictor.train.epochs import epoch_samples, with_epochs
from pictor.train.loop import train
from pictor.train.state import STATE_FILE

SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """5 captioned pictures: 3 in a folder repeated twice, 2 loose (wide ones in a bucket of their own)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for rel, size in [("2_cat/a", (16, 16)), ("2_cat/b", (16, 16)), ("2_cat/c", (16, 16))]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(f"{root / rel}.png")
        Path(f"{root / rel}.txt").write_text(rel)
    for name in ("d", "e"):
        Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(name)
    return root


def test_an_epoch_counts_every_picture_its_repeats_and_buckets_fill_up(folder: Path) -> None:
    assert epoch_samples(make_dataset(str(folder), SIZE, 0), 2, 0) == 5
    assert epoch_samples(make_dataset(str(folder), SIZE, 0, repeat_folders=True), 2, 0) == 8
    # buckets: the square bucket's 6 samples and the wide one's 2, each in whole micro-batches of 4
    bucketed = make_dataset(str(folder), SIZE, 0, repeat_folders=True, buckets=True, multiple=4)
    assert epoch_samples(bucketed, 4, 0) == 8 + 4
    held = make_dataset(str(folder), SIZE, 0, validation_split=0.2)  # one picture held out
    assert epoch_samples(held, 2, 0) == 4
    assert epoch_samples(make_dataset("shapes", SIZE, 0), 2, 0) is None


def test_epochs_become_steps_rounded_up(folder: Path, tmp_path: Path) -> None:
    ds = make_dataset(str(folder), SIZE, 0, repeat_folders=True)  # 8 samples an epoch
    cfg = TrainConfig("lora", str(tmp_path / "r"), data=str(folder), batch_size=3, grad_accum=1, max_epochs=4)
    got, note = with_epochs(cfg, ds, world_size=1)
    assert got.max_steps == 11 and got.save_every == cfg.save_every  # ceil(32 / 3)
    assert note is not None and "an epoch is 8 samples" in note and "max_steps 11" in note
    got, _ = with_epochs(TrainConfig(**{**cfg.__dict__, "save_every_epochs": 2, "grad_accum": 2}), ds, 2)
    assert got.max_steps == 3 and got.save_every == 2  # 12 samples a step: ceil(32 / 12), ceil(16 / 12)
    plain = TrainConfig("lora", "o", data=str(folder))
    assert with_epochs(plain, ds, 1) == (plain, None)


def test_a_run_stops_after_its_epochs_with_a_checkpoint_at_each(
    base: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    common = {
        "stage": "lora",
        "base": str(base),
        "data": str(folder),
        "image_size": SIZE,
        "batch_size": 2,
        "sample_every": 0,
        "progress": False,
        "warmup_steps": 0,
        "keep": 10,
    }
    cfg = TrainConfig(out=str(out), max_epochs=3, save_every_epochs=1, **common)  # type: ignore[arg-type]
    train(cfg)
    # 5 samples an epoch, 2 a step: 8 steps for 3 epochs, a checkpoint every 3 steps and at the end
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-000003", "step-000006", "step-000008"]
    assert "an epoch is 5 samples, 2.5 steps of 2" in capsys.readouterr().err
    state = json.loads((out / "checkpoints" / "step-000008" / STATE_FILE).read_text())
    assert state["config"]["max_epochs"] == 3 and state["config"]["max_steps"] == 8

    # a resume with more epochs goes on; one with --max-steps counts in steps from then on
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "lora", "--base", str(base), "--data", str(folder), "--out", str(out), "--resume"]
    more = config_from_args(parser.parse_args([*argv, "--max-epochs", "4"]))
    assert more.max_epochs == 4
    train(more, resume=True)
    assert (out / "checkpoints" / "step-000010").is_dir()  # ceil(20 / 2)
    steps = config_from_args(parser.parse_args([*argv, "--max-steps", "12"]))
    assert steps.max_epochs is None and steps.max_steps == 12 and steps.save_every_epochs == 1


def test_steps_and_epochs_together_and_endless_data_are_refused(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "lora", "--base", "b", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="--max-steps or --max-epochs: give one of them"):
        config_from_args(parser.parse_args([*argv, "--max-steps", "5", "--max-epochs", "2"]))
    with pytest.raises(ConfigError, match="--save-every or --save-every-epochs: give one of them"):
        config_from_args(parser.parse_args([*argv, "--save-every", "5", "--save-every-epochs", "2"]))
    config = {"lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99]}
    for name, value, words in (
        ("max_epochs", 2, "--max-epochs: the shapes world is endless"),
        ("save_every_epochs", 1, "--save-every-epochs: the shapes world is endless"),
        ("max_epochs", 0, r"max_epochs \(--max-epochs\) must be >= 1"),
    ):
        settings = {**config, name: value, "data": "shapes" if value else str(tmp_path)}
        with pytest.raises(ConfigError, match=words):
            TrainConfig(out=str(tmp_path / "r"), preset="tiny", stage="t2i", **settings).validate()  # type: ignore[arg-type]
