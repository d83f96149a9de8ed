"""Upscaling edits (A1111's "SD upscale"): the checks of an edit's `upscale` and `upscaler`, and what
enlarges its source and mask. Numpy and PIL only; an upscale model comes in as a function
(`pictor.hires.source_upscaler` makes one), so this module stays torch-free as `pictor.editing` is."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pictor.edit_common import EditError

# An upscaling img2img only adds detail, as the hires fix's second pass does (pictor.hires' default).
DEFAULT_UPSCALE_STRENGTH = 0.3
MAX_UPSCALE = 4.0
LANCZOS = "lanczos"  # the upscaler without a model: PIL's LANCZOS filter


Enlarge = Callable[[np.ndarray, int, int], np.ndarray]  # uint8 [h, w, 3], width, height -> [H, W, 3]


@dataclass(frozen=True)
class SourceUpscaler:
    """An upscale model an edit may enlarge its source with (the pipeline's, from `Pipeline.set_upscaler`):
    its name, what records keep of its file, and the enlarging itself."""

    name: str
    entry: dict[str, Any]  # path, sha256, ... (pictor.upscaling.upscale_record)
    enlarge: Enlarge


def lanczos(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))


def upscale_plan(
    scale: float | None,
    name: str | None,
    expanding: bool,
    width: int,
    height: int,
    multiple: int,
    max_pixels: int,
    upscaler: SourceUpscaler | None,
) -> tuple[dict[str, Any] | None, Enlarge | None]:
    """An upscaling edit's record entry and enlarging function ((None, None) without `upscale`), checked
    before anything is enlarged."""
    if name is not None and not isinstance(name, str):
        raise EditError(f"upscaler must be a name (lanczos, or the loaded upscale model's), got {name!r}")
    model = None if name is None or name.lower() == LANCZOS else name
    if scale is None:
        if model is not None:
            raise EditError(
                f"upscaler '{name}' enlarges the source for an upscaling edit; give the upscale factor too "
                "(e.g. 2)"
            )
        return None, None
    number = isinstance(scale, numbers.Real) and not isinstance(scale, bool)  # numpy's numbers too
    if not (number and math.isfinite(scale) and 1.0 < scale <= MAX_UPSCALE):
        raise EditError(
            f"upscale must be a number above 1 and at most {MAX_UPSCALE:g} (e.g. 2), got {scale!r}"
        )
    if expanding:
        raise EditError(
            "an edit either enlarges its source (upscale) or grows its canvas (expand), not both: outpaint "
            "first, then upscale the result in a second edit"
        )
    if model is not None and (upscaler is None or upscaler.name != model):
        loaded = f"'{upscaler.name}' is" if upscaler else "none is"
        raise EditError(
            f"upscaler '{model}' is not loaded ({loaded}); load its file (--upscaler FILE, `pictor serve "
            "--upscaler FILE`), or use lanczos"
        )
    new_w, new_h = upscale_size(width, height, float(scale), multiple)
    if new_w * new_h > max_pixels:  # before anything is enlarged: memory
        raise EditError(
            f"upscale {scale:g} makes the {width}x{height} image {new_w}x{new_h}, {new_w * new_h:,} pixels; "
            f"the most pictor makes is {max_pixels:,}: use a smaller factor"
        )
    record: dict[str, Any] = {
        "scale": float(scale),
        "upscaler": LANCZOS if model is None else model,
        "width": new_w,
        "height": new_h,
    }
    if model is not None and upscaler is not None:
        record["upscaler_file"] = dict(upscaler.entry)  # where it was and what it hashed to, for reproduce
        return record, upscaler.enlarge
    return record, lanczos


def upscale_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """An upscaling edit's size: each side times `scale`, rounded UP to the model's multiple, so that no side
    shrinks or stays (the hires fix rounds halves up instead, which its records keep)."""
    w, h = (multiple * math.ceil(side * scale / multiple - 1e-9) for side in (width, height))
    return w, h
