from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from PIL import Image

PICTOR = shutil.which("pictor")


def test_eval_shapes_ground_truth_through_cli(tmp_path: Path) -> None:
    assert PICTOR
    out = subprocess.run(
        [PICTOR, "eval", "shapes", "--ground-truth", "-k", "2", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["overall"] >= 0.98
    assert set(report["per_tag"]) == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert report["n_images"] == 600
    sheet = Image.open(report["contact_sheet"])
    assert sheet.width > 0 and sheet.height > 0
    assert "overall" in out.stdout


def test_eval_shapes_runs_a_model(tmp_path: Path) -> None:
    from pictor.eval.shapes_run import run_shapes_eval
    from pictor.loading import pipeline_from_preset

    pipe = pipeline_from_preset("tiny", device="cpu")
    report = run_shapes_eval(pipe, None, 2, 5, str(tmp_path / "m.json"), limit=3, steps=1)
    assert report["n_images"] == 6 and report["source"] == "model"
    assert report["model"]["hash"] == pipe.hash
    # seeds are fixed per (prompt, image): the same report twice
    again = run_shapes_eval(pipe, None, 2, 5, None, limit=3, steps=1)
    assert again["per_prompt"] == report["per_prompt"]
    assert (tmp_path / "m.png").is_file()
