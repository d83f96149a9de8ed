"""Layouts as data: checking a list of boxes with phrases, and moving it with its image's crop and flip.

A layout is a list of ``{"box": [x0, y0, x1, y1], "phrase": "a red circle"}``: the box in fractions of the
image's width and height (0 to 1, y grows downward), the phrase what is (or should be) drawn in it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_PHRASE_CHARS = 1000  # the text encoder reads far fewer tokens; longer is a mistake or an attack
MAX_BOXES = 32
LAYOUT_EXAMPLE = '[{"box": [0.05, 0.3, 0.45, 0.7], "phrase": "a red circle"}]'


class LayoutError(ValueError):
    """A layout or layout adapter that cannot be used; the message says what to change."""


def parse_layout(value: Any) -> list[dict[str, Any]]:
    """A checked, normalised layout from a list of ``{"box", "phrase"}`` objects (or its JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise LayoutError(f"layout: not valid JSON ({exc}); write it like {LAYOUT_EXAMPLE}") from exc
        except RecursionError:  # "[[[[...]]]]" thousands deep: not a layout, and not a server fault
            raise LayoutError(f"layout: JSON nested too deeply; write it like {LAYOUT_EXAMPLE}") from None
    if not isinstance(value, list) or not value:
        raise LayoutError(f"layout: give a non-empty list of boxes, like {LAYOUT_EXAMPLE}")
    if len(value) > MAX_BOXES:
        raise LayoutError(f"layout: at most {MAX_BOXES} boxes, got {len(value)}")
    return [_box(i, item) for i, item in enumerate(value)]


def _box(i: int, item: Any) -> dict[str, Any]:
    where = f"layout box {i}"
    if not isinstance(item, dict) or set(item) - {"box", "phrase"} or "box" not in item:
        raise LayoutError(f"{where}: each box is an object with 'box' and 'phrase', like {LAYOUT_EXAMPLE}")
    box, phrase = item["box"], item.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        raise LayoutError(f"{where}: 'phrase' must be a non-empty string (what to draw in the box)")
    if len(phrase) > MAX_PHRASE_CHARS:
        raise LayoutError(f"{where}: 'phrase' is {len(phrase)} characters; the limit is {MAX_PHRASE_CHARS}")
    if not phrase.isascii():
        try:
            phrase.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, which JSON escapes can carry ("\ud800")
            raise LayoutError(
                f"{where}: 'phrase' is not valid Unicode text (a lone surrogate at character {exc.start})"
            ) from None
    problem = box_problem(box)
    if problem:
        raise LayoutError(f"{where}: {problem}")
    return {"box": [float(v) for v in box], "phrase": phrase.strip()}


def box_problem(box: Any) -> str | None:
    """What is wrong with a box [x0, y0, x1, y1] in fractions of the image (y down), or None (shared by
    layouts and `pictor.regional_prompts`' regions)."""
    if (
        not isinstance(box, list | tuple)
        or len(box) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        or not all(math.isfinite(v) for v in box)
    ):
        return f"'box' must be four numbers [x0, y0, x1, y1], got {box!r}"
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        return (
            f"'box' {list(box)} must be fractions of the image with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
            "(y grows downward); divide pixel coordinates by the width and height"
        )
    return None


def crop_layout(
    layout: list[dict[str, Any]],
    resized: tuple[int, int],
    crop: tuple[int, int, int, int],
    flip: bool = False,
) -> list[dict[str, Any]]:
    """The layout of an image resized to ``resized`` (w, h) and cropped to ``crop`` (left, top, right,
    bottom, in resized pixels), then mirrored if ``flip``; boxes cut off entirely are dropped."""
    nw, nh = resized
    left, top, right, bottom = crop
    cw, ch = right - left, bottom - top
    out = []
    for item in layout:
        x0, y0, x1, y1 = item["box"]
        bx = [min(max((x * nw - left) / cw, 0.0), 1.0) for x in (x0, x1)]
        by = [min(max((y * nh - top) / ch, 0.0), 1.0) for y in (y0, y1)]
        if bx[1] <= bx[0] or by[1] <= by[0]:
            continue
        if flip:
            bx = [1.0 - bx[1], 1.0 - bx[0]]
        out.append({"box": [bx[0], by[0], bx[1], by[1]], "phrase": item["phrase"]})
    return out


def json_arg_text(text: str, option: str, example: str, error: type[ValueError]) -> str:
    """The JSON a command-line option gives: the text itself when it starts like JSON (the parser then says
    what is wrong with it), else the UTF-8 text of the file it names; `error` says what is missing, with
    `example` (shared by --layout and --regions)."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        return stripped
    path = Path(text)
    if not path.is_file():
        raise error(f"{option} {text!r}: no such file; give a JSON file or JSON like {example}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{option} {path}: not UTF-8 text ({exc.reason}); give a JSON file") from None
