"""`pictor grid` (X/Y/Z plots) and its Python API: each cell is the image `pictor generate` makes with that
cell's settings, reproducible from its PNG; the grid holds the cells where grid.json says, labelled; every
refusal comes before any image is made and writes nothing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pictor
from pictor.checkpoint import save_bundle
from pictor.cli import main
from pictor.generation_request import GeneratedImage, GenerationRequest
from pictor.grid_axes import GridError, parse_axis, plan_grid
from pictor.grid_runs import GridResult, draw_grids, run_grid, write_grid
from pictor.image_grid import PAD
from pictor.lora_files import save_lora
from pictor.models.lora import add_lora
from pictor.pipeline import Pipeline
from pictor.provenance import read_record

from tiny_bundle import tiny_models

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with default-initialised weights (no zeroed layers: every setting shows)."""
    path = tmp_path_factory.mktemp("grid") / "tiny"
    cfg, flux, ae = tiny_models("tiny-grid", trained=True)
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return pictor.load(str(bundle), device="cpu")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def grid(capsys: pytest.CaptureFixture[str], bundle: Path, out: Path, *args: str) -> list[str]:
    code, stdout, err = cli(
        capsys, "grid", PROMPT, "--model", str(bundle), "--device", "cpu", *args, "-o", str(out)
    )
    assert code == 0, err
    return [Path(line).name for line in stdout.split()]


def pixels(path: Path | Image.Image) -> np.ndarray:
    image = path if isinstance(path, Image.Image) else Image.open(path)
    return np.asarray(image.convert("RGB"))


def made(pipe: Pipeline, **settings: Any) -> np.ndarray:
    """The image `pictor generate` makes (it runs exactly this) with these settings."""
    request: dict[str, Any] = {"prompt": PROMPT, "width": 32, "height": 32, "steps": 2, "seed": 4, **settings}
    (image,) = pipe.generate(GenerationRequest(**request))
    return pixels(image.image)


def test_size_and_seed_cells_sit_centred_in_a_labelled_grid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    out = tmp_path / "g"
    printed = grid(capsys, bundle, out, "--steps", "2", "--x", "size=32x32,16x16", "--y", "seed=5,6")
    names = ["cell-x0-y0.png", "cell-x1-y0.png", "cell-x0-y1.png", "cell-x1-y1.png"]
    assert printed == [*names, "grid.png", "grid.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(printed)  # no temp files left behind

    summary = json.loads((out / "grid.json").read_text())
    assert summary["axes"] == {
        "x": {"name": "size", "values": [[32, 32], [16, 16]], "labels": ["32x32", "16x16"]},
        "y": {"name": "seed", "values": [5, 6], "labels": ["5", "6"]},
    }
    ((entry),) = summary["grids"]
    assert entry["file"] == "grid.png" and entry["pad"] == PAD
    (cell_w, cell_h), (left, top) = entry["cell"], entry["margin"]
    assert cell_h == 32 and cell_w >= 32 and left > 0 and top > 0  # row labels at the left, columns' on top

    sheet = pixels(out / "grid.png")
    # columns x rows of cells, each PAD apart and from the edges, plus the label margins
    assert sheet.shape[:2] == (top + 2 * (cell_h + PAD) + PAD, left + 2 * (cell_w + PAD) + PAD)
    assert entry["size"] == [sheet.shape[1], sheet.shape[0]]
    assert (sheet[:top] < 100).any() and (sheet[top:, :left] < 100).any()  # the labels are written
    assert (sheet[: top - 1, left + PAD : left + PAD + cell_w] < 100).any()  # ... above the first column

    for (i, j), name in zip([(0, 0), (1, 0), (0, 1), (1, 1)], names, strict=True):
        size, seed = (32, 16)[i], (5, 6)[j]
        cell = pixels(out / name)
        np.testing.assert_array_equal(cell, made(pipe, width=size, height=size, seed=seed))
        # centred in its cell box
        x0 = left + PAD + i * (cell_w + PAD) + (cell_w - size) // 2
        y0 = top + PAD + j * (cell_h + PAD) + (cell_h - size) // 2
        np.testing.assert_array_equal(sheet[y0 : y0 + size, x0 : x0 + size], cell)
        listed = summary["cells"][2 * j + i]
        assert listed["file"] == name and (listed["x"], listed["y"]) == (i, j)
        assert listed["box"] == [x0, y0, x0 + size, y0 + size] and listed["grid"] == "grid.png"
        assert listed["settings"] == {"size": [size, size], "seed": seed}
        assert listed["generation"]["width"] == size and listed["generation"]["seed"] == seed
        assert listed["generation"]["steps"] == 2
    small = sheet[top + PAD : top + PAD + cell_h, left + 2 * PAD + cell_w : left + 2 * PAD + 2 * cell_w]
    frame = np.ones(small.shape[:2], bool)
    off = (cell_w - 16) // 2
    frame[8:24, off : off + 16] = False
    assert (small[frame] == 255).all()  # white around the smaller picture
    assert not np.array_equal(pixels(out / names[0]), pixels(out / names[2]))  # the seeds differ


def test_steps_and_sampler_with_z_make_one_grid_per_z_value(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    out = tmp_path / "g"
    axes = ("--x", "steps=1,2", "--z", "sampler=euler,heun")
    printed = grid(capsys, bundle, out, "--seed", "4", "--size", "32x32", *axes)
    names = ["cell-x0-z0.png", "cell-x1-z0.png", "cell-x0-z1.png", "cell-x1-z1.png"]
    assert printed == [*names, "grid-z0.png", "grid-z1.png", "grid.json"]
    assert not (out / "grid.png").exists()
    summary = json.loads((out / "grid.json").read_text())
    assert [g["file"] for g in summary["grids"]] == ["grid-z0.png", "grid-z1.png"]
    assert [g["z"] for g in summary["grids"]] == [0, 1]
    assert set(summary["axes"]) == {"x", "z"}
    for k, sampler in enumerate(["euler", "heun"]):
        entry = summary["grids"][k]
        (cell_w, cell_h), (left, top) = entry["cell"], entry["margin"]
        sheet = pixels(out / entry["file"])
        assert left == 0  # no y axis: no row labels
        assert sheet.shape[:2] == (top + cell_h + 2 * PAD, 2 * (cell_w + PAD) + PAD)
        for i, steps in enumerate([1, 2]):
            listed = summary["cells"][2 * k + i]
            assert listed["grid"] == entry["file"] and (listed["x"], listed["z"]) == (i, k)
            assert listed["settings"] == {"steps": steps, "sampler": sampler}
            cell = pixels(out / listed["file"])
            np.testing.assert_array_equal(cell, made(pipe, steps=steps, sampler=sampler))
            x0, y0, x1, y1 = listed["box"]
            np.testing.assert_array_equal(sheet[y0:y1, x0:x1], cell)
    assert not np.array_equal(pixels(out / names[1]), pixels(out / names[3]))  # the sampler shows


def test_prompt_sr_and_guidance_cells_are_generate_and_reproduce_images(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    out = tmp_path / "g"
    common = ("--seed", "4", "--steps", "2", "--size", "32x32")
    grid(capsys, bundle, out, *common, "--x", "prompt=red,blue", "--y", "guidance=1,5")
    for i, colour in enumerate(["red", "blue"]):
        for j, guidance in enumerate([1.0, 5.0]):
            cell = out / f"cell-x{i}-y{j}.png"
            record = read_record(cell)
            assert record["prompt"] == f"a {colour} circle" and record["guidance"] == guidance
            assert record["seed"] == 4
            np.testing.assert_array_equal(
                pixels(cell), made(pipe, prompt=f"a {colour} circle", guidance=guidance)
            )

    # the console command itself, with one cell's settings
    last = out / "cell-x1-y1.png"
    code, stdout, err = cli(
        capsys, "generate", "a blue circle", "--model", str(bundle), "--device", "cpu", *common,
        "--guidance", "5", "-o", str(tmp_path / "gen"),
    )  # fmt: skip
    assert code == 0, err
    np.testing.assert_array_equal(pixels(Path(stdout.split()[0])), pixels(last))
    code, stdout, err = cli(capsys, "reproduce", str(last), "--device", "cpu", "-o", str(tmp_path / "again"))
    assert code == 0, err
    assert "identical" in err
    np.testing.assert_array_equal(pixels(Path(stdout.split()[0])), pixels(last))


def test_lora_axis_sets_the_first_loras_scale_and_restores_it(
    tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    lora = tmp_path / "style.safetensors"
    donor = pictor.load(str(bundle), device="cpu")
    tree = add_lora(donor.transformer, name="style", targets="all", rank=4)
    with torch.no_grad():
        for name, p in tree.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_lora(donor.transformer, lora, adapter="style")

    styled = pictor.load(str(bundle), device="cpu")
    styled.add_lora(lora, 0.8)
    request = GenerationRequest(PROMPT, width=32, height=32, steps=2, seed=4)
    result = run_grid(styled, request, "lora=0,1")
    assert styled.loras[0]["scale"] == 0.8  # the pipeline is as it was
    off, full = result.cells
    assert [c.image.record["loras"][0]["scale"] for c in (off, full)] == [0.0, 1.0]  # type: ignore[union-attr]
    np.testing.assert_array_equal(pixels(off.image.image), made(pipe))  # type: ignore[union-attr]
    at_one = pictor.load(str(bundle), device="cpu")
    at_one.add_lora(lora, 1.0)
    np.testing.assert_array_equal(pixels(full.image.image), made(at_one))  # type: ignore[union-attr]


def _run_nothing(*_args: Any, **_kw: Any) -> Any:
    raise AssertionError("an image was generated before the refusal")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--x", "stpes=1,2"], "unknown axis 'stpes' (did you mean 'steps'?); the axes are steps, guidance"),
        (["--x", "size=32x32,30x32"], "cell size=30x32: width 30 does not fit the latent packing"),
        (["--x", "sampler=euler,fast"], "unknown sampler 'fast'; choose one of euler"),
        (["--x", "prompt=green,blue"], "its first value 'green' is not in the prompt 'a red circle'"),
        (["--x", "steps=1,2", "--y", "steps=3"], "axis steps is both the x and the y axis"),
        (["--x", "guidance=1,2", "--z", "cfg=3"], "axis guidance is both the x and the z axis"),
        (["--x", "steps="], "axis steps has no values"),
        (["--x", "steps=1,,2"], "value 2 of 3 is empty"),
        (["--x", "steps"], "an axis is AXIS=V1,V2,..."),
        (
            ["--x", "seed=1,2,3,4,5,6,7,8,9", "--y", "steps=1,2,3,4,5,6,7,8"],
            "72 cells (9 x 8), more than the 64",
        ),
        (["--x", "seed=1,2,3", "--max-cells", "2"], "3 cells (3), more than the 2 allowed"),
        (["--x", "lora=0,1"], "the lora axis sets the scale of the first --lora; add --lora FILE"),
        (["--x", "steps=1,2", "--steps", "3"], "--steps and the steps axis both set the steps"),
        (
            ["--x", "negative=,blurry", "--guidance", "1"],
            "cell negative='blurry': a negative prompt acts through",
        ),
        (["--x", "cache-threshold=0,5"], "cache threshold must be between 0 (off) and 1, got 5"),
        (["--x", "steps=1,2", "--x", "sampler=euler,heun"], "--x is given twice"),
        (["--x", 'prompt=red,"blue'], "open a double quote they do not close"),
    ],
)
def test_refusals_come_before_any_image_and_write_nothing(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    bundle: Path,
    args: list[str],
    words: str,
) -> None:
    monkeypatch.setattr(Pipeline, "generate", _run_nothing)
    out = tmp_path / "g"
    code, stdout, err = cli(capsys, "grid", PROMPT, "--model", str(bundle), *args, "-o", str(out))
    assert code == 2 and words in err, err
    assert len(err.strip().splitlines()[-1]) > 0 and "Traceback" not in err
    assert not out.exists()  # refused before the first image: not even the folder is made
    assert stdout == ""


def test_a_folder_that_holds_files_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bundle: Path
) -> None:
    monkeypatch.setattr(Pipeline, "generate", _run_nothing)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "grid.png").write_bytes(b"an earlier grid")
    code, _, err = cli(
        capsys, "grid", PROMPT, "--model", str(bundle), "--x", "steps=1", "-o", str(tmp_path / "g")
    )
    assert code == 2 and "the folder is not empty; give a new or empty one" in err
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["grid.png"]
    assert (tmp_path / "g" / "grid.png").read_bytes() == b"an earlier grid"


def test_plans_fix_one_seed_and_parse_quoted_values() -> None:
    plan = plan_grid(GenerationRequest("red on red", seed=None), 'prompt=red,"dark, blue"', "steps=1,2")
    seeds = {c.request.seed for c in plan.cells}
    assert len(seeds) == 1 and None not in seeds  # every cell keeps one (random) seed
    assert [c.request.prompt for c in plan.cells] == ["red on red", "dark, blue on dark, blue"] * 2
    assert [c.request.steps for c in plan.cells] == [1, 1, 2, 2]
    seeded = plan_grid(GenerationRequest("x", seed=9), "seed=1,2", "guidance=3")
    assert [c.request.seed for c in seeded.cells] == [1, 2]
    big = plan_grid(
        GenerationRequest("x"), "seed=" + ",".join(map(str, range(9))), "steps=1,2,3,4,5,6,7,8", max_cells=72
    )
    assert len(big.cells) == 72
    assert parse_axis("size=64x32, 32X64").values == ((64, 32), (32, 64))
    assert parse_axis("cfg=4.5").name == "guidance"
    with pytest.raises(GridError, match="one image per cell"):
        plan_grid(GenerationRequest("x", num_images=2), "steps=1")


def test_an_interrupted_write_leaves_no_half_grid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = plan_grid(GenerationRequest("x", seed=1), "steps=1,2", "guidance=1,2")
    for c in plan.cells:
        picture = Image.fromarray(np.full((8, 8, 3), 40 * c.x + 100 * c.y, np.uint8))
        c.image = GeneratedImage(picture, 1, {})
    result = GridResult(plan, draw_grids(plan))
    real_save = Image.Image.save

    def interrupted(self: Image.Image, fp: Any, *args: Any, **kw: Any) -> None:
        real_save(self, fp, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_grid(result, tmp_path / "g", cells=False)
    assert list((tmp_path / "g").iterdir()) == []  # neither grid.png, nor its temp file, nor grid.json


def test_long_row_labels_get_rows_tall_enough_to_hold_them() -> None:
    """A row label that wraps to several lines makes its row that tall, so a label never runs into its
    neighbours' rows or the title (32 px pictures beside a label of several lines)."""
    from pictor.image_grid import MAX_ROW_LABEL, _font, _line_height, labelled_grid, wrap

    small = [[np.zeros((32, 32, 3), np.uint8)] * 2 for _ in range(3)]
    words = "a very long prompt replacement that wraps onto several lines of text"
    g = labelled_grid(small, ["a", "b"], [words, "short", words], title="a title")
    lines = len(wrap(words, _font(), MAX_ROW_LABEL))
    assert lines >= 3 and g.cell[1] >= lines * _line_height(_font())
    ink = np.asarray(g.image.convert("L")) < 128
    inked = np.flatnonzero(ink[g.margin[1] :, : g.margin[0]].any(axis=1)) + g.margin[1]
    rows = [
        (box[0][1] - (g.cell[1] - 32) // 2 - 1, box[0][1] + 32 + (g.cell[1] - 32) // 2 + 1) for box in g.boxes
    ]
    assert inked.size and all(any(top <= y < bottom for top, bottom in rows) for y in inked)


def test_a_fill_model_refuses_a_grid_before_any_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.serve.test_fill_api import fill_pipeline

    monkeypatch.setattr(Pipeline, "generate", _run_nothing)
    with pytest.raises(GridError, match=r"FLUX\.1 Fill model"):
        run_grid(fill_pipeline(), GenerationRequest(PROMPT, seed=1), parse_axis("steps=1,2"))


def test_regions_and_and_go_with_every_cell(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    regions = [{"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a blue square", "strength": 2.0}]
    common = ("--seed", "4", "--steps", "2", "--size", "32x32")
    grid(capsys, bundle, tmp_path / "r", *common, "--regions", json.dumps(regions), "--x", "guidance=1,5")
    grid(capsys, bundle, tmp_path / "a", *common, "--composable", "--x", "prompt=circle,circle AND a star")
    for i, guidance in enumerate([1.0, 5.0]):
        cell = tmp_path / "r" / f"cell-x{i}.png"
        assert read_record(cell)["regions"] == regions
        np.testing.assert_array_equal(pixels(cell), made(pipe, guidance=guidance, regions=regions))
    for i, prompt in enumerate([PROMPT, "a red circle AND a star"]):
        cell = tmp_path / "a" / f"cell-x{i}.png"
        assert read_record(cell)["composable"] is True
        np.testing.assert_array_equal(pixels(cell), made(pipe, prompt=prompt, composable=True))
