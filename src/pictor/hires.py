"""Hires fix: generate at the size the model knows, then upscale each picture and refine it at the larger
size by image-to-image (A1111's "Hires. fix"; in ComfyUI an upscale followed by a KSampler at low denoise).

A model asked straight for a size it was not trained at tends to repeat or lose its composition; the first
pass fixes the composition at the size it knows, and the second only adds detail at the new one, starting
from the upscaled picture noised to t = strength. Both passes use the request's seeds, prompt and guidance.
The helpers here are pure; `Pipeline.run_hires_seeds` runs the passes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from pictor.edit_common import scaled_size
from pictor.edit_upscale import SourceUpscaler
from pictor.upscaler_files import UpscalerFile
from pictor.upscaling import DEFAULT_OVERLAP, DEFAULT_TILE, upscale_image, upscale_record

UPSCALER = "lanczos"  # A1111 names it "Lanczos"; PIL's LANCZOS filter
DEFAULT_STRENGTH = 0.3  # bench_hires.py: 0.3 scored 0.415, 0.5 scored 0.329 (direct 128x128: 0.406)
MAX_SCALE = 4.0
# Request fields that belong to the hires fix (an edit has none of them).
HIRES_FIELDS = ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler")


def hires_problem(
    scale: float | None,
    strength: float | None,
    steps: int | None,
    max_steps: int,
    upscaler: str | None = None,
) -> str | None:
    """What is wrong with hires settings, in words that say what to change; None when fine or not asked."""
    if scale is None:
        if strength is not None or steps is not None or upscaler is not None:
            return "hires strength, steps and upscaler need a hires scale (e.g. 2): give the scale too"
        return None
    if not (math.isfinite(scale) and 1.0 < scale <= MAX_SCALE):
        return f"hires scale must be a number above 1 and at most {MAX_SCALE:g} (e.g. 2), got {scale}"
    if strength is not None and not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        return (
            f"hires strength must be in (0, 1] (how much of the upscaled picture is redrawn), got {strength}"
        )
    if steps is not None and not 1 <= steps <= max_steps:
        return f"hires steps must be between 1 and {max_steps}, got {steps}"
    return None


def hires_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's size: the first's times ``scale``, rounded (halves up) to the nearest size the
    model packs."""
    return scaled_size(width, height, scale, multiple)


def upscale(
    images: list[Image.Image], width: int, height: int, model: UpscalerFile | None = None
) -> np.ndarray:
    """uint8 [B, height, width, 3]: each picture enlarged by the upscale model (with its default tiles) when
    one is given, then resized to the size with Lanczos (A1111's order)."""
    if model is not None:
        images = [upscale_image(model, im, max(width / im.width, height / im.height)) for im in images]
    return np.stack([np.asarray(im.convert("RGB").resize((width, height), Image.LANCZOS)) for im in images])


def source_upscaler(model: UpscalerFile) -> SourceUpscaler:
    """An upscale model as an upscaling edit's enlarger: the same enlarging as the hires fix's."""

    def enlarge(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
        return upscale([Image.fromarray(pixels)], width, height, model)[0]

    return SourceUpscaler(model.name, upscale_record(model, None, DEFAULT_TILE, DEFAULT_OVERLAP), enlarge)


def hires_record(
    scale: float, strength: float, steps: int, width: int, height: int, model: UpscalerFile | None = None
) -> dict[str, Any]:
    """What an image's record keeps of its second pass (its first pass is the record's own settings)."""
    record: dict[str, Any] = {
        "scale": scale,
        "strength": strength,
        "steps": steps,
        "upscaler": UPSCALER if model is None else model.name,
        "width": width,
        "height": height,
    }
    if model is not None:  # where the file was and what it hashed to, for `pictor reproduce`
        record["upscaler_file"] = upscale_record(model, None, DEFAULT_TILE, DEFAULT_OVERLAP)
    return record
