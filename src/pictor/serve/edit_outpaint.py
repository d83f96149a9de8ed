"""The edit form's outpainting and mask-blend fields: ``expand`` (pixels added on the left, top, right and
bottom, as ``L,T,R,B``), ``fill`` (how the added area starts: ``edge`` or ``noise``) and ``feather``
(pixels of blending inside a mask's edge), as `pictor.editing.EditRequest` names them.

What needs no model is checked here, before a job is queued (also while the model loads): the text of
``expand``, that it grows the canvas at all, the grown size against the server's limits (the output is that
size), and settings that would change nothing (a fill without an expand, a feather without a mask). What
needs the model (multiples of its pixel multiple) is the pipeline's check, whose message
`pipeline_errors` names ``expand``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Form

from pictor.serve.errors import APIError

Expand = Annotated[
    str | None,
    Form(
        description="Outpainting: pixels to add on the left, top, right and bottom, L,T,R,B (e.g. 0,0,64,0 "
        "widens the image by 64 on the right), each a multiple of the model's pixel multiple. The added "
        "area is drawn (and the mask's area too, when one is sent, at the image's own size); the output is "
        "the grown size, which the server's pixel limit applies to. Not with upscale"
    ),
]
Fill = Annotated[
    Literal["edge", "noise"] | None,
    Form(
        description="With expand: how the added area starts: edge (default) repeats the border pixels "
        "outward, noise starts from random pixels (for when the border should not be continued)"
    ),
]
Feather = Annotated[
    int | None,
    Form(
        ge=0,
        description="With a mask: pixels over which the repainted area blends into the kept one, inside "
        "the mask's edge (default 2; 0: a hard edge)",
    ),
]

SIDES = ("left", "top", "right", "bottom")


def _refused(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_parameters")


def expand_form(text: str | None) -> list[int] | None:
    """The expand field as [left, top, right, bottom] pixels, or None when absent or empty. ``L,T,R,B`` or
    the JSON list ``[L, T, R, B]`` (as a JSON client would send a list); a 400 naming expand otherwise."""
    stripped = (text or "").strip()
    if not stripped:
        return None
    inner = stripped[1:-1] if stripped.startswith("[") and stripped.endswith("]") else stripped
    try:
        values = [int(part) for part in inner.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise _refused(
            "expand must be four whole pixel counts LEFT,TOP,RIGHT,BOTTOM, e.g. 0,0,64,0 to add 64 pixels "
            f"on the right; got '{text}'",
            "expand",
        )
    for side, value in zip(SIDES, values, strict=True):
        if value < 0:
            raise _refused(
                f"expand {side} is {value}: expand adds pixels and cannot take any away; give 0 or more "
                "(crop the image first to make it smaller)",
                "expand",
            )
    if not any(values):  # else the "outpainting" would quietly be an img2img of the whole picture
        raise _refused(
            "expand 0,0,0,0 adds nothing; give the pixels to add, e.g. 0,0,64,0, or leave expand out",
            "expand",
        )
    return values


def expanded_size(expand: list[int] | None, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (width, height) of the canvas `expand` grows an image of `size` to; None without expand."""
    if expand is None:
        return None
    left, top, right, bottom = expand
    return size[0] + left + right, size[1] + top + bottom


def check_outpaint_fields(form: dict[str, Any], masked: bool) -> None:
    """Settings that would change nothing, and the one combination the pipeline refuses whatever the model,
    refused at once (also while the model loads), as the CLI refuses them. `masked`: the edit has a mask
    (sent, or the source's transparent pixels)."""
    if form.get("fill") is not None and form.get("expand") is None:
        raise _refused(
            "fill sets how expand's added area starts; send expand too (e.g. 0,0,64,0) or drop fill", "fill"
        )
    if form.get("feather") is not None and not masked:
        # An area added by expand is wholly new: it has no kept pixels to blend with, so no edge to feather.
        raise _refused(
            "feather blends the edge of a mask into the kept picture, and this edit has none; send a mask "
            "(white or transparent = repaint) or drop feather",
            "feather",
        )
    if form.get("expand") is not None and form.get("upscale") is not None:
        # The pipeline's words (edit_upscale.upscale_plan) and field (pipeline_errors), before the model is
        # there to say them.
        raise _refused(
            "an edit either enlarges its source (upscale) or grows its canvas (expand), not both: outpaint "
            "first, then upscale the result in a second edit",
            "upscale",
        )
