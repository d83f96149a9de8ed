"""Variation seeds and seed resize (A1111's) through the pipeline, `reproduce`, the records, the A1111 text,
`pictor generate` and `pictor grid` (the noise itself: tests/test_noise_variation.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import pictor
from pictor.checkpoint import save_bundle
from pictor.editing import EditRequest
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.pipeline import Pipeline
from pictor.provenance import parameters_text, read_record
from pictor.reproduce import reproduce
from tests.test_cli_prompt_variants import cli

from tiny_bundle import tiny_models

PROMPT = "a red circle"
FAST = {"steps": 3, "width": 16, "height": 16}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("variation") / "tiny"
    cfg, flux, ae = tiny_models("tiny-variation", trained=True)
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return pictor.load(str(bundle), device="cpu")


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _gen(pipe: Pipeline, **kw: Any) -> list[Any]:
    return pipe.generate(GenerationRequest(PROMPT, **{**FAST, **kw}))


def test_strength_0_is_the_seed_and_1_the_variation_seed(pipe: Pipeline) -> None:
    (plain,) = _gen(pipe, seed=5)
    (other,) = _gen(pipe, seed=11)
    (none,) = _gen(pipe, seed=5, variation_seed=11, variation_strength=0.0)
    (full,) = _gen(pipe, seed=5, variation_seed=11, variation_strength=1.0)
    (some,) = _gen(pipe, seed=5, variation_seed=11, variation_strength=0.3)
    assert np.array_equal(_px(none.image), _px(plain.image)) and "variation_seed" not in none.record
    assert np.abs(_px(full.image) - _px(other.image)).max() <= 1  # slerp at 1: the other noise (to 1e-7)
    assert not np.array_equal(_px(some.image), _px(plain.image))
    # a small strength stays nearer its seed's picture than a large one
    near = np.abs(_px(some.image) - _px(plain.image)).mean()
    assert near < np.abs(_px(full.image) - _px(plain.image)).mean()


def test_images_keep_the_seed_and_count_the_variation_seed_in_any_batch(pipe: Pipeline) -> None:
    settings = {"seed": 5, "variation_seed": 20, "variation_strength": 0.25, "num_images": 3}
    together = _gen(pipe, **settings)
    split = _gen(pipe, **settings, batch_size=2)
    assert [g.seed for g in split] == [5, 5, 5]
    assert [g.record["variation_seed"] for g in split] == [20, 21, 22]
    assert [g.record["batch_seeds"] for g in split] == [[5, 5], [5, 5], [5]]
    for a, b in zip(together, split, strict=True):
        assert np.abs(_px(a.image) - _px(b.image)).max() <= 1
    # image 2 is the one image of its variation seed asked for alone
    (alone,) = _gen(pipe, seed=5, variation_seed=22, variation_strength=0.25)
    assert np.abs(_px(alone.image) - _px(split[2].image)).max() <= 1
    for g in split:  # and each is made again from its own record, batch and all
        assert np.array_equal(_px(reproduce(pipe, g.record).image), _px(g.image))


def test_a_strength_without_a_seed_draws_one_and_records_it(pipe: Pipeline) -> None:
    images = _gen(pipe, seed=1, variation_strength=0.5, num_images=2)
    first = images[0].record["variation_seed"]
    assert isinstance(first, int) and images[1].record["variation_seed"] == first + 1
    assert images[0].record["variation_strength"] == 0.5


def test_seed_resize_centres_the_noise_of_another_size(pipe: Pipeline) -> None:
    r = pipe.resolve_request(GenerationRequest(PROMPT, seed=3, width=16, height=24, seed_resize_from=(8, 16)))
    f = pipe.autoencoder.params.downsample_factor
    noise = pipe.initial_noise([3], 24 // f, 16 // f, r)
    small = pipe.initial_noise([3], 16 // f, 8 // f)
    own = pipe.initial_noise([3], 24 // f, 16 // f)
    top, left = (24 - 16) // f // 2, (16 - 8) // f // 2
    inner = (slice(None), slice(None), slice(top, top + 16 // f), slice(left, left + 8 // f))
    assert torch.equal(noise[inner], small)
    outside = torch.ones_like(noise, dtype=torch.bool)
    outside[inner] = False
    assert torch.equal(noise[outside], own[outside])
    (same,) = _gen(pipe, seed=3, seed_resize_from=(16, 16))  # its own size: the plain noise
    (plain,) = _gen(pipe, seed=3)
    assert np.array_equal(_px(same.image), _px(plain.image))
    (moved,) = _gen(pipe, seed=3, width=16, height=24, seed_resize_from=(8, 16))
    assert moved.record["seed_resize_from"] == [8, 16]
    assert np.array_equal(_px(reproduce(pipe, moved.record).image), _px(moved.image))


def test_hires_and_edits_vary_and_reproduce(pipe: Pipeline) -> None:
    varied = {"variation_seed": 8, "variation_strength": 0.4}
    hires = _gen(pipe, seed=2, hires_scale=2.0, hires_steps=2, seed_resize_from=(24, 16), **varied)
    assert np.array_equal(_px(reproduce(pipe, hires[0].record).image), _px(hires[0].image))
    source = Image.new("RGB", (16, 16), (200, 80, 40))
    edits = pipe.edit(EditRequest(source, PROMPT, strength=0.7, seed=2, steps=3, num_images=2, **varied))
    assert [g.record["variation_seed"] for g in edits] == [8, 9]
    plain = pipe.edit(EditRequest(source, PROMPT, strength=0.7, seed=2, steps=3))
    assert not np.array_equal(_px(edits[0].image), _px(plain[0].image))
    assert np.array_equal(_px(reproduce(pipe, edits[1].record, source=source).image), _px(edits[1].image))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"variation_seed": 4}, "changes nothing without a variation strength"),
        ({"variation_strength": 1.5}, r"from 0 \(off\) to 1"),
        ({"variation_strength": float("nan")}, r"from 0 \(off\) to 1"),
        ({"variation_seed": -1, "variation_strength": 0.2}, "variation seed must be between 0 and"),
        ({"seed_resize_from": (1, 16)}, "positive multiples of 4"),
        ({"seed_resize_from": (6, 16)}, "positive multiples of 4"),
        ({"seed_resize_from": (16,)}, "a size WxH"),
        ({"seed_resize_from": (8192, 4096)}, "pixels; give a smaller size"),
    ],
)
def test_bad_variation_settings_are_clear_errors(
    pipe: Pipeline, settings: dict[str, Any], words: str
) -> None:
    with pytest.raises(GenerationError, match=words):
        _gen(pipe, **settings)


def test_an_edit_refuses_seed_resize(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match="an edit's composition is its picture's"):
        pipe.edit(EditRequest(Image.new("RGB", (16, 16)), PROMPT, seed_resize_from=(16, 16)))


def test_a1111_text_names_them_as_a1111_does(pipe: Pipeline) -> None:
    (g,) = _gen(pipe, seed=5, variation_seed=11, variation_strength=0.25, seed_resize_from=(8, 16))
    text = parameters_text(g.record)
    assert "Variation seed: 11, Variation seed strength: 0.25, Seed resize from: 8x16" in text


def test_the_command_line(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path, pipe: Pipeline
) -> None:
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, "generate", PROMPT, "--model", str(bundle), "--steps", "3", "--size", "16x16", "--device",
        "cpu", "--seed", "5", "-n", "2", "--variation-seed", "20", "--variation-strength", "0.25",
        "--seed-resize-from", "8x16", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    paths = [Path(p) for p in stdout.split()]
    records = [read_record(p) for p in paths]
    assert [(r["seed"], r["variation_seed"], r["seed_resize_from"]) for r in records] == [
        (5, 20, [8, 16]),
        (5, 21, [8, 16]),
    ]
    direct = _gen(
        pipe, seed=5, num_images=2, variation_seed=20, variation_strength=0.25, seed_resize_from=(8, 16)
    )
    for path, g in zip(paths, direct, strict=True):
        assert np.array_equal(_px(Image.open(path)), _px(g.image))
    code, _, err = cli(
        capsys, "generate", PROMPT, "--model", str(bundle), "--variation-seed", "3", "-o", str(out)
    )
    assert code != 0 and "without a variation strength" in err and "Traceback" not in err


def test_grid_axes(capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path, pipe: Pipeline) -> None:
    out = tmp_path / "grid"
    code, _, err = cli(
        capsys, "grid", PROMPT, "--model", str(bundle), "--steps", "3", "--size", "16x16", "--device", "cpu",
        "--seed", "5", "--x", "variation-strength=0,0.5,1", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    cells = sorted(out.glob("*.png"))
    cells = [c for c in cells if not c.name.startswith("grid")]
    records = [read_record(c) for c in cells]
    seeds = {r.get("variation_seed") for r in records if r.get("variation_strength")}
    assert len(seeds) == 1  # one drawn variation seed for every cell
    (plain,) = _gen(pipe, seed=5)
    (full,) = _gen(pipe, seed=seeds.pop())
    by_strength = {r.get("variation_strength", 0): c for r, c in zip(records, cells, strict=True)}
    assert np.array_equal(_px(Image.open(by_strength[0])), _px(plain.image))
    assert np.abs(_px(Image.open(by_strength[1.0])) - _px(full.image)).max() <= 1
    code, _, err = cli(
        capsys,
        "grid",
        PROMPT,
        "--model",
        str(bundle),
        "--x",
        "variation-seed=1,2",
        "-o",
        str(tmp_path / "g2"),
    )
    assert code != 0 and "without a variation strength" in err and "Traceback" not in err


def test_settings_from_an_image_take_them(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path, pipe: Pipeline
) -> None:
    """`--settings-from` a varied image gives its pixels, from its pictor record and from its A1111 text
    alone (the text names the model's file nowhere, so --model is given)."""
    (g,) = _gen(pipe, seed=5, variation_seed=31, variation_strength=0.35, seed_resize_from=(8, 16))
    made = tmp_path / "made.png"
    g.image.save(made, pnginfo=_text_chunk("pictor", json.dumps(g.record)))
    a1111 = tmp_path / "a1111.png"
    g.image.save(a1111, pnginfo=_text_chunk("parameters", parameters_text(g.record)))
    for source in (made, a1111):
        out = tmp_path / source.stem
        code, stdout, err = cli(
            capsys, "generate", "--settings-from", str(source), "--model", str(bundle), "--device", "cpu",
            "-o", str(out),
        )  # fmt: skip
        assert code == 0, err
        (path,) = stdout.split()
        record = read_record(path)
        assert (record["variation_seed"], record["variation_strength"], record["seed_resize_from"]) == (
            31,
            0.35,
            [8, 16],
        )
        assert np.array_equal(_px(Image.open(path)), _px(g.image)), source.name


def _text_chunk(key: str, text: str) -> PngInfo:
    info = PngInfo()
    info.add_text(key, text)
    return info


def test_runs_of_several_prompts_or_pictures_share_one_variation_seed(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path
) -> None:
    """(Found in review: --from-file and an edit folder drew one seed for all but a variation seed each, and
    --variants random varied nothing.)"""
    fast = ("--model", str(bundle), "--steps", "2", "--size", "16x16", "--device", "cpu")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    code, stdout, err = cli(
        capsys, "generate", "--from-file", str(prompts), "--variation-strength", "0.3", *fast,
        "-o", str(tmp_path / "many"),
    )  # fmt: skip
    assert code == 0, err
    records = [read_record(p) for p in stdout.split()]
    assert len({(r["seed"], r["variation_seed"]) for r in records}) == 1
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for k in range(2):
        Image.new("RGB", (16, 16), (40 * k, 90, 200)).save(pictures / f"{k}.png")
    code, stdout, err = cli(
        capsys, "edit", str(pictures), PROMPT, "--variation-strength", "0.3", "--strength", "0.6",
        "--model", str(bundle), "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "edits"),
    )  # fmt: skip
    assert code == 0, err
    records = [read_record(p) for p in stdout.split()]
    assert len(records) == 2 and len({(r["seed"], r["variation_seed"]) for r in records}) == 1
    code, _, err = cli(
        capsys, "generate", "a {red|blue} circle", "--variants", "random", "--variation-strength", "0.3",
        *fast, "-o", str(tmp_path / "random"),
    )  # fmt: skip
    assert code != 0 and "--variants all" in err and "Traceback" not in err
