"""`--sample-prompts FILE` (kohya's --sample_prompts): the sample grids draw the file's prompts, image i
with seed i, as `pictor generate` would; a missing, empty or misplaced file is refused before training."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pictor
from pictor.pipeline import GenerationRequest
from pictor.train.command import add_train_parser, config_from_args
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.loop import train

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_grid_draws_the_files_prompts(base: Path, tmp_path: Path) -> None:
    data = tmp_path / "pictures"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a zorblax")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# what the grids show\na red circle\n\nzorblax, blue\n")
    out = tmp_path / "run"
    cfg = TrainConfig(
        stage="lora",
        out=str(out),
        base=str(base),
        data=str(data),
        image_size=SIZE,
        batch_size=2,
        max_steps=1,
        sample_every=1,
        sample_steps=3,
        sample_guidance=2.0,
        eval_every=0,
        progress=False,
        sample_prompts=str(prompts),
        lr=1e-12,  # one step this small leaves the adapters (B starts at zero) at the base's images
    )
    train(cfg)
    grid = np.asarray(Image.open(out / "samples" / "step-000001.png").convert("RGB")).astype(np.int16)
    assert grid.shape == (SIZE + 4, 2 * (SIZE + 2) + 2, 3)  # two prompts, one row, 2-pixel gutters
    pipe = pictor.load(str(base), device="cpu")
    for i, prompt in enumerate(["a red circle", "zorblax, blue"]):
        request = GenerationRequest(prompt, seed=i, steps=3, guidance=2.0, width=SIZE, height=SIZE)
        want = np.asarray(pipe.generate(request)[0].image).astype(np.int16)
        got = grid[2 : 2 + SIZE, 2 + i * (SIZE + 2) : 2 + i * (SIZE + 2) + SIZE]
        assert np.abs(got - want).max() <= 1  # prompt i with seed i, at the grid's steps and guidance


def test_bad_files_and_stages_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    for settings, words in (
        ({"sample_prompts": str(tmp_path / "missing.txt")}, "no such file"),
        ({"sample_prompts": str(empty)}, "no prompts in it"),
        ({"sample_steps": 0}, "sample_steps"),
    ):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(stage="t2i", out=str(tmp_path / "r"), preset="tiny", **settings).resolve()  # type: ignore[arg-type]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    config = {"lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99], "sample_prompts": str(prompts)}
    with pytest.raises(ConfigError, match="--sample-prompts: for the t2i and lora stages"):
        TrainConfig(stage="layout", out=str(tmp_path / "r"), preset="tiny", **config).validate()  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "t2i", "--out", str(tmp_path / "r"), "--sample-prompts", "p.txt"])
    assert Path(config_from_args(args).sample_prompts or "").is_absolute()
