"""`pictor preprocess canny|depth`: the edge and depth maps ControlNets read, written as PNG by the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_depth_maps import depth_anything_folder  # noqa: F401  (the tiny Depth Anything folder fixture)

from pictor.cli import main
from pictor.depth_maps import depth_map, load_depth_model


def _photo(path: Path, size: tuple[int, int] = (45, 31)) -> Path:
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(path)
    return path


def test_canny_is_opencvs_edges_at_the_pictures_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = _photo(tmp_path / "photo.png")
    out = tmp_path / "sub" / "edges.png"
    umask = os.umask(0o022)
    try:
        assert main(["preprocess", "canny", str(photo), "-o", str(out)]) == 0
    finally:
        os.umask(umask)
    assert capsys.readouterr().out.strip() == str(out)
    got = np.asarray(Image.open(out))
    want = cv2.Canny(np.asarray(Image.open(photo).convert("RGB")), 100, 200)
    assert got.shape == (31, 45, 3) and np.array_equal(got[..., 0], want) and want.any()
    assert main(["preprocess", "canny", str(photo), "-o", str(out), "--thresholds", "20,60"]) == 0
    assert np.array_equal(
        np.asarray(Image.open(out))[..., 1], cv2.Canny(np.asarray(Image.open(photo)), 20, 60)
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert out.stat().st_mode & 0o777 == 0o644  # the umask's mode, as every output pictor writes


def test_depth_is_the_depth_map_of_the_local_model(
    tmp_path: Path,
    depth_anything_folder: Path,  # noqa: F811
) -> None:
    photo = _photo(tmp_path / "photo.png", (40, 28))
    out = tmp_path / "depth.png"
    assert (
        main(["preprocess", "depth", str(photo), "--depth-model", str(depth_anything_folder), "-o", str(out)])
        == 0
    )
    want = depth_map(Image.open(photo), load_depth_model(depth_anything_folder))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    assert np.asarray(want).std() > 0


def test_bad_input_is_refused_with_the_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    depth_anything_folder: Path,  # noqa: F811
) -> None:
    photo = _photo(tmp_path / "photo.png")
    assert main(["preprocess", "canny", str(tmp_path / "missing.png"), "-o", str(tmp_path / "a.png")]) != 0
    assert "missing.png" in capsys.readouterr().err
    assert main(["preprocess", "canny", str(photo), "-o", str(tmp_path / "a.jpg")]) != 0
    assert "name the file .png" in capsys.readouterr().err
    assert (
        main(
            ["preprocess", "depth", str(photo), "--depth-model", str(tmp_path), "-o", str(tmp_path / "d.png")]
        )
        != 0
    )
    assert "config.json" in capsys.readouterr().err
    # the output's name is checked before a model loads
    assert (
        main(["preprocess", "depth", str(photo), "--depth-model", "nowhere", "-o", str(tmp_path / "d.jpg")])
        != 0
    )
    assert "name the file .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["preprocess", "canny", str(photo), "-o", str(tmp_path / "a.png"), "--thresholds", "5"])
