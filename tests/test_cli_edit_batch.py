"""`pictor edit FOLDER PROMPT` (A1111's img2img batch): every picture of the folder, each with the mask of its
name from a --mask folder, one seed for all; everything checked before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.cli import main
from pictor.provenance import read_record

COMMON = ["--model", "tiny", "--steps", "2"]


def _picture(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path: Path, box: tuple[int, int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((32, 32), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(path)


def test_a_folder_is_edited_picture_by_picture_with_its_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, name in enumerate(["b.png", "a.jpg", "c.webp"]):
        _picture(tmp_path / "in" / name, k)
    (tmp_path / "in" / "notes.txt").write_text("not a picture")
    for name, box in (("a.png", (0, 0, 16, 32)), ("b.png", (16, 0, 32, 32)), ("c.png", (0, 0, 32, 16))):
        _mask(tmp_path / "masks" / name, box)
    args = ["edit", str(tmp_path / "in"), "a red circle", *COMMON, "--seed", "4", "-n", "2"]
    assert (
        main([*args, "--mask", str(tmp_path / "masks"), "--feather", "0", "-o", str(tmp_path / "out")]) == 0
    )
    out = [Path(line) for line in capsys.readouterr().out.split()]
    assert [p.name for p in out] == [f"{i:05d}-{stem}-{seed}.png" for i, (stem, seed) in enumerate(
        [("a", 4), ("a", 5), ("b", 4), ("b", 5), ("c", 4), ("c", 5)])]  # fmt: skip
    record = read_record(out[2])
    assert record["mode"] == "inpaint" and record["seed"] == 4
    keep = np.asarray(Image.open(tmp_path / "masks" / "b.png")) == 0
    source = np.asarray(Image.open(tmp_path / "in" / "b.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(out[2]))[keep], source[keep])
    again = ["reproduce", str(out[3]), "--model", "tiny", "--source", str(tmp_path / "in" / "b.png")]
    assert main([*again, "--mask", str(tmp_path / "masks" / "b.png"), "-o", str(tmp_path / "r")]) == 0
    assert "the pixels are identical" in capsys.readouterr().err


def test_a_batch_is_checked_whole_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _picture(tmp_path / "in" / "a.png", 0)
    _picture(tmp_path / "in" / "b.png", 1, size=(30, 32))  # 30: no multiple of the tiny model's 4 pixels
    out = tmp_path / "out"
    assert main(["edit", str(tmp_path / "in"), "x", *COMMON, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b.png: the image is 30x32, but this model needs both sides to be multiples" in err
    assert not out.exists() or not any(out.iterdir())
    # with --upscale the sizes are rounded, so the same folder goes through
    assert main(["edit", str(tmp_path / "in"), "x", *COMMON, "--upscale", "2", "-o", str(out)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert [Image.open(p).size for p in written] == [(64, 64), (60, 64)]
    assert read_record(written[0])["seed"] == read_record(written[1])["seed"]  # one random seed for all

    _mask(tmp_path / "masks" / "a.png", (0, 0, 8, 8))
    assert main(["edit", str(tmp_path / "in"), "x", *COMMON, "--mask", str(tmp_path / "masks")]) == 2
    assert "no mask for b.png; give each picture a mask of its name there" in capsys.readouterr().err
    _mask(tmp_path / "masks" / "b.jpg", (0, 0, 8, 8))
    _mask(tmp_path / "masks" / "b.png", (0, 0, 8, 8))
    assert main(["edit", str(tmp_path / "in"), "x", *COMMON, "--mask", str(tmp_path / "masks")]) == 2
    assert "two masks are named b" in capsys.readouterr().err
    assert (
        main(["edit", str(tmp_path / "in" / "a.png"), "x", *COMMON, "--mask", str(tmp_path / "masks")]) == 2
    )
    assert "--mask is a folder of masks for a folder of pictures" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["edit", str(tmp_path / "empty"), "x", *COMMON]) == 2
    assert "no pictures in this folder" in capsys.readouterr().err
