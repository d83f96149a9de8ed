"""``POST /v1/images/upscale``: enlarge a picture with the server's upscale model (ESRGAN, Real-ESRGAN...,
loaded with ``pictor serve --upscaler FILE``), as A1111's Extras tab and ``pictor upscale`` do; and ``POST
/v1/jobs/upscales``: the same form queued as a job that answers at once (202), as ``POST /v1/jobs/edits``.

A multipart form: ``image`` (PNG, JPEG or WebP), ``scale`` (the factor; default the model's own), ``tile`` and
``overlap`` (input pixels per tile side and the context around each, `upscaling`'s defaults), and
``response_format``, ``user`` as elsewhere; any other field is a 400 that names it. The picture is held to
the server's upload limits and to ``max_pixels`` (it is one of the server's images, or like one), the result
(and the largest picture the model makes on the way) to ``max_picture_pixels``.

The job (kind "upscale") goes through the one queue, with the history, events (one progress step per tile
the model runs), cancel, timeout and upload retention of every job (`upload_retention`: the picture is kept
as the job's upload ``image`` while it is queued or running and, once it succeeded, as long as its history
entry). The picture is kept 8-bit, RGB or RGBA where it has transparency (the upscale keeps alpha), and with
its pictor record when it has a usable one, which the result keeps too (`upscale_runs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from pictor.provenance import RECORD_KEY
from pictor.serve.api_models import ImagesResponse, Job
from pictor.serve.edit_form_fields import ResponseFormat, User, check_fields
from pictor.serve.edits import read_image
from pictor.serve.errors import APIError
from pictor.serve.pipeline_errors import field_of
from pictor.serve.routes import (
    COMMON_ERRORS,
    OTHER_METHODS,
    SUBMIT_ERRORS,
    SYNC_ERRORS,
    V1_DEPENDENCIES,
    accepted,
    finished_images,
    post_only,
)
from pictor.serve.security import check_text
from pictor.serve.service import Service, service
from pictor.serve.store import JobRow
from pictor.serve.upscale_runs import usable_record
from pictor.upscaler_files import UpscalerFile
from pictor.upscaling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    MAX_SCALE,
    tile_count,
    upscale_input,
    upscale_problem,
    upscaled_size,
)

router = APIRouter(prefix="/v1", dependencies=V1_DEPENDENCIES, responses=COMMON_ERRORS)

# One tile is one uninterruptible net call (cancel and the job timeout act between tiles) whose activations
# grow with it: RRDBNet x4 needs ~15 KiB per input pixel, so a 1024-pixel tile peaks near 15 GiB.
MAX_SERVER_TILE = 1024

FORM_FIELDS = {"image", "scale", "tile", "overlap", "response_format", "user"}

NO_UPSCALER = (
    "this server has no upscale model: start it with pictor serve --upscaler FILE (an ESRGAN, Real-ESRGAN, "
    "4x-UltraSharp... .safetensors file) to upscale pictures"
)


@dataclass
class UpscaleForm:
    """A decoded upscale request: the picture as sent, its settings and how to answer."""

    picture: Image.Image
    scale: float | None
    tile: int
    overlap: int
    user: str | None
    response_format: str


def refused(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_parameters")


def served_upscaler(svc: Service) -> UpscalerFile:
    """The server's upscale model; a 400 without one, a 503 while the model (with which it loads) loads."""
    pipe = svc.manager.pipeline
    if pipe is None:
        if svc.settings.upscaler is None:  # the server loads its model itself, without an upscaler
            raise APIError(400, NO_UPSCALER, code="no_upscaler")
        svc.need_model("the upscale model loads with it")
    upscaler = getattr(pipe, "upscaler", None)
    if upscaler is None:
        raise APIError(400, NO_UPSCALER, code="no_upscaler")
    return upscaler


def sent_record(picture: Image.Image, max_prompt_chars: int) -> dict[str, Any] | None:
    """The pictor record an uploaded PNG carries, if pictor can use it (`upscale_runs.usable_record`) and
    its prompts are no longer than the server takes in a request (the history shows them)."""
    text = picture.info.get(RECORD_KEY)
    if not isinstance(text, str):
        return None
    try:
        record = usable_record(json.loads(text))
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth: a plain picture
        return None
    texts = (record or {}).get("prompt", ""), (record or {}).get("negative_prompt", "")
    return record if all(len(str(t)) <= max_prompt_chars for t in texts) else None


async def upscale_form(
    request: Request,
    image: Annotated[
        UploadFile, File(description="PNG, JPEG or WebP; a PNG pictor made keeps its record in the result")
    ],
    scale: Annotated[
        float | None,
        Form(
            allow_inf_nan=False,
            description=f"The factor, above 0 and at most {MAX_SCALE:g} (default: the model's own); a "
            "smaller one is reached by Lanczos after the model, a larger one by running it again",
        ),
    ] = None,
    tile: Annotated[
        int,
        Form(
            le=MAX_SERVER_TILE,
            description=(
                f"Input pixels per tile side (at least 32, at most {MAX_SERVER_TILE}; default {DEFAULT_TILE})"
            ),
        ),
    ] = DEFAULT_TILE,
    overlap: Annotated[
        int,
        Form(
            le=1 << 20,
            description=f"Context pixels around each tile, under half the tile (default {DEFAULT_OVERLAP})",
        ),
    ] = DEFAULT_OVERLAP,
    response_format: ResponseFormat = "url",
    user: User = None,
) -> UpscaleForm:
    """The one multipart grammar of both upscale endpoints (synchronous and queued). What costs nothing to
    check is checked before the picture is read."""
    svc = service(request)
    limits = svc.settings.limits
    check_fields(set((await request.form()).keys()), FORM_FIELDS, set(), "upscale")
    check_text(limits, user=user)
    problem = upscale_problem(scale, tile, overlap)
    if problem:
        raise refused(f"{field_of(problem)}: {problem}", field_of(problem))
    svc.manager.check_intake()  # shutting down, or the model failed to load: before the picture is read
    served_upscaler(svc)
    # Held to max_picture_pixels, not max_pixels: the server's own hires and upscaled images are larger than
    # max_pixels, and the result's check (`upscale_params`) bounds the work anyway.
    picture = await read_image(image, "image", limits, fitted=True)
    assert picture is not None
    return UpscaleForm(picture, scale, tile, overlap, user, response_format)


def upscale_params(svc: Service, form: UpscaleForm) -> dict[str, Any]:
    """Check the result's size, keep the picture (with its record) and give the job's settings."""
    upscaler = served_upscaler(svc)
    limits = svc.settings.limits
    picture = upscale_input(form.picture)  # as `pictor upscale` reads it: what the job keeps and upscales
    factor = float(upscaler.scale) if form.scale is None else form.scale
    width, height, largest = upscaled_size(picture.width, picture.height, factor, upscaler.scale)
    if largest > limits.max_picture_pixels:
        on_the_way = "" if largest == width * height else f" (and {largest} pixels on the way, in its runs)"
        raise refused(
            f"scale: the picture upscaled to {width}x{height} is {width * height} pixels{on_the_way}, more "
            f"than this server makes ({limits.max_picture_pixels}); ask for a smaller scale",
            "scale",
        )
    record = sent_record(form.picture, limits.max_prompt_chars)
    upload = svc.store.write_upload(picture, record)
    return {
        "kind": "upscale",
        "image": upload,
        # for the history: the picture's own prompt (so a search finds its upscales), its size
        "prompt": record["prompt"] if record else "",
        "width": width,
        "height": height,
        "n": 1,
        "scale": form.scale,
        "tile": form.tile,
        "overlap": form.overlap,
        "source_width": picture.width,
        "source_height": picture.height,
        "upscaler": upscaler.name,
        "upscaler_sha256": upscaler.sha256,
        "upscaler_scale": upscaler.scale,
        "tiles": tile_count(upscaler.net, picture.width, picture.height, factor, form.tile),
    }


async def submit_upscale(svc: Service, form: UpscaleForm) -> JobRow:
    """Keep the picture and queue the job; one not queued leaves no upload behind (`Service.submit`)."""
    params = await run_in_threadpool(upscale_params, svc, form)
    return await run_in_threadpool(svc.submit, params, form.user)


@router.post(
    "/images/upscale",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=SYNC_ERRORS,
    summary="Upscale a picture with the server's upscale model (ESRGAN, Real-ESRGAN...); waits for the job",
)
async def create_upscale(
    request: Request, form: Annotated[UpscaleForm, Depends(upscale_form)]
) -> ImagesResponse:
    svc = service(request)
    job = await submit_upscale(svc, form)
    return await finished_images(svc, request, job.id, form.response_format)


@router.post(
    "/jobs/upscales",
    response_model=Job,
    status_code=202,
    responses=SUBMIT_ERRORS,
    summary="Queue an upscale job (the same multipart form as /v1/images/upscale); returns at once",
)
async def create_upscale_job(
    request: Request, response: Response, form: Annotated[UpscaleForm, Depends(upscale_form)]
) -> Job:
    svc = service(request)
    return accepted(svc, request, response, await submit_upscale(svc, form))


# Without these, GET /v1/images/upscale would reach GET /v1/images/{image_id} (and /v1/jobs/upscales GET
# /v1/jobs/{job_id}): a 400 on the id instead of a 405. app.py includes this router before that one.
router.api_route("/images/upscale", methods=OTHER_METHODS, include_in_schema=False)(post_only)
router.api_route("/jobs/upscales", methods=OTHER_METHODS, include_in_schema=False)(post_only)
