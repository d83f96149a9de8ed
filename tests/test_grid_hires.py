"""`pictor grid` and the hires fix: the hires, hires-strength (A1111's "Denoising"), hires-steps and
hires-upscaler axes, and generate's --hires-upscaler. Each cell is the image `pictor generate` makes with its
settings (same record, same pixels), reproducible from its PNG; a bad value or a hires setting without a
hires fix is refused, naming the axis and the value, before any image is made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pictor
from pictor.checkpoint import save_bundle
from pictor.generation_request import GenerationRequest
from pictor.grid_axes import GridError, make_axis, parse_axis, plan_grid
from pictor.grid_runs import check_grid, run_grid
from pictor.pipeline import Pipeline
from pictor.provenance import read_record
from pictor.upscaler_files import load_upscaler
from tests.test_cli_grid import PROMPT, cli, grid, pixels
from tests.test_hires_upscaler import make_upscaler

from tiny_bundle import tiny_models

BASE = ("--seed", "4", "--steps", "2", "--size", "32x32")
SCALE_RULE = "hires scale must be a number above 1 and at most 4 (e.g. 2)"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with default-initialised weights (every setting shows in the pixels)."""
    path = tmp_path_factory.mktemp("grid-hires") / "tiny"
    cfg, flux, ae = tiny_models("tiny-grid-hires", trained=True)
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return pictor.load(str(bundle), device="cpu")


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny upscale models that enlarge differently (and differently from Lanczos)."""
    folder = tmp_path_factory.mktemp("upscalers")
    return {
        "a": make_upscaler(folder / "4x-a.safetensors", seed=0),
        "b": make_upscaler(folder / "2x-b.safetensors", seed=5, scale=2),
    }


def made(pipe: Pipeline, upscaler: Path | None = None, **settings: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The image and record `pictor generate` makes (it runs exactly this) with these settings."""
    request: dict[str, Any] = {"prompt": PROMPT, "width": 32, "height": 32, "steps": 2, "seed": 4, **settings}
    before = pipe.upscaler
    try:
        if upscaler is not None:
            pipe.set_upscaler(upscaler)
            request["hires_upscaler"] = pipe.upscaler.name  # type: ignore[union-attr]
        (image,) = pipe.generate(GenerationRequest(**request))
    finally:
        pipe.upscaler = before
    return pixels(image.image), image.record


def reproduced(capsys: pytest.CaptureFixture[str], cell: Path, out: Path) -> np.ndarray:
    code, stdout, err = cli(capsys, "reproduce", str(cell), "--device", "cpu", "-o", str(out))
    assert code == 0, err
    assert "identical" in err
    return pixels(Path(stdout.split()[0]))


def test_hires_and_denoising_axes_make_generate_images_of_their_scale_and_strength(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path, pipe: Pipeline
) -> None:
    out = tmp_path / "g"
    printed = grid(capsys, bundle, out, *BASE, "--x", "hires=off,1.5,2", "--y", "denoising=0.4,0.8")
    assert printed[-2:] == ["grid.png", "grid.json"] and len(printed) == 8
    summary = json.loads((out / "grid.json").read_text())
    assert summary["axes"]["x"] == {
        "name": "hires",
        "values": [None, 1.5, 2.0],
        "labels": ["off", "1.5", "2"],
    }
    assert summary["axes"]["y"]["name"] == "hires-strength"  # A1111's "Denoising" is this axis
    for j, strength in enumerate([0.4, 0.8]):
        for i, (scale, side) in enumerate([(None, 32), (1.5, 48), (2.0, 64)]):
            cell = out / f"cell-x{i}-y{j}.png"
            record = read_record(cell)
            image = pixels(cell)
            assert image.shape[:2] == (side, side)  # the hires scale is the cell's
            settings = {} if scale is None else {"hires_scale": scale, "hires_strength": strength}
            want, want_record = made(pipe, **settings)
            np.testing.assert_array_equal(image, want)
            assert record.get("hires") == want_record.get("hires")  # as generate records it
            listed = summary["cells"][3 * j + i]
            assert listed["settings"] == {"hires": scale, "hires-strength": strength}
            if scale is None:
                assert "hires" not in record and "hires" not in listed["generation"]  # one pass
            else:
                assert record["hires"]["scale"] == scale and record["hires"]["strength"] == strength
                assert record["hires"]["upscaler"] == "lanczos"
                assert listed["generation"]["hires"]["width"] == side
    # hires=off has no second pass for the strength to act on; with a hires fix it shows.
    np.testing.assert_array_equal(pixels(out / "cell-x0-y0.png"), pixels(out / "cell-x0-y1.png"))
    assert not np.array_equal(pixels(out / "cell-x2-y0.png"), pixels(out / "cell-x2-y1.png"))
    cell = out / "cell-x1-y1.png"
    np.testing.assert_array_equal(reproduced(capsys, cell, tmp_path / "again"), pixels(cell))


def test_hires_steps_axis_sets_the_second_pass_and_counts_its_steps(pipe: Pipeline) -> None:
    seen: list[tuple[int, int]] = []
    request = GenerationRequest(PROMPT, width=32, height=32, steps=2, seed=4, hires_scale=1.5)
    result = run_grid(pipe, request, "hires-steps=1,3", progress=lambda i, n: seen.append((i, n)))
    few, many = result.cells
    assert [c.image.record["hires"]["steps"] for c in (few, many)] == [1, 3]  # type: ignore[union-attr]
    np.testing.assert_array_equal(pixels(few.image.image), made(pipe, hires_scale=1.5, hires_steps=1)[0])  # type: ignore[union-attr]
    assert not np.array_equal(pixels(few.image.image), pixels(many.image.image))  # type: ignore[union-attr]
    assert {n for _, n in seen} == {(2 + 1) + (2 + 3)} and seen[-1] == (8, 8)  # both passes of both cells


def test_hires_upscaler_option_names_the_model_in_every_hires_cell(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    bundle: Path,
    pipe: Pipeline,
    upscalers: dict[str, Path],
) -> None:
    out = tmp_path / "g"
    model = upscalers["a"]
    # A hires axis stands for --hires, as --hires-upscaler needs a hires fix.
    grid(capsys, bundle, out, *BASE, "--hires-upscaler", str(model), "--x", "hires=off,1.5")
    off, hires = (read_record(out / f"cell-x{i}.png") for i in range(2))
    assert "hires" not in off
    assert hires["hires"]["upscaler"] == "4x-a"
    assert hires["hires"]["upscaler_file"]["file"] == str(model)
    assert hires["hires"]["upscaler_file"]["sha256"] == load_upscaler(model).sha256
    want, want_record = made(pipe, model, hires_scale=1.5)
    assert hires["hires"] == want_record["hires"]
    np.testing.assert_array_equal(pixels(out / "cell-x1.png"), want)
    assert not np.array_equal(want, made(pipe, hires_scale=1.5)[0])  # the model, not Lanczos, enlarged it
    np.testing.assert_array_equal(reproduced(capsys, out / "cell-x1.png", tmp_path / "r"), want)

    # and with --hires, as `pictor generate` takes them
    out = tmp_path / "g2"
    grid(
        capsys, bundle, out, *BASE, "--hires", "1.5", "--hires-upscaler", str(model), "--x", "hires-steps=1,2"
    )
    assert [read_record(out / f"cell-x{i}.png")["hires"]["upscaler"] for i in range(2)] == ["4x-a", "4x-a"]


def test_hires_upscaler_axis_loads_each_file_once_and_switches_per_cell(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    bundle: Path,
    pipe: Pipeline,
    upscalers: dict[str, Path],
) -> None:
    loads: list[str] = []
    real = Pipeline.set_upscaler

    def counted(self: Pipeline, path: Any) -> dict[str, Any]:
        loads.append(Path(path).name)
        return real(self, path)

    monkeypatch.setattr(Pipeline, "set_upscaler", counted)
    out = tmp_path / "g"
    a, b = upscalers["a"], upscalers["b"]
    axis = f"hires-upscaler=lanczos,{a},{b}"
    grid(capsys, bundle, out, *BASE, "--hires", "1.5", "--x", axis, "--y", "hires-strength=0.3,0.6")
    assert sorted(loads) == ["2x-b.safetensors", "4x-a.safetensors"]  # once each, for six cells
    summary = json.loads((out / "grid.json").read_text())
    assert summary["axes"]["x"]["labels"] == ["lanczos", "4x-a.safetensors", "2x-b.safetensors"]
    images = []
    for i, (name, file) in enumerate([("lanczos", None), ("4x-a", a), ("2x-b", b)]):
        cell = out / f"cell-x{i}-y1.png"
        record = read_record(cell)
        assert record["hires"]["upscaler"] == name and record["hires"]["strength"] == 0.6
        want, want_record = made(pipe, file, hires_scale=1.5, hires_strength=0.6)
        assert record["hires"] == want_record["hires"]
        np.testing.assert_array_equal(pixels(cell), want)
        images.append(want)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    np.testing.assert_array_equal(reproduced(capsys, out / "cell-x2-y1.png", tmp_path / "r"), images[2])

    # From Python, the pipeline's own upscale model is back afterwards.
    assert pipe.upscaler is None
    request = GenerationRequest(PROMPT, width=32, height=32, steps=1, seed=4, hires_scale=1.5)
    run_grid(pipe, request, f"hires-upscaler={b}")
    assert pipe.upscaler is None


def _run_nothing(*_args: Any, **_kw: Any) -> Any:
    raise AssertionError("an image was generated before the refusal")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--x", "hires=1,2"], f"axis hires: {SCALE_RULE}, got 1.0 (or off: no hires fix)"),
        (["--x", "hires=2,4.5"], f"axis hires: {SCALE_RULE}, got 4.5"),
        (["--x", "hires=of"], "axis hires: 'of' is not a number"),
        (
            ["--hires", "2", "--x", "denoising=0.3,1.5"],
            "axis hires-strength: hires strength must be in (0, 1]",
        ),
        (["--hires", "2", "--x", "hires-strength=0"], "picture is redrawn), got 0.0"),
        (["--hires", "2", "--x", "hires-steps=0,5"], "axis hires-steps: hires steps must be between 1 and"),
        (["--hires", "2", "--x", "hires-steps=2.5"], "axis hires-steps: '2.5' is not a whole number"),
        (
            ["--x", "hires-strength=0.3,0.5"],
            "axis hires-strength sets the hires fix's second pass, but the grid has no hires fix: add "
            "--hires SCALE (a hires_scale) or a hires axis, e.g. hires=1.5,2",
        ),
        (["--x", "steps=1,2", "--y", "hires-steps=2"], "axis hires-steps sets the hires fix's second pass"),
        (["--x", "hires-upscaler=lanczos"], "axis hires-upscaler sets the hires fix's second pass"),
        # a hires axis of off alone is no hires fix: the strength would be dropped from every cell
        (["--x", "hires=off", "--y", "denoising=0.3,0.5"], "axis hires-strength sets the hires fix's second"),
        (
            ["--x", "hires=off", "--hires-upscaler", "up.safetensors"],
            "--hires-upscaler enlarges the first pass of the hires fix; add --hires SCALE or a hires axis",
        ),
        (["--hires", "2", "--x", "hires-upscaler=lanczos,no.safetensors"], "'no.safetensors' is not a file"),
        (["--hires", "2", "--x", "hires=1.5,3"], "--hires and the hires axis both set the hires"),
        (
            ["--hires", "2", "--hires-strength", "0.5", "--x", "denoising=0.3"],
            "--hires-strength and the hires-strength axis both set",
        ),
        (["--hires", "2", "--hires-steps", "3", "--x", "hires-steps=1"], "--hires-steps and the hires-steps"),
        (
            ["--x", "steps=1,2", "--hires-upscaler", "up.safetensors"],
            "--hires-upscaler enlarges the first pass of the hires fix; add --hires SCALE or a hires axis",
        ),
        (["--x", "hires=off,2", "--y", "hires-scale=3"], "axis hires is both the x and the y axis"),
        # what the model decides: 32 x 1.05 rounds to 32 in the tiny model's packing (multiples of 4)
        (["--size", "32x32", "--x", "hires=1.05,2"], "cell hires=1.05: hires scale 1.05 rounds 32x32 to the"),
        (["--hires-strength", "0.5", "--x", "steps=1,2"], "hires strength, steps and upscaler need a hires"),
    ],
)
def test_hires_refusals_come_before_any_image_and_write_nothing(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    bundle: Path,
    args: list[str],
    words: str,
) -> None:
    monkeypatch.setattr(Pipeline, "generate", _run_nothing)
    monkeypatch.chdir(tmp_path)  # "up.safetensors" is not there
    out = tmp_path / "g"
    code, stdout, err = cli(capsys, "grid", PROMPT, "--model", str(bundle), *args, "-o", str(out))
    assert code == 2 and words in err, err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()


def test_hires_axes_parse_with_aliases_and_off_cells_drop_the_second_pass(
    tmp_path: Path, upscalers: dict[str, Path]
) -> None:
    assert parse_axis("hires=OFF, 1.5").values == (None, 1.5)
    assert parse_axis("hires-scale=2").name == "hires"
    assert parse_axis("denoising=0.5").name == parse_axis("hires_strength=0.5").name == "hires-strength"
    assert parse_axis("hires_steps=4").values == (4,)
    # Whichever axis comes first, an off cell has no second pass (the pipeline refuses one without a scale).
    for x, y in [("hires=off,2", "hires-strength=0.5"), ("hires-strength=0.5", "hires=off,2")]:
        plan = plan_grid(GenerationRequest(PROMPT, seed=1, hires_steps=3), x, y)
        cells = {c.request.hires_scale: c.request for c in plan.cells}
        assert (cells[None].hires_strength, cells[None].hires_steps) == (None, None)
        assert (cells[2.0].hires_strength, cells[2.0].hires_steps) == (0.5, 3)
    # A model's request name is its file's stem; lanczos is no model; a hires=off cell loads none.
    a = upscalers["a"]
    plan = plan_grid(GenerationRequest(PROMPT, seed=1), f"hires-upscaler=Lanczos,{a}", "hires=off,2")
    assert plan.x.labels == ("lanczos", "4x-a.safetensors")
    assert [(c.request.hires_upscaler, c.upscaler) for c in plan.cells] == [
        (None, None),
        (None, None),
        (None, None),
        ("4x-a", str(a.resolve())),
    ]
    twin = make_upscaler(tmp_path / "other" / a.name, seed=3)
    with pytest.raises(GridError, match=r"both named 4x-a, and cells' records"):
        parse_axis(f"hires-upscaler={a},{twin}")
    upper = make_upscaler(tmp_path / "upper" / "4x-a.SAFETENSORS", seed=4)  # the same name in records
    with pytest.raises(GridError, match=r"both named 4x-a, and cells' records"):
        parse_axis(f"hires-upscaler={a},{upper}")
    # an axis rebuilt from grid.json's values (None: off)
    assert make_axis("hires", [None, 1.5]).labels == ("off", "1.5")
    (tmp_path / "lanczos.safetensors").write_bytes(b"x")
    with pytest.raises(GridError, match="would be taken for Lanczos; rename it"):
        parse_axis(f"hires-upscaler={tmp_path / 'lanczos.safetensors'}")


def test_a_file_that_is_no_upscale_model_is_refused_before_any_image(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pipe: Pipeline
) -> None:
    monkeypatch.setattr(Pipeline, "generate", _run_nothing)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    request = GenerationRequest(PROMPT, width=32, height=32, steps=1, seed=4, hires_scale=2)
    with pytest.raises(GridError, match=r"^axis hires-upscaler: .*bogus\.safetensors"):
        check_grid(pipe, plan_grid(request, f"hires-upscaler=lanczos,{bogus}"))
    with pytest.raises(GridError, match=r"^axis hires-upscaler: "):
        run_grid(pipe, request, f"hires-upscaler={bogus}")
    assert pipe.upscaler is None


def test_a_failing_cell_leaves_the_pipelines_upscaler_as_it_was(
    monkeypatch: pytest.MonkeyPatch, pipe: Pipeline, upscalers: dict[str, Path]
) -> None:
    """The grid switches upscale models per cell; a cell that fails (or a Ctrl-C) puts the pipeline's back."""
    pipe.set_upscaler(upscalers["b"])
    own = pipe.upscaler
    made: list[Any] = []
    real = Pipeline.generate

    def second_fails(self: Pipeline, request: GenerationRequest, **kw: Any) -> Any:
        if made:
            raise RuntimeError("cell 2 failed")
        made.append(request)
        return real(self, request, **kw)

    monkeypatch.setattr(Pipeline, "generate", second_fails)
    request = GenerationRequest(PROMPT, width=32, height=32, steps=1, seed=4, hires_scale=1.5)
    try:
        with pytest.raises(RuntimeError, match="cell 2 failed"):
            run_grid(pipe, request, f"hires-upscaler={upscalers['a']},lanczos")
        assert made and pipe.upscaler is own
    finally:
        pipe.upscaler = None
