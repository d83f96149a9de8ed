"""``POST /v1/images/settings``: the settings of an uploaded image (its pictor record, or A1111's parameters
text of A1111, Forge, ComfyUI...), as a body for ``POST /v1/images/generations``: A1111's PNG Info, and
`pictor generate --settings-from` (`pictor.settings_import`) on the server. Nothing is kept or queued."""

from __future__ import annotations

import io
import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, Field

from pictor.serve.errors import APIError
from pictor.serve.routes import COMMON_ERRORS, OTHER_METHODS, V1_DEPENDENCIES, post_only
from pictor.serve.service import service
from pictor.serve.uploads import decode_upload
from pictor.settings_import import (
    REGIONAL_OPTIONS,
    ImportedSettings,
    SettingsImportError,
    settings_from_chunks,
)

router = APIRouter(prefix="/v1", dependencies=V1_DEPENDENCIES, responses=COMMON_ERRORS)

# `pictor generate`'s option names (argparse dests) -> the generation body's fields.
BODY_FIELDS = {
    "prompt": "prompt",
    "negative": "negative_prompt",
    "steps": "steps",
    "guidance": "guidance",
    "sampler": "sampler",
    "schedule": "schedule",
    "seed": "seed",
    "prompt_weights": "prompt_weights",
    "prompt_editing": "prompt_editing",
    "composable": "composable",
    "regional_attention": "regional_attention",  # taken only with the regions it runs
    # its Regional-Prompting-FLUX controls: recorded (and so taken) only with regional attention on
    **{name: name for name in REGIONAL_OPTIONS},
    "hires": "hires_scale",
    "hires_strength": "hires_strength",
    "hires_steps": "hires_steps",
    "denoise_tile": "denoise_tile",
    "denoise_tile_overlap": "denoise_tile_overlap",
    "cache_threshold": "cache_threshold",
    "variation_seed": "variation_seed",
    "variation_strength": "variation_strength",
}
SERVER_SETTINGS = ("vae_tile", "vae_tile_overlap")  # the server's own (pictor serve --vae-tile)


class ImageSettings(BaseModel):
    """What an image's metadata says to draw, in the generation body's terms."""

    settings: dict[str, Any] = Field(
        description="A body for POST /v1/images/generations: prompt, negative_prompt, size, steps, guidance, "
        "sampler, schedule, seed, variation_seed, variation_strength, seed_resize_from, prompt_weights, "
        "prompt_editing, composable (A1111 always reads AND: true for its text whose prompt has it), the "
        "hires fix, denoise tiles, cache_threshold, regions (those the image names), regional_attention "
        "(with them, when the image ran them as one pass) with its regional_steps, regional_double_interval, "
        "regional_single_interval and regional_base_ratio (those the image's record names), and "
        "guidance_method (the method and the parameters it reads, when the image's was not plain CFG)"
    )
    notices: list[str] = Field(description="What the image holds that is not taken, in words.")
    source: str = Field(
        description="pictor (its record), a1111 (A1111's parameters text) or comfyui (ComfyUI's prompt graph)"
    )


def _text_chunks(data: bytes) -> dict[str, str]:
    """A PNG's (or WebP's, JPEG's) text chunks; the picture was checked by `read_image` first."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # chunks after the image data are read with the pixels
        return {k: v for k, v in (getattr(im, "text", None) or im.info).items() if isinstance(v, str)}


def body_settings(imported: ImportedSettings) -> tuple[dict[str, Any], list[str]]:
    """The imported settings as generation body fields, and the notices (with what the API cannot take)."""
    values, notices = imported.values, list(imported.notices)
    body = {BODY_FIELDS[k]: v for k, v in values.items() if k in BODY_FIELDS and v not in (None, "")}
    # off is the default: said only when on
    for key in ("prompt_editing", "composable", "regional_attention"):
        if not body.get(key):
            body.pop(key, None)
    if values.get("regions"):  # JSON text, as --regions takes it; the body takes the list
        body["regions"] = json.loads(values["regions"])
    for key in ("size", "seed_resize_from"):  # WxH text, as the body takes them
        if values.get(key):
            body[key] = f"{values[key][0]}x{values[key][1]}"
    if imported.guidance_method is not None:  # the method's record: the body's guidance_method object
        body["guidance_method"] = imported.guidance_method.record()
    if imported.hires_upscaler_name:
        body["hires_upscaler"] = imported.hires_upscaler_name  # checked against the server's when sent
    if imported.sampler_name:
        notices.append(f"the image's sampler '{imported.sampler_name}' has no pictor equivalent: choose one")
    kept = [k for k in SERVER_SETTINGS if values.get(k)]
    if kept:
        notices.append(f"{', '.join(kept)}: the server's own settings (pictor serve --vae-tile), not taken")
    return body, notices


@router.post(
    "/images/settings",
    response_model=ImageSettings,
    summary="The prompt and settings an image's metadata names (A1111's PNG Info), as a generation body",
)
async def image_settings(
    request: Request,
    image: Annotated[
        UploadFile, File(description="a PNG with a pictor record, A1111 parameters text or a ComfyUI graph")
    ],
) -> ImageSettings:
    limits = service(request).settings.limits
    data = await image.read(limits.max_upload_bytes + 1)  # one byte more: too large is then seen
    await run_in_threadpool(decode_upload, data, "image", limits, True)  # size, format and bomb checks
    chunks = await run_in_threadpool(_text_chunks, data)
    try:
        # off the event loop, as the decode: a large graph or prompt takes a while to read
        imported = await run_in_threadpool(settings_from_chunks, chunks, "image")
    except (SettingsImportError, ValueError) as exc:
        raise APIError(400, str(exc), param="image", code="invalid_parameters") from None
    body, notices = body_settings(imported)
    return ImageSettings(settings=body, notices=notices, source=imported.source)


# Without this, GET /v1/images/settings would reach GET /v1/images/{image_id}: a 400 on the id, not a 405.
# app.py includes this router before that one.
router.api_route("/images/settings", methods=OTHER_METHODS, include_in_schema=False)(post_only)
