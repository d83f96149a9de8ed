"""The CLI through the installed console script, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.provenance import read_record

PICTOR = shutil.which("pictor")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PICTOR, "the `pictor` console script is not installed (pip install -e .)"
    return subprocess.run([PICTOR, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_generate_reproduce_info(tmp_path: Path) -> None:
    out = run(
        "generate",
        "a red circle left of a blue square",
        "--model",
        "tiny",
        "-n",
        "2",
        "--seed",
        "42",
        "--steps",
        "3",
        "--size",
        "32x32",
        "--negative",
        "green",
        "--sampler",
        "heun",
        "-o",
        "imgs",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    paths = [tmp_path / line for line in out.stdout.split()]
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png"]
    assert "untrained" in out.stderr
    record = read_record(paths[1])
    assert record["seed"] == 43 and record["sampler"] == "heun" and record["negative_prompt"] == "green"

    again = run("reproduce", str(paths[1]), "-o", "repro", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    repro = tmp_path / again.stdout.split()[0]
    np.testing.assert_array_equal(np.asarray(Image.open(repro)), np.asarray(Image.open(paths[1])))

    info = run("info", str(paths[0]), "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    parsed = json.loads(info.stdout)
    assert parsed["parameters"]["settings"]["Seed"] == "42"
    assert parsed["pictor"]["prompt"] == "a red circle left of a blue square"


def test_models_lists_presets(tmp_path: Path) -> None:
    out = run("models", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("tiny", "shapes-small", "flux-dev", "flux-schnell"):
        assert name in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "x", "--model", "tiny", "--size", "30x32"), "width 30 does not fit"),
        (("generate", "x", "--model", "no-such-model"), "unknown model 'no-such-model'"),
        (("reproduce", "missing.png"), "no such file"),
        (
            ("generate", "x", "--model", "tiny", "--vae-tile", "9"),
            "VAE tile 9 must be a multiple of 2 pixels",
        ),
        (("generate", "x", "--model", "tiny", "--vae-tile-overlap", "4"), "needs a tile size"),
    ],
)
def test_errors_are_one_clear_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_generate_and_edit_with_a_tiled_autoencoder(tmp_path: Path) -> None:
    """--vae-tile reaches the pipeline for generate and edit, is recorded, and reproduce follows it."""
    common = ("--model", "tiny", "--steps", "2", "--size", "32x32", "--seed", "4", "--vae-tile", "16")
    out = run("generate", "a red circle", *common, "-o", "gen", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    made = tmp_path / out.stdout.split()[0]
    record = read_record(made)
    assert (record["vae_tile"], record["vae_tile_overlap"]) == (16, 4)
    again = run("reproduce", str(made), "-o", "repro", cwd=tmp_path)
    assert again.returncode == 0 and "identical" in again.stdout + again.stderr, again.stderr

    tiling = ("--vae-tile", "16", "--vae-tile-overlap", "6")
    edit = run("edit", str(made), "a blue square", *common[:4], *tiling, "-o", "edit", cwd=tmp_path)
    assert edit.returncode == 0, edit.stderr
    record = read_record(tmp_path / edit.stdout.split()[0])
    assert (record["vae_tile"], record["vae_tile_overlap"], record["mode"]) == (16, 6, "img2img")


def test_generate_with_the_hires_fix(tmp_path: Path) -> None:
    hires = ("--hires", "2", "--hires-strength", "0.4", "--hires-steps", "3")
    out = run(
        "generate", "a red circle", "--model", "tiny", "--steps", "2", "--size", "16x16", *hires, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    made = tmp_path / out.stdout.split()[0]
    assert Image.open(made).size == (32, 32)
    record = read_record(made)
    assert (record["width"], record["hires"]["width"], record["hires"]["steps"]) == (16, 32, 3)
    assert record["hires"]["strength"] == 0.4
    again = run("reproduce", str(made), "-o", "r", cwd=tmp_path)
    assert again.returncode == 0 and "identical" in again.stdout + again.stderr, again.stderr
    refused = run("generate", "x", "--model", "tiny", "--hires", "0.5", cwd=tmp_path)
    assert refused.returncode == 2 and "hires scale must be a number above 1" in refused.stderr


def test_generate_reproduce_and_eval_with_the_first_block_cache(tmp_path: Path) -> None:
    common = ("--steps", "6", "--seed", "4", "--cache-threshold", "0.3")
    out = run("generate", "a red circle left of a blue square", *common, "-o", "gen", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    made = tmp_path / out.stdout.split()[0]
    assert read_record(made)["cache_threshold"] == 0.3
    assert (
        "first-block cache 0.3: " in out.stderr and " of 12 transformer passes ran every block" in out.stderr
    )
    again = run("reproduce", str(made), "-o", "repro", cwd=tmp_path)
    assert again.returncode == 0 and "identical" in again.stdout + again.stderr, again.stderr

    report = tmp_path / "report.json"
    scored = run(
        "eval",
        "shapes",
        "--limit",
        "2",
        "-k",
        "1",
        *common[:2],
        "--cache-threshold",
        "0.3",
        "--out",
        str(report),
        cwd=tmp_path,
    )
    assert scored.returncode == 0, scored.stderr
    assert '"cache_threshold": 0.3' in report.read_text()

    refused = run("generate", "x", "--cache-threshold", "2", cwd=tmp_path)
    assert refused.returncode == 2 and "cache threshold must be between 0 (off) and 1" in refused.stderr
    assert "Traceback" not in refused.stderr
