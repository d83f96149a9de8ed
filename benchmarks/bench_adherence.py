"""Adherence against training time: a t2i run's shapes scores at each of its evals, as a table and a plot.

`pictor train t2i` scores its EMA weights every --eval-every steps on dev prompts spread over the six tags
(RUN/eval.jsonl) and logs each step's wall-clock time (RUN/log.jsonl; the time carries over a --resume).
This joins the two and writes, into --out:
- adherence.json: one row per eval (step, images seen, hours, overall, per-tag, images scored);
- adherence.md: the same as a Markdown table;
- adherence.png: overall and per-tag accuracy against training hours.
`--final [STEP=]REPORT` (repeatable) adds a full `pictor eval shapes --out REPORT` of the model at STEP
(the run's own step; default: its last eval) as a row after that step's training eval; the plot marks
these full evals with squares, apart from the training evals' lines, since they score far more images
(less noise).
`--previous ADHERENCE_JSON`: the run was warm-started (`pictor train t2i --init BUNDLE`) from the model
whose curve that file holds (an earlier output of this script); its rows come first, and this run's
steps, images and hours continue from its last row, so the table reads as one training history.
Prints the JSON.

    python benchmarks/bench_adherence.py --run runs/shapes-small [--out benchmarks/results]
        [--final [STEP=]report.json ...] [--previous adherence.json] [--hardware "2-core CPU"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pictor.data.shapes import TAGS
from pictor.train.logs import read_jsonl
from pictor.train.state import STATE_FILE, find_latest

TAG_COLORS = {
    "single_object": (31, 119, 180),
    "two_object": (255, 127, 14),
    "counting": (44, 160, 44),
    "colors": (214, 39, 40),
    "position": (148, 103, 189),
    "color_attr": (140, 86, 75),
}


def run_config(run: Path) -> dict[str, Any]:
    """The run's TrainConfig, as its newest checkpoint recorded it ({} when it has none yet)."""
    latest = find_latest(run)
    return json.loads((latest / STATE_FILE).read_text()).get("config", {}) if latest else {}


def rows_of(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    for name in ("eval.jsonl", "log.jsonl"):
        if not (run / name).is_file():
            raise SystemExit(
                f"{run / name} not found: give --run the --out folder of a `pictor train t2i` run"
            )
    evals = read_jsonl(run / "eval.jsonl")
    if not evals:
        raise SystemExit(f"{run}/eval.jsonl has no evals yet (the run scores every --eval-every steps)")
    seconds = {r["step"]: float(r["time"]) for r in read_jsonl(run / "log.jsonl")}
    config = run_config(run)
    batch = int(config.get("batch_size", 0)) * int(config.get("grad_accum", 1)) or None
    rows = []
    for e in evals:
        step = int(e["step"])
        rows.append(
            {
                "step": step,
                "images_seen": step * batch if batch else None,
                "hours": round(seconds[step] / 3600, 3) if step in seconds else None,
                "overall": e["overall"],
                "per_tag": e["per_tag"],
                "n_images": e.get("n_images"),
                "source": "training eval",
            }
        )
    return rows, config


def final_spec(text: str) -> tuple[int | None, Path]:
    """`STEP=REPORT` or `REPORT` -> (step or None, path)."""
    step, sep, path = text.partition("=")
    if not sep:
        return None, Path(text)
    if not step.isdigit():
        raise argparse.ArgumentTypeError(f"--final {text!r}: write STEP=REPORT with a whole step number")
    return int(step), Path(path)


def final_row(report_path: Path, step: int | None, evals: list[dict[str, Any]]) -> dict[str, Any]:
    """A full eval's row; images seen and hours come from the training eval at the same step."""
    report = json.loads(report_path.read_text())
    step = evals[-1]["step"] if step is None else step
    same = [r for r in evals if r["step"] == step]
    if not same:
        known = ", ".join(str(r["step"]) for r in evals)
        raise SystemExit(f"--final {step}={report_path}: the run has no eval at step {step} (it has {known})")
    return {
        **{k: same[0][k] for k in ("step", "images_seen", "hours")},
        "overall": report["overall"],
        "per_tag": report["per_tag"],
        "n_images": report.get("n_images"),
        "source": f"pictor eval shapes ({report_path.name})",
    }


def continue_from(previous: Path, rows: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """`rows` of a warm-started run, shifted to follow the last row of an earlier curve (`previous`)."""
    try:
        earlier = json.loads(previous.read_text())["rows"]
        last = earlier[-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise SystemExit(f"--previous {previous}: not an adherence.json with rows ({exc})") from exc
    if not config.get("init"):
        raise SystemExit(
            "--previous: this run did not start from a bundle (no --init in its config), so it does not "
            "continue another curve"
        )
    step0, images0, hours0 = int(last["step"]), last.get("images_seen"), last.get("hours")
    shifted = [
        {
            **r,
            "step": step0 + r["step"],
            "images_seen": images0 + r["images_seen"] if images0 is not None and r["images_seen"] else None,
            "hours": round(hours0 + r["hours"], 3) if hours0 is not None and r["hours"] is not None else None,
        }
        for r in rows
    ]
    return earlier + shifted


def markdown(rows: list[dict[str, Any]], hardware: str) -> str:
    head = ["step", "images seen", "hours", "overall", *TAGS, "images scored", "source"]
    lines = [
        f"Shapes adherence of the default recipe against training time ({hardware}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            str(r["step"]),
            f"{r['images_seen']:,}" if r["images_seen"] else "?",
            f"{r['hours']:.2f}" if r["hours"] is not None else "?",
            f"**{r['overall']:.3f}**",
            *(f"{r['per_tag'].get(t, float('nan')):.3f}" for t in TAGS),
            str(r["n_images"] or "?"),
            r["source"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """A line chart drawn with Pillow (no plotting library is a dependency): accuracy vs hours."""
    width, height = 900, 520
    left, right, top, bottom = 70, 200, 50, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    use_hours = all(r["hours"] is not None for r in rows)
    xs = [r["hours"] if use_hours else r["step"] for r in rows]
    x_max = max(max(xs), 1e-9)
    pw, ph = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return left + pw * x / x_max, top + ph * (1 - y)

    for i in range(11):  # horizontal grid every 0.1
        y = i / 10
        _, py = at(0, y)
        draw.line([(left, py), (left + pw, py)], fill=(225, 225, 225))
        draw.text((left - 8, py), f"{y:.1f}", fill="black", font=font, anchor="rm")
    for i in range(6):
        x = x_max * i / 5
        px, _ = at(x, 0)
        draw.line([(px, top + ph), (px, top + ph + 5)], fill="black")
        draw.text(
            (px, top + ph + 8), f"{x:.2f}" if use_hours else f"{x:.0f}", fill="black", font=font, anchor="mt"
        )
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text(
        (left + pw / 2, height - 18),
        "training hours" if use_hours else "step",
        fill="black",
        font=font,
        anchor="mm",
    )
    draw.text((left + pw / 2, 20), title, fill="black", font=font, anchor="mm")

    training = [(x, r) for x, r in zip(xs, rows, strict=True) if r["source"] == "training eval"]
    series = [
        (tag, TAG_COLORS[tag], 2, [(x, r["per_tag"].get(tag, 0.0)) for x, r in training]) for tag in TAGS
    ]
    series.append(("overall", (0, 0, 0), 4, [(x, r["overall"]) for x, r in training]))
    for n, (name, color, line_width, xy) in enumerate(series):
        points = [at(x, y) for x, y in xy]
        if len(points) > 1:
            draw.line(points, fill=color, width=line_width)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        ly = top + 10 + 22 * n
        draw.line([(left + pw + 15, ly), (left + pw + 40, ly)], fill=color, width=line_width)
        draw.text((left + pw + 48, ly), name, fill="black", font=font, anchor="lm")
    full = [(x, r) for x, r in zip(xs, rows, strict=True) if r["source"] != "training eval"]
    if full:
        for x, r in full:  # a full eval's overall: a hollow black square, not joined to the noisier line
            px, py = at(x, r["overall"])
            draw.rectangle([px - 6, py - 6, px + 6, py + 6], outline=(0, 0, 0), width=3)
        ly = top + 10 + 22 * len(series)
        draw.rectangle([left + pw + 22, ly - 6, left + pw + 34, ly + 6], outline=(0, 0, 0), width=3)
        draw.text((left + pw + 48, ly), "overall, full eval", fill="black", font=font, anchor="lm")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="the --out folder of a t2i run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--final",
        type=final_spec,
        action="append",
        default=[],
        metavar="[STEP=]REPORT",
        help="a `pictor eval shapes --out` report of the model at STEP (default: the last eval); repeatable",
    )
    parser.add_argument(
        "--previous",
        type=Path,
        default=None,
        metavar="ADHERENCE_JSON",
        help="the curve of the bundle this run was --init'ed from (this script's earlier JSON)",
    )
    parser.add_argument("--hardware", default="unspecified hardware", help="where the run trained")
    args = parser.parse_args()

    evals, config = rows_of(args.run)
    finals = [final_row(path, step, evals) for step, path in args.final]
    # each full eval right after the training eval of its step (sorted() keeps that order for equal steps)
    rows = sorted(evals + finals, key=lambda r: r["step"])
    if args.previous is not None:
        rows = continue_from(args.previous, rows, config)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adherence.md").write_text(markdown(rows, args.hardware))
    plot(rows, args.out / "adherence.png", f"shapes-dev adherence, {args.hardware}")
    result = {
        "run": str(args.run),
        "previous": str(args.previous) if args.previous else None,
        "hardware": args.hardware,
        "batch_size": config.get("batch_size"),
        "lr": config.get("lr"),
        "rows": rows,
        "files": [str(args.out / name) for name in ("adherence.md", "adherence.png", "adherence.json")],
    }
    (args.out / "adherence.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
