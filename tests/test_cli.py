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
    ],
)
def test_errors_are_one_clear_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
