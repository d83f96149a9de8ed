"""Upscaling edits (A1111's "SD upscale", ComfyUI's upscale + KSampler at low denoise): the source, and mask,
enlarged by Lanczos or an upscale model before img2img or inpainting at the larger size; recorded with the
model's hash, reproduced bit-exactly, refused with words that say what to change."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pictor
from pictor.cli import main
from pictor.edit_upscale import upscale_size
from pictor.editing import (
    DEFAULT_UPSCALE_STRENGTH,
    EditError,
    EditRequest,
    SourceUpscaler,
    prepare_edit,
    scaled_size,
)
from pictor.hires import hires_size, upscale
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import ProvenanceError, read_record, read_text_chunks, save_png
from pictor.reproduce import check_record, reproduce
from pictor.upscaler_files import load_upscaler
from tests.test_hires_upscaler import make_upscaler


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pictor.load("default", device="cpu")


def _source(size: tuple[int, int] = (32, 32), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_scaled_size_rounds_to_the_multiple_as_the_hires_fix_does() -> None:
    assert scaled_size(30, 30, 2, 8) == (64, 64)  # 60 -> 64: halves round up
    assert scaled_size(32, 24, 1.5, 8) == (48, 40)  # 36 -> 40
    assert scaled_size(4, 4, 1.5, 16) == (16, 16)  # at least one multiple
    for args in [(32, 32, 2.0, 8), (30, 17, 1.7, 16), (64, 40, 3.3, 8)]:
        assert scaled_size(*args) == hires_size(*args)


def test_lanczos_upscale_enlarges_the_source_and_defaults_to_a_low_strength(pipe: Pipeline) -> None:
    src = _source((30, 30))  # not a multiple of 8: the enlarged size is rounded to one
    (kept,) = pipe.edit(EditRequest(src, "a red circle", upscale=2, strength=0, seed=1, steps=2))
    assert kept.image.size == (64, 64)
    np.testing.assert_array_equal(_px(kept.image), _px(src.resize((64, 64), Image.LANCZOS)))
    (image,) = pipe.edit(EditRequest(src, "a red circle", upscale=2, seed=1, steps=4))
    record = image.record
    assert image.image.size == (64, 64) and record["width"] == 64 and record["height"] == 64
    assert (
        record["strength"] == DEFAULT_UPSCALE_STRENGTH == 0.3 and record["mode"] == "img2img"
    )  # the hires fix's
    assert record["source_upscale"] == {"scale": 2.0, "upscaler": "lanczos", "width": 64, "height": 64}
    assert record["source_image"]["width"] == 30  # the original's hash and size: what reproduce is given
    # it redraws the enlarged picture from t = 0.3: nearer to it than a redraw from noise is
    (redrawn,) = pipe.edit(EditRequest(src, "a red circle", upscale=2, strength=1, seed=1, steps=4))

    def distance(im: Image.Image) -> float:
        return float(np.abs(_px(im).astype(int) - _px(kept.image).astype(int)).mean())

    assert 0 < distance(image.image) < distance(redrawn.image)
    with pytest.raises(EditError, match="multiples of 8"):  # without upscale the size must fit the model
        pipe.edit(EditRequest(src, "a red circle", seed=1, steps=2))


def test_an_upscaling_edit_of_a_first_pass_is_the_hires_fix(pipe: Pipeline) -> None:
    """The hires fix is a first pass and an upscaling edit of it with the same seed: the same pictures (to a
    level of rounding: the two turn 8-bit pixels into model inputs in another order of operations)."""
    prompt = "a red circle above a blue square"
    (first,) = pipe.generate(GenerationRequest(prompt, seed=5, steps=4))
    (hires,) = pipe.generate(GenerationRequest(prompt, seed=5, steps=4, hires_scale=2, hires_strength=0.4))
    (edit,) = pipe.edit(EditRequest(first.image, prompt, seed=5, steps=4, upscale=2, strength=0.4))
    diff = np.abs(_px(hires.image).astype(int) - _px(edit.image).astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3
    (other,) = pipe.edit(EditRequest(first.image, prompt, seed=6, steps=4, upscale=2, strength=0.4))
    assert np.abs(_px(hires.image).astype(int) - _px(other.image).astype(int)).max() > 1  # the test can fail


def test_an_upscale_model_enlarges_and_reproduces_bit_exactly(pipe: Pipeline, tmp_path: Path) -> None:
    file = make_upscaler(tmp_path / "4x-tiny.safetensors", scale=2)
    src = _source((24, 32), seed=3)
    pipe.set_upscaler(file)
    try:
        request = EditRequest(
            src, "a blue square", upscale=2, upscaler="4x-tiny", strength=0, seed=4, steps=2
        )
        (kept,) = pipe.edit(request)
        model = load_upscaler(file)
        np.testing.assert_array_equal(_px(kept.image), upscale([src], 48, 64, model)[0])
        assert np.abs(_px(kept.image).astype(int) - _px(src.resize((48, 64), Image.LANCZOS))).max() > 10

        request = EditRequest(
            src, "a blue square", upscale=2, upscaler="4x-tiny", seed=4, steps=3, num_images=2
        )
        images = pipe.edit(request)
        enlarged = images[1].record["source_upscale"]
        assert enlarged["upscaler"] == "4x-tiny" and enlarged["upscaler_file"]["sha256"] == model.sha256
        path = save_png(images[1].image, images[1].record, tmp_path / "edit.png")
        text = read_text_chunks(path)["parameters"]
        assert "Source upscale: 2, Source upscaler: 4x-tiny" in text
        with pytest.raises(GenerationError, match="pass that source image"):
            reproduce(pipe, read_record(path))
        again = reproduce(pipe, read_record(path), source=src)
        np.testing.assert_array_equal(_px(again.image), _px(images[1].image))

        # Another file under the same name is not the same model: its hash is what counts.
        pipe.set_upscaler(make_upscaler(tmp_path / "other" / "4x-tiny.safetensors", seed=5, scale=2))
        with pytest.raises(
            GenerationError, match=r"enlarged its source .* pass that file with --source-upscaler"
        ):
            reproduce(pipe, read_record(path), source=src)
        pipe.upscaler = None
        with pytest.raises(GenerationError, match="loaded one is none"):
            reproduce(pipe, read_record(path), source=src)
        with pytest.raises(EditError, match="upscaler '4x-tiny' is not loaded \\(none is\\)"):
            pipe.edit(EditRequest(src, "a blue square", upscale=2, upscaler="4x-tiny", steps=2))
    finally:
        pipe.upscaler = None


def test_inpainting_at_the_enlarged_size_keeps_the_enlarged_pixels_outside_the_mask(pipe: Pipeline) -> None:
    src = _source((32, 32), seed=5)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:16] = 255
    request = EditRequest(
        src, "a red circle", mask=Image.fromarray(mask), feather=0, upscale=1.5, seed=2, steps=3
    )
    (image,) = pipe.edit(request)
    assert image.image.size == (48, 48) and image.record["mode"] == "inpaint"
    assert image.record["strength"] == 1.0  # a mask repaints fully by default, as without upscale
    enlarged = _px(src.resize((48, 48), Image.LANCZOS))
    repaint = np.asarray(Image.fromarray(mask).resize((48, 48), Image.NEAREST)) >= 128
    assert repaint.sum() == 18 * 18  # nearest: rows 12..29 and columns 6..23 of the enlarged canvas
    np.testing.assert_array_equal(_px(image.image)[~repaint], enlarged[~repaint])
    assert np.abs(_px(image.image)[repaint].astype(int) - enlarged[repaint]).mean() > 10


def test_the_enlarged_canvas_is_made_once_and_only_when_a_run_needs_it() -> None:
    calls: list[tuple[int, int]] = []

    def enlarge(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
        calls.append((width, height))
        return np.asarray(Image.fromarray(pixels).resize((width, height), Image.NEAREST))

    model = SourceUpscaler("2x-spy", {"file": "2x-spy.safetensors", "sha256": "0" * 64}, enlarge)
    request = EditRequest(_source((16, 16)), "x", upscale=3, upscaler="2x-spy")
    inputs = prepare_edit(request, 8, upscaler=model)
    assert calls == [] and inputs.size == (48, 48)  # validation (the server's) enlarges nothing
    assert inputs.record_fields()["source_upscale"]["upscaler_file"]["file"] == "2x-spy.safetensors"
    assert inputs.canvas.shape == (48, 48, 3) and inputs.canvas.shape == (48, 48, 3)
    assert calls == [(48, 48)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"upscale": 1.0}, "upscale must be a number above 1 and at most 4"),
        ({"upscale": 4.5}, "upscale must be a number above 1 and at most 4"),
        ({"upscale": math.nan}, "upscale must be a number above 1"),
        ({"upscale": True}, "upscale must be a number above 1"),
        ({"upscale": "2"}, "upscale must be a number above 1"),
        ({"upscaler": "4x-tiny"}, "give the upscale factor too"),
        ({"upscale": 2, "upscaler": 5}, "upscaler must be a name"),
        ({"upscale": 2, "expand": (0, 0, 8, 0)}, "outpaint first, then upscale"),
        ({"upscale": 4}, "makes the 16x16 image 64x64, 4,096 pixels; the most pictor makes is 2,048"),
    ],
)
def test_bad_upscales_are_clear_errors(change: dict, message: str) -> None:
    request = EditRequest(_source((16, 16)), "x", **change)
    with pytest.raises(EditError, match=message):
        prepare_edit(request, 8, max_pixels=2048)


def test_lanczos_by_name_needs_no_model_and_damaged_records_are_refused(pipe: Pipeline) -> None:
    (image,) = pipe.edit(EditRequest(_source((16, 16)), "x", upscale=2, upscaler="Lanczos", steps=2))
    record = image.record
    assert record["source_upscale"]["upscaler"] == "lanczos"
    check_record(record)
    named = {"scale": 2.0, "upscaler": "4x-tiny", "width": 32, "height": 32}
    for entry in (None, {}, {"file": None, "sha256": None}, {"file": "x.safetensors"}):  # no usable file
        record["source_upscale"] = {**named, "upscaler_file": entry} if entry is not None else named
        with pytest.raises(ProvenanceError, match="'source_upscale' names an upscale model but not its file"):
            check_record(record)
    record["source_upscale"] = {**named, "scale": 9.0}  # beyond what an edit takes: damaged
    with pytest.raises(ProvenanceError, match="'source_upscale' is"):
        check_record(record)
    record["source_upscale"] = {"scale": "2", "upscaler": "lanczos"}
    with pytest.raises(ProvenanceError, match="'source_upscale' is"):
        check_record(record)


def test_upscaling_edit_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _source((24, 24), seed=7).save(tmp_path / "src.png")
    file = make_upscaler(tmp_path / "models" / "2x-tiny.safetensors", scale=2)
    edit = [
        "edit",
        str(tmp_path / "src.png"),
        "a red circle",
        "--model",
        "tiny",
        "--steps",
        "2",
        "--seed",
        "3",
    ]
    assert main([*edit, "--upscaler", str(file), "-o", str(tmp_path / "e")]) == 2
    assert "add --upscale SCALE" in capsys.readouterr().err
    assert main([*edit, "--upscale", "2", "--upscaler", str(file), "-o", str(tmp_path / "e")]) == 0
    out = Path(capsys.readouterr().out.split()[0])
    assert Image.open(out).size == (48, 48)
    assert read_record(out)["source_upscale"]["upscaler"] == "2x-tiny"
    reproduce_args = ["reproduce", str(out), "--model", "tiny", "--source", str(tmp_path / "src.png")]
    assert main([*reproduce_args, "-o", str(tmp_path / "again")]) == 0
    assert "the pixels are identical" in capsys.readouterr().err
    moved = tmp_path / "moved.safetensors"
    file.rename(moved)
    assert main([*reproduce_args, "-o", str(tmp_path / "again")]) == 2
    assert "is not there; pass it with --source-upscaler FILE" in capsys.readouterr().err
    assert main([*reproduce_args, "--source-upscaler", str(moved), "-o", str(tmp_path / "again2")]) == 0
    assert "the pixels are identical" in capsys.readouterr().err


def test_no_side_shrinks_and_a_mask_drawn_at_either_size_is_kept(pipe: Pipeline) -> None:
    # each side rounds UP to the multiple: 64x19 at 1.05 is 72x24 (rounding to the nearest made it 64x16)
    assert upscale_size(64, 19, 1.05, 8) == (72, 24) and upscale_size(40, 44, 1.5, 4) == (60, 68)
    row = np.zeros((19, 64), np.uint8)
    row[9] = 255  # one row: nearest to the larger size keeps it
    inputs = prepare_edit(EditRequest(_source((64, 19)), "x", mask=Image.fromarray(row), upscale=1.05), 8)
    assert inputs.size == (72, 24) and inputs.mask is not None and inputs.mask.any()
    # a mask with an edge between pixels is enlarged with nearest, not a smoothing filter
    mask = np.zeros((24, 24), np.uint8)
    mask[5:16, 3:14] = 255
    inputs = prepare_edit(EditRequest(_source((24, 24)), "x", mask=Image.fromarray(mask), upscale=1.5), 8)
    want = np.asarray(Image.fromarray(mask).resize((40, 40), Image.Resampling.NEAREST)) >= 128
    np.testing.assert_array_equal(inputs.mask, want)
    # a mask drawn on the enlarged picture is taken as drawn: a one-pixel row there stays
    drawn = np.zeros((48, 48), np.uint8)
    drawn[11] = 255
    inputs = prepare_edit(EditRequest(_source((24, 24)), "x", mask=Image.fromarray(drawn), upscale=2), 8)
    assert np.flatnonzero(inputs.mask.any(axis=1)).tolist() == [11]


def test_fractional_scales_with_a_mask_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    src, mask = _source((24, 24), seed=9), np.zeros((24, 24), np.uint8)
    mask[3:11, 7:20] = 255
    request = EditRequest(src, "a red circle", mask=Image.fromarray(mask), upscale=1.5, seed=6, steps=3)
    (image,) = pipe.edit(request)
    assert image.image.size == (40, 40) and image.record["strength"] == 1.0  # a mask repaints fully
    path = save_png(image.image, image.record, tmp_path / "m.png")
    again = reproduce(pipe, read_record(path), source=src, mask=Image.fromarray(mask))
    np.testing.assert_array_equal(_px(again.image), _px(image.image))
    record = read_record(path)
    record["width"] = 48  # a size its source and settings do not make: damaged, not run
    with pytest.raises(ProvenanceError, match="size 48x40 is not the 40x40 its source and settings make"):
        reproduce(pipe, record, source=src, mask=Image.fromarray(mask))


def test_an_upscale_of_an_upscaling_edit_reproduces_with_both_model_files_moved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _source((24, 24), seed=2).save(tmp_path / "src.png")
    model_a = make_upscaler(tmp_path / "models" / "2x-A.safetensors", seed=1, scale=2)
    model_b = make_upscaler(tmp_path / "models" / "2x-B.safetensors", seed=2, scale=2)
    edit = ["edit", str(tmp_path / "src.png"), "x", "--model", "tiny", "--steps", "2", "--seed", "1"]
    assert main([*edit, "--upscale", "2", "--upscaler", str(model_a), "-o", str(tmp_path / "e")]) == 0
    edited = capsys.readouterr().out.split()[0]
    assert main(["upscale", edited, "--upscaler", str(model_b), "-o", str(tmp_path / "u")]) == 0
    upscaled = capsys.readouterr().out.split()[0]
    moved_a, moved_b = model_a.rename(tmp_path / "A.safetensors"), model_b.rename(tmp_path / "B.safetensors")
    again = [
        "reproduce",
        upscaled,
        "--model",
        "tiny",
        "--source",
        str(tmp_path / "src.png"),
        "-o",
        str(tmp_path),
    ]
    assert main([*again, "--upscaler", str(moved_b), "--source-upscaler", str(moved_a)]) == 0
    assert "the pixels are identical" in capsys.readouterr().err
    # a file for a part the image did not use is refused, not silently unused
    assert main(["reproduce", edited, "--model", "tiny", "--hires-upscaler", str(moved_a)]) == 2
    assert (
        "--hires-upscaler: the image is not a hires fix enlarged by an upscale model"
        in capsys.readouterr().err
    )
    assert main(["reproduce", edited, "--model", "tiny", "--upscaler", str(moved_b)]) == 2
    assert "--upscaler: the image is not made by pictor upscale; drop --upscaler" in capsys.readouterr().err


def test_the_command_line_takes_lanczos_by_name_and_refuses_expand_early(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _source((24, 24)).save(tmp_path / "src.png")
    edit = [
        "edit",
        str(tmp_path / "src.png"),
        "x",
        "--model",
        "tiny",
        "--steps",
        "1",
        "-o",
        str(tmp_path / "e"),
    ]
    assert main([*edit, "--upscale", "2", "--upscaler", "lanczos"]) == 0
    assert read_record(Path(capsys.readouterr().out.split()[0]))["source_upscale"]["upscaler"] == "lanczos"
    assert main([*edit, "--upscale", "2", "--expand", "0,0,8,0", "--model", "no-such-model"]) == 2
    assert "--upscale and --expand do not go together" in capsys.readouterr().err  # before any model loads
