"""`--sample-prompts FILE` (kohya's --sample_prompts): the sample grids draw the file's prompts, image i
with seed i, as `pictor generate` would; a missing, empty or misplaced file is refused before training."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pictor
from pictor.notices import PictorWarning
from pictor.pipeline import GenerationRequest
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.loop import train
from pictor.train.sample_prompts import SamplePrompt, SamplePromptError, parse_line

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a zorblax")
    return data


def _config(base: Path, data: Path, out: Path, prompts: Path) -> TrainConfig:
    """One LoRA step with a sample grid at 3 steps and guidance 2."""
    return TrainConfig(
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


def test_the_grid_draws_the_files_prompts(base: Path, pictures: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# what the grids show\na red circle\n\nzorblax, blue\n")
    out = tmp_path / "run"
    train(_config(base, pictures, out, prompts))
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


def test_kohyas_per_prompt_options_are_read_and_drawn(base: Path, pictures: Path, tmp_path: Path) -> None:
    """A line's --n, --d, --s, --l / --g, --w and --h give that image's negative prompt, seed, steps,
    guidance and size, as `pictor generate` draws them; kohya options pictor does not read are named in a
    warning and never become part of a prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle --n a blue square --d 7 --s 2 --l 3 --w 32 --h 16\nzorblax, blue --ss euler_a --g 1.5\n"
    )
    out = tmp_path / "run"
    with pytest.warns(PictorWarning, match=r"--ss left out"):
        train(_config(base, pictures, out, prompts))
    grid = np.asarray(Image.open(out / "samples" / "step-000001.png").convert("RGB")).astype(np.int16)
    assert grid.shape == (16 + 4, 2 * (32 + 2) + 2, 3)  # cells of the largest height and width
    pipe = pictor.load(str(base), device="cpu")
    wanted = [
        (
            GenerationRequest(
                "a red circle",
                negative_prompt="a blue square",
                seed=7,
                steps=2,
                guidance=3.0,
                width=32,
                height=16,
            ),
            (2, 2),
        ),
        (GenerationRequest("zorblax, blue", seed=1, steps=3, guidance=1.5, width=SIZE, height=SIZE), (2, 36)),
    ]
    for request, (y, x) in wanted:
        want = np.asarray(pipe.generate(request)[0].image).astype(np.int16)
        got = grid[y : y + want.shape[0], x : x + want.shape[1]]
        assert np.abs(got - want).max() <= 1


def test_prompt_lines_are_parsed_as_kohya_writes_them() -> None:
    line = parse_line("a cat, sitting --n dog, blurry --d 3 --s 12 --g 3.5 --w 64 --h 48 --ss ddim", "here")
    assert line == SamplePrompt("a cat, sitting", "dog, blurry", 3, 12, 3.5, 64, 48, ("--ss ddim",))
    assert parse_line("a cat --not an option", "here").ignored == ("--not an option",)  # as kohya splits
    assert parse_line("a cat --l 2 --g 2", "here").guidance == 2.0
    for bad, words in (
        ("a cat --w 30", "--w 30 must be a multiple of 16"),
        ("a cat --l 2 --g 3", "give one guidance"),
        ("a cat --s 0", "steps --s 0"),
        ("a cat --d x", "--d 'x' is not a number"),
        (" --d 3", "no prompt"),
    ):
        with pytest.raises(SamplePromptError, match=words):
            parse_line(bad, "here")
