"""FLUX.1 ControlNets on the server: the request fields, checked as far as the server can without the model,
the pictures decoded, and what the model card says of the loaded ControlNets.

``pictor serve --controlnet MODEL`` (repeatable, at most `MAX_CONTROLNETS`) loads them with the model, in
order (`Pipeline.add_controlnet`); every request then gives one picture per ControlNet, in that order:

- a generation's JSON: ``controlnet_images`` (a list of base64 PNG, JPEG or WebP files, or data: URLs),
  ``controlnet_scales`` (one number for all, or a list with one per ControlNet), ``controlnet_modes`` (a Union
  ControlNet's mode: a name or number; null for a ControlNet without modes; one for all the Union ones, or a
  list), ``controlnet_start`` and ``controlnet_end`` (the share of the steps they run in);
- an edit's multipart form: the ``controlnet_image`` file field repeated (one per ControlNet, in order),
  and ``controlnet_scales`` / ``controlnet_modes`` as repeated fields, as ``name[]`` fields (what the openai
  client sends for a list in ``extra_body``), or one field holding JSON text (``[0.6, 0.4]``) or a
  comma-separated list (``0.6,0.4``); ``controlnet_start`` / ``controlnet_end`` as numbers.

The pipeline checks the rest (counts against the loaded ControlNets, Union modes, what does not go beside
them) and its messages reach the client in the API's words (`pipeline_errors`). The pictures are kept as the
job's uploads under ``controlnet_images``, a list of upload ids (`upload_retention`).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from fastapi import File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.datastructures import FormData

from pictor.controlnet_requests import MAX_SCALE, NO_MODE, UNION_MODES
from pictor.editing import eight_bit
from pictor.generation_request import GenerationRequest
from pictor.serve.errors import APIError
from pictor.serve.pipeline_errors import FORM_CONTROLNET_FILE
from pictor.serve.settings import MAX_CONTROLNETS, Limits
from pictor.serve.uploads import decode_base64_image, decode_upload

# The request fields, as GenerationRequest names them (and so the job's settings and the JSON body).
FIELDS = ("controlnet_images", "controlnet_scales", "controlnet_modes", "controlnet_start", "controlnet_end")
# The multipart file field: repeated, one file per ControlNet (a JSON body's list is controlnet_images).
FORM_FILE = FORM_CONTROLNET_FILE
# A mode name longer than this is no mode, and would only be stored and echoed back.
_MODE_CHARS = 16
_MODE_HELP = (
    f"give a Union ControlNet's mode ({', '.join(UNION_MODES)}, or its number) and null (none in a form) for "
    "a ControlNet without modes"
)


def too_many(count: int, param: str) -> APIError:
    return APIError(
        400,
        f"{param}: {count} ControlNet pictures; a request carries at most {MAX_CONTROLNETS}, one per "
        "ControlNet the server loaded (GET /v1/models lists them, in order)",
        param=param,
        code="too_many_images",
    )


def scale_value(value: Any, form: bool = False) -> float:
    """A ControlNet scale as sent (a number; in a form, its text), or a ValueError that says what it takes.
    A JSON string is refused, as the schema refuses "1" for every number (strict)."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and form:
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or not 0 <= number <= MAX_SCALE:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(
            f"a ControlNet scale is a number from 0 to {MAX_SCALE:g} (1: as trained), got {shown}; give one "
            "for all ControlNets or one per ControlNet"
        )
    return number


def mode_value(value: Any) -> str | int | None:
    """A Union mode as sent: a name, a number (a form's digits too) or None for a ControlNet without modes;
    a ValueError otherwise. Whether the ControlNet at its place takes it is the pipeline's check (it needs
    the model); the words are checked here so that a typo is refused while the model loads too."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and len(value) <= _MODE_CHARS:
        word = value.strip().lower()
        if word in NO_MODE or word == "null":
            return None
        if word.isdigit():
            return int(word)
        if word in UNION_MODES:
            return word
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise ValueError(f"{shown} is not a ControlNet mode: {_MODE_HELP}")


def json_scales(value: Any, form: bool = False) -> list[float] | None:
    """controlnet_scales of a JSON body (one number, or a list; `form`: a form's items, text) as a list;
    ValueError names the problem."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_CONTROLNETS:
        raise ValueError(f"{len(values)} scales; give one, or one per ControlNet (at most {MAX_CONTROLNETS})")
    return [scale_value(v, form) for v in values]


def json_modes(value: Any) -> list[str | int | None] | None:
    """controlnet_modes of a JSON body (one mode, or a list) as a list; ValueError names the problem."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_CONTROLNETS:
        raise ValueError(f"{len(values)} modes; give one, or one per ControlNet (at most {MAX_CONTROLNETS})")
    return [mode_value(v) for v in values]


def form_list(values: list[str]) -> list[Any] | None:
    """A form's list field from its values (the field repeated, or ``name[]`` fields): each value one item,
    or a JSON list (``[0.6, 0.4]``), or comma-separated items (``0.6,0.4``); None when nothing was sent.
    ValueError for JSON that is not a list."""
    items: list[Any] = []
    for text in values:
        text = text.strip()
        if text.startswith("["):
            parsed = json.loads(text)  # a ValueError on bad JSON, which the caller words
            if not isinstance(parsed, list):
                raise ValueError("not a list")
            items.extend(parsed)
        elif text:
            items.extend(part.strip() for part in text.split(","))
    return items or None


def form_field(values: list[str] | None, param: str, sent: FormData) -> list[Any] | None:
    """controlnet_scales or controlnet_modes of a multipart form (`values`: the field's, `sent`: the whole
    form, for its ``name[]`` fields), checked; a 400 that names the field."""
    # What the openai client sends for a list in extra_body (name[]) counts as the field repeated.
    values = [*(values or []), *(str(v) for v in sent.getlist(f"{param}[]"))]
    try:
        items = form_list(values)
        if items is None:
            return None
        if param == "controlnet_scales":
            return json_scales(items, form=True)
        return json_modes(items)
    except ValueError as exc:
        example = "0.6,0.4" if param == "controlnet_scales" else "depth,none"
        raise APIError(
            400,
            f"{param}: {exc} (in a form: the field repeated, {param}[] fields, {example} or a JSON list)",
            param=param,
            code="invalid_parameters",
        ) from None


# An edit form's ControlNet fields (edits.edit_form), declared here beside the code that reads them.
FormFiles = Annotated[
    list[UploadFile] | None,
    File(
        description="FLUX.1 ControlNets: one control picture per ControlNet the server loaded (GET "
        "/v1/models), in that order, the field repeated; a server with ControlNets needs them"
    ),
]
FormScales = Annotated[
    list[str] | None,
    Form(
        description="How strongly the ControlNets speak (default 1): one for all or one per ControlNet, the "
        "field repeated (or controlnet_scales[] fields, 0.6,0.4 or [0.6, 0.4])"
    ),
]
FormModes = Annotated[
    list[str] | None,
    Form(
        description="A Union ControlNet's mode (canny, depth, ... or its number; none for a ControlNet "
        "without modes): one for all the Union ones or one per ControlNet, sent as controlnet_scales"
    ),
]
FormStart = Annotated[
    float | None,
    Form(
        ge=0, lt=1, allow_inf_nan=False, description="ControlNets: the share of the steps they start at (0)"
    ),
]
FormEnd = Annotated[
    float | None,
    Form(gt=0, le=1, allow_inf_nan=False, description="ControlNets: the share of the steps they end at (1)"),
]


def _renamed(exc: APIError, param: str, index: int) -> APIError:
    """An upload's error for picture `index` of the list `param`: the message says which, `param` names
    the request's field."""
    message = exc.message.replace(f"{param}[{index}]", f"{param}[{index}] (ControlNet {index + 1}'s picture)")
    return APIError(exc.status, message, exc.type, exc.code, param=param, headers=exc.headers)


def _rgb(picture: Image.Image) -> Image.Image:
    # 16-bit greyscale scaled by its depth first, as the CLI reads it (Pillow's conversion would clip).
    return eight_bit(picture).convert("RGB")


def decode_pictures(texts: list[str] | None, limits: Limits) -> list[Image.Image] | None:
    """A JSON body's controlnet_images (base64 or data: URLs) as 8-bit RGB pictures, or a 4xx that names
    the field and the picture; None when absent. Each is fitted to the image's size by the pipeline, so it
    is held to the fitted pictures' pixel limit."""
    if texts is None:
        return None
    if len(texts) > MAX_CONTROLNETS:
        raise too_many(len(texts), "controlnet_images")
    pictures = []
    for i, text in enumerate(texts):
        try:
            pictures.append(_rgb(decode_base64_image(text, f"controlnet_images[{i}]", limits, fitted=True)))
        except APIError as exc:
            raise _renamed(exc, "controlnet_images", i) from None
    return pictures


async def read_pictures(uploads: list[UploadFile] | None, limits: Limits) -> list[Image.Image] | None:
    """An edit's controlnet_image files, in order, as 8-bit RGB pictures (checked as every upload is); None
    when none was sent. The count is checked before any file is read."""
    if not uploads:
        return None
    if len(uploads) > MAX_CONTROLNETS:
        raise too_many(len(uploads), FORM_FILE)
    pictures = []
    for i, upload in enumerate(uploads):
        data = await upload.read(limits.max_upload_bytes + 1)  # one byte past the cap tells it is too large
        try:
            picture = await run_in_threadpool(decode_upload, data, f"{FORM_FILE}[{i}]", limits, True)
        except APIError as exc:
            raise _renamed(exc, FORM_FILE, i) from None
        pictures.append(_rgb(picture))
    return pictures


def resolved_settings(r: GenerationRequest) -> dict[str, Any]:
    """The ControlNet settings of a request the pipeline resolved (one scale and mode per ControlNet, the
    window spelled out), for the job's settings: equal requests then batch alike, and the history shows
    what ran."""
    return {name: getattr(r, name) for name in FIELDS if name != "controlnet_images"}


def cards(pipe: Any) -> list[dict[str, Any]]:
    """What the model card says of each loaded ControlNet, in order: its name, kind (instantx, union, xlabs)
    and, for a Union one, the modes it knows (names where FLUX.1's Union models name them, else numbers)."""
    names = {number: name for name, number in UNION_MODES.items()}
    out = []
    for unit in getattr(pipe, "controlnets", None) or []:
        modes = unit.model.params.num_modes
        out.append(
            {
                "name": str(unit.info["name"]),
                "kind": str(unit.info["kind"]),
                "modes": [names.get(i, str(i)) for i in range(modes)] if modes else None,
            }
        )
    return out
