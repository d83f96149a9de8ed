"""`pictor upscale`: pictures enlarged by an upscale model, with provenance (A1111's "Postprocess upscale by /
upscaler"); `pictor reproduce` of what it wrote; `pictor info` on the model file; the hires fix with
`--hires-upscaler` through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.cli import main
from pictor.provenance import read_record, read_text_chunks
from pictor.upscaler_files import load_upscaler
from pictor.upscaling import upscale_image

from test_hires_upscaler import make_upscaler


def _picture(path: Path, size: tuple[int, int] = (21, 13), alpha: bool = False) -> Path:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (size[1], size[0], 4 if alpha else 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture
def upscaler(tmp_path: Path) -> Path:
    return make_upscaler(tmp_path / "models" / "4x-tiny.safetensors")


def test_a_generated_image_keeps_its_record_and_reproduces(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = ["generate", "a red circle", "--model", "tiny", "--steps", "2", "--size", "32x32", "--seed", "7"]
    assert main([*gen, "-o", str(tmp_path / "gen")]) == 0
    source = Path(capsys.readouterr().out.split()[0])
    assert main(["upscale", str(source), "--upscaler", str(upscaler), "-o", str(tmp_path / "up")]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == tmp_path / "up" / f"{source.stem}-x4.png"
    with Image.open(source) as im:
        want = np.asarray(upscale_image(load_upscaler(upscaler), im))
    np.testing.assert_array_equal(_pixels(out), want)
    record, original = read_record(out), read_record(source)
    assert {k: v for k, v in record.items() if k != "upscale"} == original
    up = record["upscale"]
    assert (up["upscaler"], up["scale"], up["model_scale"], up["width"], up["height"]) == (
        "4x-tiny",
        4,
        4,
        128,
        128,
    )
    assert up["file"] == str(upscaler) and (up["tile"], up["overlap"]) == (512, 32)
    chunks = read_text_chunks(out)  # as A1111's Extras tab: the source's text as it was, its own beside it
    assert chunks["parameters"] == read_text_chunks(source)["parameters"]
    post = "Postprocess upscale by: 4, Postprocess upscaler: 4x-tiny"
    assert chunks["postprocessing"] == chunks["extras"] == post

    # The source generated again, then upscaled with the recorded file: the same pixels.
    assert main(["reproduce", str(out), "--model", "tiny", "-o", str(tmp_path / "again")]) == 0
    captured = capsys.readouterr()
    assert "the pixels are identical" in captured.err
    np.testing.assert_array_equal(_pixels(Path(captured.out.strip())), want)

    # The model moved: reproduce says where to pass it, and takes it from there.
    moved = str(shutil.move(upscaler, tmp_path / "4x-tiny.safetensors"))
    assert main(["reproduce", str(out), "--model", "tiny", "-o", str(tmp_path / "again")]) == 2
    assert "is not there; pass it with --upscaler FILE" in capsys.readouterr().err
    assert (
        main(["reproduce", str(out), "--model", "tiny", "--upscaler", moved, "-o", str(tmp_path / "a")]) == 0
    )
    assert "the pixels are identical" in capsys.readouterr().err
    other = make_upscaler(tmp_path / "other.safetensors", seed=9)
    assert (
        main(["reproduce", str(out), "--model", "tiny", "--upscaler", str(other), "-o", str(tmp_path)]) == 2
    )
    assert "not the upscale model this image was made with" in capsys.readouterr().err


def test_any_other_picture_is_named_by_its_pixels_and_reproduces_from_it(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = _picture(tmp_path / "photo.png", alpha=True)
    args = ["upscale", str(picture), "--upscaler", str(upscaler), "--scale", "2", "--tile", "32"]
    assert main([*args, "--overlap", "4", "-o", str(tmp_path / "up")]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out.name == "photo-x2.png"
    got = _pixels(out)
    assert got.shape == (26, 42, 4)  # alpha kept, Lanczos from x4 down to x2
    record = read_record(out)
    assert set(record) == {"upscale", "source_image", "pictor_version"}
    assert (record["source_image"]["width"], record["source_image"]["height"]) == (21, 13)
    assert (record["upscale"]["scale"], record["upscale"]["tile"], record["upscale"]["overlap"]) == (2, 32, 4)
    chunks = read_text_chunks(out)
    assert "parameters" not in chunks  # no generation to tell
    assert chunks["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: 4x-tiny"
    assert main(["info", "--json", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["postprocessing"] == chunks["postprocessing"] and shown["pictor"] == read_record(out)

    assert main(["reproduce", str(out), "-o", str(tmp_path / "again")]) == 2
    assert "pass it as --source" in capsys.readouterr().err
    wrong = _picture(tmp_path / "other.png", size=(21, 13))  # same size, no alpha: other pixels
    assert main(["reproduce", str(out), "--source", str(wrong), "-o", str(tmp_path / "again")]) == 2
    assert "not the picture this upscale was made from" in capsys.readouterr().err
    assert main(["reproduce", str(out), "--source", str(picture), "-o", str(tmp_path / "again")]) == 0
    captured = capsys.readouterr()
    assert "the pixels are identical" in captured.err
    np.testing.assert_array_equal(_pixels(Path(captured.out.strip())), got)

    # An upscale of an upscale names the first upscale's pixels (it cannot be generated again).
    assert main(["upscale", str(out), "--upscaler", str(upscaler), "-o", str(tmp_path / "twice")]) == 0
    twice = read_record(Path(capsys.readouterr().out.strip()))
    assert (twice["source_image"]["width"], twice["source_image"]["height"]) == (42, 26)


def test_bad_input_fails_before_any_work_with_what_to_do(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = _picture(tmp_path / "photo.png")
    cases = {
        ("--tile", "0"): "the tile size must be at least 32",
        ("--overlap", "300"): "under half the tile",
        ("--scale", "0"): "above 0 and at most 16",
        ("--scale", "nan"): "above 0 and at most 16",
    }
    for extra, message in cases.items():
        assert main(["upscale", str(picture), "--upscaler", str(upscaler), *extra, "-o", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err, extra
    assert (
        main(["upscale", str(tmp_path / "missing.png"), "--upscaler", str(upscaler), "-o", str(tmp_path)])
        == 2
    )
    assert "missing.png" in capsys.readouterr().err
    pickle = tmp_path / "4x.pth"
    pickle.write_bytes(b"not opened")
    assert main(["upscale", str(picture), "--upscaler", str(pickle), "-o", str(tmp_path / "o")]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert main(["upscale", str(picture), "--upscaler", str(upscaler), "-o", str(picture)]) == 2
    assert "this is a file" in capsys.readouterr().err
    x2 = make_upscaler(tmp_path / "2x.safetensors", scale=2)
    assert (
        main(["upscale", str(picture), "--upscaler", str(x2), "--scale", "16", "-o", str(tmp_path / "o")])
        == 0
    )
    assert _pixels(Path(capsys.readouterr().out.strip())).shape == (13 * 16, 21 * 16, 3)  # four runs of x2


def test_info_describes_an_upscale_model(upscaler: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(upscaler)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "upscale model (Compact)" and info["scale"] == 4
    assert info["params"]["features"] == 8 and len(info["sha256"]) == 64


def test_hires_upscaler_through_the_cli(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = ["generate", "a red circle", "--model", "tiny", "--steps", "2", "--size", "32x32", "--seed", "3"]
    assert main([*gen, "--hires-upscaler", str(upscaler), "-o", str(tmp_path)]) == 2
    assert "add --hires SCALE" in capsys.readouterr().err
    assert main([*gen, "--hires", "2", "--hires-upscaler", str(upscaler), "-o", str(tmp_path / "g")]) == 0
    out = Path(capsys.readouterr().out.split()[0])
    assert read_record(out)["hires"]["upscaler"] == "4x-tiny"
    assert "Hires upscaler: 4x-tiny" in read_text_chunks(out)["parameters"]
    assert main(["reproduce", str(out), "--model", "tiny", "-o", str(tmp_path / "again")]) == 0
    assert "the pixels are identical" in capsys.readouterr().err
    moved = str(shutil.move(upscaler, tmp_path / "moved.safetensors"))
    assert main(["reproduce", str(out), "--model", "tiny", "-o", str(tmp_path / "again")]) == 2
    assert "is not there; pass it with --hires-upscaler FILE" in capsys.readouterr().err
    again = ["reproduce", str(out), "--model", "tiny", "--hires-upscaler", moved, "-o", str(tmp_path / "a")]
    assert main(again) == 0
    assert "the pixels are identical" in capsys.readouterr().err


def test_16_bit_grey_and_damaged_records_are_upscaled_as_what_they_are(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((9, 11), 8000, dtype=np.uint16)).save(grey)  # 12% grey, not white
    assert main(["upscale", str(grey), "--upscaler", str(upscaler), "-o", str(tmp_path / "g")]) == 0
    out = Path(capsys.readouterr().out.strip())
    eight = Image.fromarray(np.full((9, 11), round(8000 / 257), dtype=np.uint8))
    np.testing.assert_array_equal(_pixels(out), np.asarray(upscale_image(load_upscaler(upscaler), eight)))
    assert _pixels(out).mean() < 100

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("pictor", json.dumps({"prompt": "a"}))  # no steps, seed, model...
    damaged = tmp_path / "damaged.png"
    Image.open(_picture(tmp_path / "plain.png")).save(damaged, pnginfo=info)
    assert main(["upscale", str(damaged), "--upscaler", str(upscaler), "-o", str(tmp_path / "d")]) == 0
    captured = capsys.readouterr()
    assert (
        "warning: the pictor record has no 'steps'" in captured.err
        and "as a picture without a record" in captured.err
    )
    record = read_record(Path(captured.out.strip()))
    assert "prompt" not in record and record["source_image"]["width"] == 21


def test_outputs_never_overwrite_and_records_name_the_model_from_anywhere(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _picture(tmp_path / "a" / "p.png"), _picture(tmp_path / "b" / "p.png", size=(5, 6))
    monkeypatch.chdir(tmp_path)
    relative = str(upscaler.relative_to(tmp_path))  # models/4x-tiny.safetensors
    assert main(["upscale", "a/p.png", "b/p.png", "--upscaler", relative, "-o", "up"]) == 0
    assert main(["upscale", "a/p.png", "--upscaler", relative, "-o", "up"]) == 0
    written = capsys.readouterr().out.split()
    assert written == ["up/p-x4.png", "up/p-x4-1.png", "up/p-x4-2.png"]
    assert [_pixels(tmp_path / w).shape[:2] for w in written] == [(52, 84), (24, 20), (52, 84)]
    assert read_record(tmp_path / written[0])["upscale"]["file"] == str(upscaler)  # absolute
    monkeypatch.chdir(tmp_path / "b")  # elsewhere, the recorded path still finds the model
    assert main(["reproduce", str(tmp_path / written[1]), "--source", str(second), "-o", "r"]) == 0
    assert "the pixels are identical" in capsys.readouterr().err
    del first


def test_pictures_too_large_to_read_back_and_float_pictures_are_refused(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    picture = _picture(tmp_path / "photo.png")  # 21x13
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 21 * 13 * 16 - 1)  # x4 makes 16 times the pixels
    assert main(["upscale", str(picture), "--upscaler", str(upscaler), "-o", str(tmp_path / "o")]) == 2
    assert "makes 0 million pixels, more than the 0 million" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work
    # x3 from a x4 model: the model's own x4 output is what must fit, not only the x3 result
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 21 * 13 * 10)
    assert (
        main(["upscale", str(picture), "--upscaler", str(upscaler), "--scale", "3", "-o", str(tmp_path)]) == 2
    )
    assert "1 run(s) of the x4 model" in capsys.readouterr().err
    monkeypatch.undo()
    floats = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(floats)
    assert main(["upscale", str(floats), "--upscaler", str(upscaler), "-o", str(tmp_path / "f")]) == 2
    assert "floating-point (mode F) picture" in capsys.readouterr().err


def test_a_model_file_named_lanczos_is_refused_for_the_hires_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lanczos = make_upscaler(tmp_path / "Lanczos.safetensors")
    gen = ["generate", "a", "--model", "tiny", "--steps", "2", "--size", "32x32", "--hires", "2"]
    assert main([*gen, "--hires-upscaler", str(lanczos), "-o", str(tmp_path / "o")]) == 2
    assert "would be taken for Lanczos; rename it" in capsys.readouterr().err


def test_a_folder_upscales_the_pictures_directly_in_it(
    tmp_path: Path, upscaler: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = tmp_path / "batch"
    (batch / "deeper").mkdir(parents=True)
    _picture(batch / "b.png", size=(5, 4))
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(batch / "a.JPG")
    _picture(batch / "deeper" / "c.png")  # not in it directly
    (batch / "notes.txt").write_text("not a picture")
    (batch / ".hidden.png").write_bytes(b"")
    one = _picture(tmp_path / "one.png", size=(2, 2))
    assert (
        main(["upscale", str(batch), str(one), "--upscaler", str(upscaler), "-o", str(tmp_path / "o")]) == 0
    )
    names = [Path(p).name for p in capsys.readouterr().out.split()]
    assert names == ["a-x4.png", "b-x4.png", "one-x4.png"]
    (tmp_path / "empty").mkdir()
    assert main(["upscale", str(tmp_path / "empty"), "--upscaler", str(upscaler), "-o", str(tmp_path)]) == 2
    assert "no pictures in this folder" in capsys.readouterr().err
