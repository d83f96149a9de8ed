"""benchmarks/bench_adherence.py: joins a run's evals with its step times into a table, a plot and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_adherence.py"
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_plot_and_json_from_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000020").mkdir(parents=True)
    config = {"stage": "t2i", "batch_size": 16, "grad_accum": 2, "lr": 3e-4}
    (run / "checkpoints" / "step-000020" / "trainer_state.json").write_text(json.dumps({"config": config}))
    _write_jsonl(run / "log.jsonl", [{"step": s, "loss": 1.0, "time": 36.0 * s} for s in range(1, 21)])
    evals = [
        {"step": 10, "overall": 0.25, "per_tag": dict.fromkeys(TAGS, 0.25), "n_images": 48},
        {
            "step": 20,
            "overall": 0.5,
            "per_tag": {**dict.fromkeys(TAGS, 0.5), "counting": 0.125},
            "n_images": 48,
        },
    ]
    _write_jsonl(run / "eval.jsonl", evals)
    final = tmp_path / "report.json"
    final.write_text(json.dumps({"overall": 0.625, "per_tag": dict.fromkeys(TAGS, 0.625), "n_images": 1200}))
    out = tmp_path / "results"

    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", str(run), "--out", str(out), "--final", str(final)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    rows = printed["rows"]
    assert [r["step"] for r in rows] == [10, 20, 20]
    assert [r["images_seen"] for r in rows] == [320, 640, 640]  # step x batch x accumulation
    assert [r["hours"] for r in rows] == [0.1, 0.2, 0.2]  # 36 s a step
    assert [r["overall"] for r in rows] == [0.25, 0.5, 0.625]
    assert rows[1]["per_tag"]["counting"] == 0.125 and rows[2]["n_images"] == 1200
    assert json.loads((out / "adherence.json").read_text())["rows"] == rows

    table = (out / "adherence.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| 10 ") or line.startswith("| 20 ")]
    assert len(body) == 3
    assert "**0.500**" in body[1] and "0.125" in body[1] and "640" in body[1]

    plot = np.asarray(Image.open(out / "adherence.png").convert("RGB"))
    assert plot.shape == (520, 900, 3)
    black = (plot.sum(axis=2) == 0).sum()  # the overall line and the text are drawn in black
    counting_green = (np.abs(plot.astype(int) - (44, 160, 44)).sum(axis=2) == 0).sum()
    assert black > 500 and counting_green > 50


def _run_with_two_evals(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000020").mkdir(parents=True)
    config = {"stage": "t2i", "batch_size": 8, "lr": 3e-4}
    (run / "checkpoints" / "step-000020" / "trainer_state.json").write_text(json.dumps({"config": config}))
    _write_jsonl(run / "log.jsonl", [{"step": s, "loss": 1.0, "time": 36.0 * s} for s in range(1, 21)])
    evals = [
        {"step": s, "overall": s / 40, "per_tag": dict.fromkeys(TAGS, s / 40), "n_images": 48}
        for s in (10, 20)
    ]
    _write_jsonl(run / "eval.jsonl", evals)
    return run


def test_full_evals_at_several_steps(tmp_path: Path) -> None:
    run = _run_with_two_evals(tmp_path)
    reports = {}
    for step, score in ((10, 0.375), (20, 0.75)):
        reports[step] = tmp_path / f"report-{step}.json"
        reports[step].write_text(json.dumps({"overall": score, "per_tag": dict.fromkeys(TAGS, score)}))
    out = tmp_path / "results"
    args = ["--final", f"10={reports[10]}", "--final", str(reports[20])]  # no STEP: the last eval's
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", str(run), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert [(r["step"], r["overall"]) for r in rows] == [(10, 0.25), (10, 0.375), (20, 0.5), (20, 0.75)]
    assert [r["source"] for r in rows] == [
        "training eval",
        "pictor eval shapes (report-10.json)",
        "training eval",
        "pictor eval shapes (report-20.json)",
    ]
    assert [r["hours"] for r in rows] == [0.1, 0.1, 0.2, 0.2] and rows[1]["images_seen"] == 80

    # each full eval is a hollow square at (hours, overall): its outline is black, inside it is not (the
    # inside point is off the centre because the last point's centre lies on the plot's black frame)
    plot = np.asarray(Image.open(out / "adherence.png").convert("RGB")).astype(int)
    left, top, pw, ph = 70, 50, 900 - 70 - 200, 520 - 50 - 60
    for hours, score in ((0.1, 0.375), (0.2, 0.75)):
        px, py = round(left + pw * hours / 0.2), round(top + ph * (1 - score))
        assert plot[py - 6 : py + 7, px - 6 : px + 7].sum(axis=2).min() == 0
        assert plot[py - 3, px - 3].sum() > 0


def test_a_full_eval_at_a_step_without_an_eval_is_a_clear_error(tmp_path: Path) -> None:
    run = _run_with_two_evals(tmp_path)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"overall": 0.5, "per_tag": dict.fromkeys(TAGS, 0.5)}))
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--run",
            str(run),
            "--out",
            str(tmp_path / "o"),
            "--final",
            f"15={report}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no eval at step 15 (it has 10, 20)" in done.stderr


def test_a_run_without_evals_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text("")
    (tmp_path / "log.jsonl").write_text("")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no evals yet" in done.stderr


def test_a_warm_started_run_continues_the_curve_it_started_from(tmp_path: Path) -> None:
    run = _run_with_two_evals(tmp_path)
    state = run / "checkpoints" / "step-000020" / "trainer_state.json"
    previous = tmp_path / "earlier.json"
    row = {"step": 100, "images_seen": 800, "hours": 1.0, "per_tag": {}, "n_images": 96}
    earlier = [{**row, "overall": 0.2, "source": "training eval"}, {**row, "overall": 0.3, "source": "full"}]
    previous.write_text(json.dumps({"rows": earlier}))

    def bench() -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(SCRIPT), "--run", str(run), "--out", str(tmp_path / "o")]
        return subprocess.run(
            [*cmd, "--previous", str(previous)], capture_output=True, text=True, timeout=120
        )

    done = bench()  # the run's config names no --init bundle: it continues nothing
    assert done.returncode != 0 and "did not start from a bundle" in done.stderr

    state.write_text(json.dumps({"config": {"stage": "t2i", "batch_size": 8, "init": "runs/a/final"}}))
    done = bench()
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert rows[:2] == earlier
    # this run's steps 10 and 20 (batch 8, 36 s a step) follow step 100, 800 images, 1 hour
    assert [(r["step"], r["images_seen"], r["hours"]) for r in rows[2:]] == [(110, 880, 1.1), (120, 960, 1.2)]
    assert [r["overall"] for r in rows[2:]] == [0.25, 0.5]
    table = (tmp_path / "o" / "adherence.md").read_text()
    assert "| 100 | 800 | 1.00 | **0.300**" in table and "| 120 | 960 | 1.20 | **0.500**" in table
