"""An edit request resolved against a Pipeline (what `pictor.request_resolution` is for a generation): its
picture and mask prepared (`pictor.editing`), and the generation settings it shares resolved at the
canvas size.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

from pictor.editing import EditInputs, EditRequest, prepare_edit
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.generation_settings import MAX_PIXELS
from pictor.hires import HIRES_FIELDS, source_upscaler

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline

__all__ = ["resolve_edit"]

# An edit's size comes from its image (and expand), never from the request.
_SIZE = ("width", "height")


def resolve_edit(
    pipe: Pipeline, request: EditRequest, reproducing: bool = False
) -> tuple[GenerationRequest, EditInputs]:
    """Validate an edit: its image and mask, and the generation settings at the canvas size
    (`reproducing` as for `resolve_request`)."""
    if request.seed_resize_from is not None:
        raise GenerationError(
            "seed resize from keeps a composition drawn from noise at another size; an edit's "
            "composition is its picture's, so drop it (variation seeds do work on edits)"
        )
    try:
        shared = {
            f.name: getattr(request, f.name)
            for f in fields(GenerationRequest)
            if f.name not in _SIZE and f.name not in HIRES_FIELDS
        }
    except AttributeError as exc:  # a GenerationRequest field EditRequest lacks: a bug, not user error
        raise TypeError(f"EditRequest is missing a GenerationRequest field: {exc}") from exc
    upscaler = source_upscaler(pipe.upscaler) if pipe.upscaler else None  # what request.upscaler names
    work_pixels = pipe.defaults["width"] * pipe.defaults["height"]  # a masked area's, by default
    inputs = prepare_edit(request, pipe.patch, MAX_PIXELS, reproducing, upscaler, work_pixels)
    width, height = inputs.size
    shared_request = GenerationRequest(**{**shared, "width": width, "height": height})
    r = pipe.resolve_request(shared_request, reproducing)
    return r, inputs
