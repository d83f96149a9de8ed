"""benchmarks/bench_regions.py and bench_composable.py on the tiny preset: every row is there, the JSON each
prints is the JSON it writes, and the regions' boxes are counted. Scores and wall-clock numbers are not
asserted (a random tiny model, 2 shared CPU cores), only that the times are positive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    result = _run("bench_regions.py", tmp_path, "--limit", "2", "--strengths", "1,4")
    rows = ["prompt only", "prompt + regions (strength 1)", "prompt + regions (strength 4)"]
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
