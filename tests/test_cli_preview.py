"""`pictor generate/edit --preview FILE [--preview-method approx|full]`: the file holds the newest live
preview of the running sampler run's first image, and the results are as without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.checkpoint import save_bundle
from pictor.cli_preview import METHODS
from pictor.latent_preview import PREVIEW_METHODS
from tests.test_cli_prompt_variants import cli

from tiny_bundle import tiny_models

PROMPT = "a red circle"
FAST = ("--steps", "3", "--size", "16x16", "--device", "cpu", "--seed", "4")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preview") / "tiny"
    cfg, flux, ae = tiny_models("tiny-preview", trained=True)
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


def _px(path: Path | str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_methods_are_the_pipelines() -> None:
    assert METHODS == PREVIEW_METHODS


@pytest.mark.parametrize(("method", "side"), [("approx", 8), ("full", 16)])  # the tiny model's f is 2
def test_generate_writes_its_preview(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path, method: str, side: int
) -> None:
    plain_code, plain_out, err = cli(
        capsys, "generate", PROMPT, "--model", str(bundle), *FAST, "-o", str(tmp_path / "a")
    )
    assert plain_code == 0, err
    preview = tmp_path / "preview.png"
    code, stdout, err = cli(
        capsys, "generate", PROMPT, "--model", str(bundle), *FAST, "--preview", str(preview),
        "--preview-method", method, "-o", str(tmp_path / "b"),
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(preview).size == (side, side)
    assert not list(tmp_path.glob(".*partial"))  # written beside it and renamed
    assert np.array_equal(_px(stdout.split()[0]), _px(plain_out.split()[0]))  # the result is unchanged
    if method == "full":  # the last step's prediction of a deterministic sampler is the image
        assert np.abs(_px(preview).astype(int) - _px(stdout.split()[0]).astype(int)).max() <= 1


def test_edit_writes_its_preview(capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    Image.new("RGB", (16, 16), (200, 60, 30)).save(source)
    preview = tmp_path / "edit.jpg"
    code, _, err = cli(
        capsys, "edit", str(source), PROMPT, "--model", str(bundle), "--steps", "3", "--device", "cpu",
        "--strength", "0.6", "--preview", str(preview), "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(preview).format == "JPEG"


@pytest.mark.parametrize(
    ("name", "words"),
    [("p.gif", "give a file ending in .png"), ("missing/p.png", "does not exist"), ("dir.png", "folder")],
)
def test_a_bad_preview_file_fails_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, words: str
) -> None:
    (tmp_path / "dir.png").mkdir()
    code, _, err = cli(
        capsys, "generate", PROMPT, "--model", str(tmp_path / "no-such-model"),
        "--preview", str(tmp_path / name), "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code != 0 and words in err and "Traceback" not in err
