"""`pictor edit`, `pictor reproduce --source` and `pictor generate --best-of` through the console script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.provenance import read_record

PICTOR = shutil.which("pictor")
COMMON = ("--model", "tiny", "--steps", "2")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PICTOR, "the `pictor` console script is not installed (pip install -e .)"
    return subprocess.run([PICTOR, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "src.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:, :28]).save(tmp_path / "small-mask.png")  # other errors: tests/test_editing.py
    return tmp_path


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_inpaint_then_reproduce_with_the_source(files: Path) -> None:
    out = run("edit", "src.png", "a red circle", "--mask", "mask.png", *COMMON, "-n", "2", "--seed", "9",
              "-o", "edits", cwd=files)  # fmt: skip
    assert out.returncode == 0, out.stderr
    paths = [files / line for line in out.stdout.split()]
    assert [p.name for p in paths] == ["00000-9.png", "00001-10.png"]
    src, keep = _pixels(files / "src.png"), np.asarray(Image.open(files / "mask.png")) == 0
    for p in paths:
        img = _pixels(p)
        np.testing.assert_array_equal(img[keep], src[keep])
        assert np.abs(img[~keep].astype(int) - src[~keep]).mean() > 10
    record = read_record(paths[1])
    assert record["mode"] == "inpaint" and record["seed"] == 10 and record["mask"]["sha256"]

    refused = run("reproduce", str(paths[1]), cwd=files)
    assert refused.returncode == 2 and "--source SRC --mask MASK" in refused.stderr
    again = run("reproduce", str(paths[1]), "--source", "src.png", "--mask", "mask.png", "-o", "r", cwd=files)
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(_pixels(files / again.stdout.split()[0]), _pixels(paths[1]))


def test_outpaint(files: Path) -> None:
    out = run("edit", "src.png", "x", "--expand", "0,4,8,0", *COMMON, "--seed", "1", "-o", "o", cwd=files)
    assert out.returncode == 0, out.stderr
    path = files / out.stdout.split()[0]
    img = _pixels(path)
    assert img.shape == (36, 40, 3)
    np.testing.assert_array_equal(img[4:, :32], _pixels(files / "src.png"))
    assert read_record(path)["expand"] == [0, 4, 8, 0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("edit", "nothing.png", "x"), "image nothing.png: no such file"),
        (("edit", "src.png", "x", "--mask", "small-mask.png"), "the mask is 28x32 but the image is 32x32"),
        (("edit", "src.png", "x", "--expand", "4,4"), "expand must be four pixel counts"),
        (("generate", "x", "--best-of", "2", "--scorer", "nope"), "unknown scorer 'nope'"),
        # Options that would change nothing without the one they serve are refused, not dropped.
        (("generate", "x", "--scorer", "shapes"), "--scorer ranks the images of --best-of N"),
        (("edit", "src.png", "x", "--fill", "noise"), "--fill sets how --expand's new area starts"),
        (("edit", "src.png", "x", "--feather", "4"), "--feather blends the edge of a --mask"),
        (("edit", "src.png", "x", "--expand", "0,0,4,0", "--feather", "4"), "blends the edge of a --mask"),
        (("edit", "src.png", "x", "--expand", "0,0,4,0", "--strength", "0"), "would stay its raw fill"),
        (("generate", "x", "--negative", "y", "--guidance", "1"), "off at guidance 1"),
        (("generate", "x", "-o", "src.png"), "-o src.png: this is a file; give a folder"),  # before sampling
        (("edit", "src.png", "x", "-o", "src.png"), "-o src.png: this is a file; give a folder"),
    ],
)
def test_edit_errors_are_one_clear_line(files: Path, args: tuple[str, ...], message: str) -> None:
    out = run(*args, *COMMON, cwd=files)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_generate_best_of_saves_all_ranked(files: Path) -> None:
    out = run("generate", "a red circle", *COMMON, "--best-of", "3", "--seed", "5", "-o", "best", cwd=files)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert len(lines) == 3 and all(score.startswith("score ") for _, score in lines)
    paths = [files / p for p, _ in lines]
    assert [p.name.split("-")[1] for p in paths] == ["rank1", "rank2", "rank3"]
    records = [read_record(p) for p in paths]
    assert sorted(r["seed"] for r in records) == [5, 6, 7]
    scores = [r["best_of"]["score"] for r in records]
    assert scores == sorted(scores, reverse=True)
    assert [float(s.split()[1]) for _, s in lines] == scores
    assert all(r["best_of"]["scorer"] == "shapes" for r in records)
