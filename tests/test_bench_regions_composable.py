"""benchmarks/bench_regions.py, bench_composable.py and bench_regional_attention.py on the tiny preset: every
row is there, the JSON each prints is the JSON it writes, and the regions' boxes are counted. Scores and
wall-clock numbers are not asserted (a random tiny model, 2 shared CPU cores), only that the times are
positive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--model", "tiny", "-k", "1", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    printed = done.stdout[done.stdout.index("\n{\n") + 1 :]  # the rows' lines, then the whole result
    assert json.loads(printed) == written
    return written


def test_regions_rows(tmp_path: Path) -> None:
    result = _run(
        "bench_regions.py", tmp_path, "--limit", "2", "--strengths", "1,4", "--attention-strengths", "2"
    )
    rows = [
        "prompt only",
        "prompt + regions (strength 1)",
        "prompt + regions (strength 4)",
        "prompt + regional attention (strength 2)",
    ]
    assert [k for k in result if k.startswith("prompt ")] == rows  # the tiny preset has no layout adapter
    for row in rows:
        assert result[row]["images"] == 2 and result[row]["seconds"] > 0 and result[row]["boxes"] == 2
        assert 0 <= result[row]["boxes_held"] <= 1 and 0 <= result[row]["overall"] <= 1


def test_composable_rows(tmp_path: Path) -> None:
    result = _run("bench_composable.py", tmp_path, "--limit", "1")
    assert result["prompts"] == 2 and result["tags"] == ["two_object", "color_attr"]
    for row in ("prompt as written", "parts joined by AND"):
        assert result[row]["images"] == 2 and result[row]["seconds"] > 0
        assert set(result[row]["per_tag"]) == {"two_object", "color_attr"}


def test_regional_attention_timing_rows(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_regional_attention.py"), "--model", "tiny", "--size", "32",
         "--steps", "2", "--regions", "1,3", "--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert json.loads(done.stdout[done.stdout.index("\n{\n") + 1 :]) == written
    assert [row["regions"] for row in written["rows"]] == [1, 3]
    for row in written["rows"]:
        assert row["blend_s"] > 0 and row["attention_s"] > 0
        # (the ratio of the unrounded medians: the rounded seconds give it to about 2%)
        assert row["speedup"] == pytest.approx(row["blend_s"] / row["attention_s"], rel=0.05)
