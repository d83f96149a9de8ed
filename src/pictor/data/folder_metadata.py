"""An image folder's metadata.jsonl files, as Hugging Face's `imagefolder` reads them: each line's
caption ("text" or "caption"), its layout (boxes with phrases, `pictor.data.layouts`) and, for a
ControlNet, the control picture it names (CONTROL_KEYS); bad lines are skipped and reported together.

Separate from `pictor.data.folder` because reading these lines is a format of its own, checked line by
line, while the dataset only looks up what they said about each image.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pictor.data.folder_files import DatasetWarning, _summary
from pictor.data.layouts import LayoutError, parse_layout

CAPTION_KEYS = ("text", "caption")
# metadata.jsonl keys naming an image's control picture: datasets' second image column, then diffusers'.
CONTROL_KEYS = ("conditioning_image_file_name", "conditioning_image")


@dataclass
class FolderMetadata:
    """What the metadata.jsonl lines said, per image."""

    captions: dict[Path, str]  # image (resolved path) -> caption
    layouts: dict[Path, list[dict[str, Any]]]  # image (resolved path) -> its boxes with phrases
    controls: dict[str, Path]  # image (as the walk spells it, `_as_written`) -> its control picture
    named_controls: set[str]  # every picture a line names as a control (as written)


def _control_entry(rec: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the control picture a metadata line names, or None; a problem with the line, or None)."""
    given = {key: rec[key] for key in CONTROL_KEYS if key in rec}
    if not given:
        return None, None
    for key, value in given.items():
        if not isinstance(value, str) or not value:
            return None, f"{key} must be a path string, got {value!r}"
    if len({os.path.normpath(value) for value in given.values()}) > 1:
        return None, f"{' and '.join(given)} name different pictures; keep one"
    return next(iter(given.values())), None


def _as_written(path: Path) -> str:
    """A path as the folder's walk spells it, normalised ("a/./b" and "a/x/../b" alike) but not resolved:
    a Hugging Face cache links files of equal contents to one blob, and they must stay different files."""
    return os.path.normpath(path)


def read_metadata(metas: list[Path], keys: tuple[str, ...], control_metadata: bool) -> FolderMetadata:
    """The captions (the first of `keys` a line has), layouts and, with `control_metadata`, the control
    pictures that the metadata.jsonl files `metas` give; bad lines and conflicts are warned about."""
    captions: dict[Path, str] = {}
    where: dict[Path, str] = {}  # the line each caption came from, to name both sides of a conflict
    layouts: dict[Path, list[dict[str, Any]]] = {}
    controls: dict[str, Path] = {}
    named_controls: set[str] = set()
    bad: list[tuple[str, str]] = []
    twice: list[tuple[str, str]] = []
    controls_twice: list[tuple[str, str]] = []
    for meta in metas:
        raw = meta.read_bytes()
        for n, data in enumerate(raw.splitlines(), 1):
            if n == 1 and data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows editors)
                data = data[3:]
            if not data.strip():
                continue
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = exc.object[exc.start]
                bad.append((f"{meta}:{n}", f"not UTF-8 (byte {byte:#x}); save the file as UTF-8"))
                continue
            try:
                rec = json.loads(line)
                name = rec["file_name"]
                text = next((rec[k] for k in keys if k in rec), None)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                bad.append((f"{meta}:{n}", f"bad line ({type(exc).__name__})"))
                continue
            if not isinstance(name, str) or not name:
                bad.append((f"{meta}:{n}", f"file_name must be a path string, got {name!r}"))
                continue
            target = (meta.parent / name).resolve()
            if text is not None:
                text = str(text).strip()
                if target in captions and captions[target] != text:
                    twice.append((f"{meta}:{n}", f"{name}: used instead of {where[target]}'s"))
                captions[target], where[target] = text, f"{meta}:{n}"
            if control_metadata:
                control, problem = _control_entry(rec)
                if problem is not None:
                    bad.append((f"{meta}:{n}", f"{problem} (its image is skipped)"))
                elif control is not None:
                    image, picture = _as_written(meta.parent / name), meta.parent / control
                    earlier = controls.get(image)
                    if earlier is not None and _as_written(earlier) != _as_written(picture):
                        entry = (f"{meta}:{n}", f"{name}: {control} used instead of {earlier}")
                        controls_twice.append(entry)
                    controls[image] = picture
                    named_controls.add(_as_written(picture))
            if "layout" in rec:  # boxes with phrases, for layout training (pictor.data.layouts)
                try:
                    layouts[target] = parse_layout(rec["layout"])
                except LayoutError as exc:
                    bad.append((f"{meta}:{n}", f"layout ignored: {exc}"))
    if bad:
        warnings.warn(_summary("metadata.jsonl lines ignored", bad), DatasetWarning, stacklevel=4)
    if twice:
        what = "images captioned twice in metadata.jsonl (the later line wins)"
        warnings.warn(_summary(what, twice), DatasetWarning, stacklevel=4)
    if controls_twice:
        what = "images given a control picture twice in metadata.jsonl (the later line wins)"
        warnings.warn(_summary(what, controls_twice), DatasetWarning, stacklevel=4)
    return FolderMetadata(captions, layouts, controls, named_controls)
