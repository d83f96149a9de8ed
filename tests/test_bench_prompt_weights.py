"""benchmarks/bench_prompt_weights.py on the tiny preset: every run is there, the JSON it prints is the JSON
it writes, weights on without brackets gives the plain images bit for bit, and colour and shape words (plurals
too) are found and wrapped. Scores and wall-clock numbers are not asserted (a random tiny model, 2 shared
CPU cores), only that the times are positive."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prompt_weights.py"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_prompt_weights", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_words_are_wrapped_at_word_boundaries_plurals_whole() -> None:
    bench = _module()
    assert bench.wrap("three black squares", bench.SHAPE_WORDS, 1.3) == ("three black (squares:1.3)", 1)
    assert bench.wrap("a red star left of a blue circle", bench.COLOUR_WORDS, 1.6) == (
        "a (red:1.6) star left of a (blue:1.6) circle",
        2,
    )
    assert bench.wrap("a starry redness", bench.SHAPE_WORDS, 2) == ("a starry redness", 0)


def test_every_run_on_the_tiny_preset(tmp_path: Path) -> None:
    out = tmp_path / "pw.json"
    args = ["--model", "tiny", "--prompts", "2", "--images", "1", "--weights", "1.5", "--encode-rounds", "1"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout[done.stdout.index("\n{") :])
    assert printed == json.loads(out.read_text())
    assert printed["prompts"] == 2 and printed["images_per_run"] == 2
    runs = printed["runs"]
    assert list(runs) == [
        "plain",
        "weights on, no brackets",
        "colour words x1.5",
        "shape words x1.5",
        "colour words x0.7 (control, below 1)",
    ]
    same = runs["weights on, no brackets"]
    assert same["max_abs_pixel_diff_to_plain"] == 0 and same["gained_vs_plain"] == same["lost_vs_plain"] == 0
    assert runs["colour words x1.5"]["prompts_wrapped"] == 2
    assert "(" in runs["shape words x1.5"]["example_prompt"]
    assert all(r["seconds_per_image"] > 0 for r in runs.values())
    assert all(v > 0 for k, v in printed["text_encoding"].items() if k.endswith("_ms_per_prompt"))
