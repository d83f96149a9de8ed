"""Prompt-adherence scoring on the shapes world, exactly as benchmarks/SHAPES.md specifies.

Typical use:

    specs = load_prompts()                                  # the packaged 300-prompt dev split
    images = [[generate(s["prompt"], seed) for seed in seeds] for s in specs]
    report = score_images(specs, images)  # {"overall", "per_tag", "n_images", "per_prompt", ...}

Detection (background, colour assignment, components, shape classes) lives in shapes_detect.py.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pictor.data.shapes import (
    COLORS,
    MAX_OBJECTS,
    RELATIONS,
    SHAPES,
    TAGS,
    render,
    scene_from_spec,
    scene_layout,
)
from pictor.eval.shapes_detect import SCORER_REVISION, Detection, detect_objects

__all__ = [
    "TAGS",
    "Detection",
    "contact_sheet",
    "detect_objects",
    "ground_truth_images",
    "judge",
    "load_prompts",
    "score_image",
    "score_images",
]

POSITION_MARGIN = 0.05  # of the canvas side along the relation's axis (SHAPES.md)


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """Benchmark specs from a JSON-lines file; by default the dev split shipped with pictor. Each line is
    checked against SHAPES.md's format; an error names the file, the line and what is wrong."""
    if path is None:
        where = "shapes-dev.jsonl"
        text = resources.files("pictor.eval").joinpath(where).read_text(encoding="utf-8")
    else:
        where = str(path)
        if not Path(path).is_file():
            raise ValueError(
                f"--prompts {path}: no such file (a JSON-lines file of specs, as SHAPES.md says)"
            )
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompts {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    specs = []
    text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors)
    # split("\n"), not splitlines(): JSON strings may hold U+2028 or U+0085, which splitlines() breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: line {number}: not valid JSON ({exc.msg})") from None
        problem = spec_problem(spec)
        if problem:
            raise ValueError(f"{where}: line {number}: {problem}")
        specs.append(spec)
    if not specs:
        raise ValueError(f"{where}: no prompts in it; write one JSON spec per line, as SHAPES.md says")
    return specs


def spec_problem(spec: object) -> str | None:
    """What makes `spec` not a benchmark spec of SHAPES.md, or None."""
    if not isinstance(spec, dict):
        return "a spec is a JSON object with tag, prompt, objects and relation"
    if spec.get("tag") not in TAGS:
        return f"tag {spec.get('tag')!r} is not one of {', '.join(TAGS)}"
    if not isinstance(spec.get("prompt"), str):
        return "prompt must be a string"
    objects = spec.get("objects")
    if not isinstance(objects, list) or not objects:
        return "objects must be a non-empty list of {shape, color, count}"
    for i, o in enumerate(objects):
        if not isinstance(o, dict) or o.get("shape") not in SHAPES or o.get("color") not in COLORS:
            shapes, colors = ", ".join(SHAPES), ", ".join(COLORS)
            return f"object {i} must have a shape among {shapes} and a colour among {colors}"
        count = o.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 4:
            return f"object {i}: count must be an integer from 1 to 4, got {count!r}"
    total = sum(o.get("count", 1) for o in objects)
    if total > MAX_OBJECTS:
        return f"a scene holds 1 to {MAX_OBJECTS} objects (SHAPES.md), this spec asks for {total}"
    relation = spec.get("relation")
    if relation is not None:

        def index(v: object) -> bool:  # an int, not 1.0 or True (both pass `in range(n)`)
            return type(v) is int and 0 <= v < len(objects)

        if (
            not isinstance(relation, dict)
            or not index(relation.get("a"))
            or not index(relation.get("b"))
            or relation.get("rel") not in RELATIONS
        ):
            return (
                f"relation must be null or {{a, b, rel}} with a and b indices into objects and rel one of "
                f"{', '.join(RELATIONS)}"
            )
        if relation["a"] == relation["b"]:
            return "relation: a and b must be two different objects"
    return None


def _relation_ok(a: Detection, b: Detection, rel: str, width: int, height: int) -> bool:
    mx, my = POSITION_MARGIN * width, POSITION_MARGIN * height
    if rel == "left of":
        return a.x + mx < b.x
    if rel == "right of":
        return a.x > b.x + mx
    if rel == "above":
        return a.y + my < b.y  # y grows downward
    if rel == "below":
        return a.y > b.y + my
    raise ValueError(f"unknown relation {rel!r}")


def judge(detections: list[Detection], spec: dict, width: int, height: int) -> bool:
    """Whether detections satisfy a spec (SHAPES.md step 4); width/height give the position margin."""
    tag = spec["tag"]
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    found = Counter((d.shape, d.color) for d in detections)
    wanted: Counter = Counter()
    for o in spec["objects"]:
        wanted[(o["shape"], o["color"])] += int(o.get("count", 1))
    if tag == "counting":
        # Exactly `count` objects of that shape and colour; other objects do not matter.
        ok = all(found[key] == n for key, n in wanted.items())
    else:
        # single_object/colors: some object matches; two_object/color_attr/position: each listed object
        # is present (a prompt naming the same object twice needs two of them).
        ok = all(found[key] >= n for key, n in wanted.items())
    rel = spec.get("relation")
    if ok and rel:
        oa, ob = spec["objects"][rel["a"]], spec["objects"][rel["b"]]
        cand_a = [d for d in detections if (d.shape, d.color) == (oa["shape"], oa["color"])]
        cand_b = [d for d in detections if (d.shape, d.color) == (ob["shape"], ob["color"])]
        ok = any(
            da is not db and _relation_ok(da, db, rel["rel"], width, height) for da in cand_a for db in cand_b
        )
    return ok


def score_image(image: np.ndarray, spec: dict) -> bool:
    """Whether one RGB uint8 image [H, W, 3] shows what a benchmark spec asks for."""
    img = np.asarray(image)
    return judge(detect_objects(img), spec, img.shape[1], img.shape[0])


def score_images(specs: list[dict], images_per_spec: list[list[np.ndarray]]) -> dict:
    """Score several images per prompt -> {"overall": mean of the tag accuracies, "per_tag": {tag: acc},
    "n_images": int, "per_prompt": [{"id", "prompt", "tag", "correct": [bool, ...]}], "scorer_revision":
    SCORER_REVISION}.

    per_tag holds the tags present in `specs` (all six for the dev split); each tag's accuracy is over
    all of its images, so every prompt of a tag weighs the same when they have equally many images.
    """
    if len(specs) != len(images_per_spec):
        raise ValueError(f"{len(specs)} specs but {len(images_per_spec)} image lists")
    per_prompt = []
    hits: dict[str, list[bool]] = {}
    for spec, images in zip(specs, images_per_spec, strict=True):
        correct = [bool(score_image(img, spec)) for img in images]
        per_prompt.append(
            {"id": spec.get("id"), "prompt": spec.get("prompt"), "tag": spec["tag"], "correct": correct}
        )
        hits.setdefault(spec["tag"], []).extend(correct)
    per_tag = {tag: float(np.mean(v)) for tag in TAGS if (v := hits.get(tag))}
    overall = float(np.mean(list(per_tag.values()))) if per_tag else 0.0
    n_images = sum(len(v) for v in hits.values())
    return {
        "overall": overall,
        "per_tag": per_tag,
        "n_images": n_images,
        "per_prompt": per_prompt,
        "scorer_revision": SCORER_REVISION,
    }


def ground_truth_images(
    specs: list[dict], k: int, seed: int, size: int | tuple[int, int] = 64
) -> list[list[np.ndarray]]:
    """k renders per spec of scenes that satisfy it; image j of spec i depends only on (seed, i, j)."""
    out = []
    for i, spec in enumerate(specs):
        imgs = []
        for j in range(k):
            rng = np.random.default_rng([seed, i, j])
            imgs.append(render(scene_from_spec(spec, rng), size))
        out.append(imgs)
    return out


def ground_truth_layouts(
    specs: list[dict], k: int, seed: int, size: int | tuple[int, int] = 64
) -> list[list[list[dict]]]:
    """The layouts (boxes with phrases) of the scenes that `ground_truth_images` renders with the same
    arguments: layout j of spec i is that of the scene drawn from (seed, i, j)."""
    return [
        [scene_layout(scene_from_spec(spec, np.random.default_rng([seed, i, j])), size) for j in range(k)]
        for i, spec in enumerate(specs)
    ]


def box_hits(image: np.ndarray, layout: list[dict]) -> list[bool]:
    """Per box: whether a detected object of the phrase's colour and shape has its centroid inside it.
    Phrases name a colour and a shape of the world ("a red circle"), as shapes layouts do."""
    found = detect_objects(image)
    h, w = np.asarray(image).shape[:2]
    hits = []
    for item in layout:
        words = item["phrase"].lower().split()
        color = next((c for c in COLORS if c in words), None)
        shape = next((s for s in SHAPES if s in words or f"{s}s" in words), None)
        x0, y0, x1, y1 = item["box"]
        hits.append(
            any(
                d.color == color and d.shape == shape and x0 <= d.x / w <= x1 and y0 <= d.y / h <= y1
                for d in found
            )
        )
    return hits


_VERDICT_COLORS = {True: (30, 160, 60), False: (210, 40, 40), None: (150, 150, 150)}


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def contact_sheet(
    images: list[np.ndarray],
    labels: list[str],
    verdicts: list[bool | None],
    columns: int = 8,
    cell: int = 128,
) -> Image.Image:
    """A grid for people to look at: each image scaled to `cell` pixels wide (nearest neighbour), framed
    green (correct), red (wrong) or gray (None), with its label written underneath."""
    if not (len(images) == len(labels) == len(verdicts)):
        raise ValueError("images, labels and verdicts must have the same length")
    font = ImageFont.load_default()
    pad, border, line_h, n_lines = 4, 4, 12, 3
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tiles = []
    for img, label, verdict in zip(images, labels, verdicts, strict=True):
        pic = Image.fromarray(np.asarray(img, dtype=np.uint8))
        pic = pic.resize((cell, max(1, round(cell * pic.height / pic.width))), Image.NEAREST)
        tiles.append((pic, _wrap(probe, label, font, cell + 2 * border)[:n_lines], verdict))
    tile_w = cell + 2 * border
    tile_h = max(t[0].height for t in tiles) + 2 * border + n_lines * line_h if tiles else 1
    columns = max(1, min(columns, len(tiles) or 1))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tile_w + pad) + pad, max(1, rows) * (tile_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (pic, lines, verdict) in enumerate(tiles):
        x0, y0 = pad + (i % columns) * (tile_w + pad), pad + (i // columns) * (tile_h + pad)
        draw.rectangle(
            [x0, y0, x0 + tile_w - 1, y0 + pic.height + 2 * border - 1], fill=_VERDICT_COLORS[verdict]
        )
        sheet.paste(pic, (x0 + border, y0 + border))
        for k, line in enumerate(lines):
            draw.text((x0, y0 + pic.height + 2 * border + k * line_h), line, fill="black", font=font)
    return sheet
