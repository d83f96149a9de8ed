"""``POST /v1/images/variations``: OpenAI's "create image variation" (``client.images.create_variation``), and
``POST /v1/jobs/variations``: the same form queued as a job that answers at once (202), as
``POST /v1/jobs/edits``.

A variation is an img2img edit of the uploaded picture, and runs and is stored as an edit job (history,
``GET /v1/images/{id}/metadata`` and ``pictor reproduce --source`` work as for edits):

- The picture is noised to ``strength`` (default `VARIATION_STRENGTH`) and drawn back towards ``prompt``,
  which may be empty here: the picture alone then says what to draw, and each seed draws it anew.
- If the served model has a reference adapter, the picture also goes as the reference picture (an image
  prompt), so the variations keep its content even where the noise has washed its pixels out.
- No mask: transparency is not "repaint here" as on ``/v1/images/edits``. Transparent and partly
  transparent pixels are flattened onto white, as viewers show them on a page (and as a reference picture
  is flattened); the colour a file happens to store under alpha 0 is often black and was never meant to be
  seen.
- ``size``: absent, "" or "auto" keeps the picture's size; "WxH" resizes the flattened picture (Lanczos) to
  exactly WxH first, so the images are WxH. The upload is therefore held to the larger limit of a picture
  that is fitted before use (``max_picture_pixels``), and the output (WxH, or the picture's own size without
  a size) to the server's pixel limit and the model's pixel multiple; a picture over the pixel limit sent
  without a size is refused with a size to ask for.

The picture the job keeps, and whose hash the images' records hold, is the one drawn from: flattened and
resized. pictor's other fields (``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``sampler``,
``schedule``, ``cache_threshold``, ``denoise_tile``, ``denoise_tile_overlap``, ``prompt_weights``,
``prompt_editing``, ``composable``, ``guidance_method`` (its JSON text), ``loras``) mean what they mean on
``/v1/images/edits``.

With FLUX.1 Redux loaded (``pictor serve --redux-model FILE --siglip DIR``; the model card's ``redux``) a
variation is what BFL made Redux for: a generation from noise whose Redux picture is the upload, and no
img2img. The picture's SigLIP tokens then carry its content and style while composition and details come
anew from each seed, where img2img would keep its layout. So:

- The job is a generation job with ``redux_image`` (the picture flattened onto white, at its own size, as
  SigLIP resizes it anyway) and ``redux_strength`` (default 1); the prompt, empty by default, is encoded as
  BFL's ``prepare_redux`` does (T5 and CLIP of ""). Its images equal ``Pipeline.generate`` with that picture
  as ``redux_image``, and ``pictor reproduce IMAGE --redux PICTURE`` works as for any Redux generation
  (PICTURE: the upload itself for an opaque 8-bit picture, else the kept upload ``redux_image`` of the job).
- ``size`` "WxH" sets the images' size only (the picture is not resized); absent, "" or "auto" gives the
  picture's aspect ratio at the model's default number of pixels (within the server's limit), in multiples
  of the model's pixel multiple, so a camera's photo needs no size.
- ``strength`` (how far img2img noises the picture) has no meaning and is refused; ``redux_strength`` takes
  its place. Without Redux, ``redux_strength`` is refused.
- A reference adapter, if the model has one too, is not used: pictor refuses a reference picture beside a
  Redux one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError

from pictor.editing import eight_bit
from pictor.generation_settings import settings_problem
from pictor.serve.api_models import ImagesResponse, Job
from pictor.serve.edit_form_fields import (
    SIZE_PATTERN,
    Composable,
    Count,
    DenoiseTile,
    DenoiseTileOverlap,
    Fraction,
    GuidanceMethodForm,
    Loras,
    Number,
    PromptEditing,
    PromptWeights,
    ReduxStrength,
    ResponseFormat,
    Seed,
    Steps,
    Text,
    User,
    check_fields,
)
from pictor.serve.edits import VARIATION, EditForm, read_image, submit_edit
from pictor.serve.errors import APIError
from pictor.serve.generation_body import ImageGenerationRequest
from pictor.serve.guidance_fields import checked_guidance_method
from pictor.serve.request_checks import check_names
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
from pictor.serve.security import check_limits, check_text
from pictor.serve.service import Service, service
from pictor.serve.store import JobRow

router = APIRouter(prefix="/v1", dependencies=V1_DEPENDENCIES, responses=COMMON_ERRORS)

# How far the picture is noised before it is drawn back. At 1 it would be ignored (plain generation from
# the prompt), near 0 every seed would give back the picture itself. 0.7 keeps its layout and colours while
# shapes and details change from seed to seed; a little below img2img's 0.75 because a variation usually
# has an empty prompt, so nothing but the picture holds its content. (A judgement, not a measurement.)
VARIATION_STRENGTH = 0.7
WHITE = (255, 255, 255, 255)

# OpenAI's fields (image, n, size, response_format, model, user) and pictor's; there are no OpenAI fields
# to accept and ignore here, as the variation endpoint has none beyond these.
FORM_FIELDS = {
    "image",
    "prompt",
    "n",
    "size",
    "response_format",
    "model",
    "user",
    "strength",
    "seed",
    "steps",
    "guidance",
    "negative_prompt",
    "sampler",
    "schedule",
    "cache_threshold",
    "denoise_tile",
    "denoise_tile_overlap",
    "prompt_weights",
    "prompt_editing",
    "composable",
    "guidance_method",
    "loras",
    "redux_strength",
}


@dataclass
class ReduxVariation:
    """A variation on a server with FLUX.1 Redux: a generation whose Redux picture is the upload."""

    body: ImageGenerationRequest  # the generation's fields, size filled in
    picture: Image.Image  # flattened onto white, at its own size
    loras: str | None  # the form's JSON text (`LoraLibrary.choose_text`)

    @property
    def response_format(self) -> str:
        return self.body.response_format or "url"


def on_white(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (an alpha channel, a palette's or greyscale's transparent colour)
    composited onto white; opaque pixels keep their colour exactly."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return eight_bit(image).convert("RGB")  # nothing to flatten: no RGBA copies of a large photo
    rgba = eight_bit(image).convert("RGBA")  # 16-bit grey scaled by its depth first: Pillow's clips
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")


def requested_size(size: str | None) -> tuple[int, int] | None:
    """``size`` as (width, height), or None for the picture's own size (absent, "" or "auto")."""
    if size in (None, "", "auto"):
        return None
    assert size is not None  # the form's pattern: WxH
    width, height = (int(v) for v in size.split("x"))
    return width, height


def redux_size(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """A size of the picture's aspect ratio with about (at most) `area` pixels, in multiples of `multiple`
    (an extreme ratio is flattened to what fits: one multiple by the rest of the area)."""
    scale = math.sqrt(area / (width * height))
    # The epsilon: a picture of exactly the default's aspect must give the default, not one multiple less.
    w, h = (max(multiple, int(side * scale + 1e-6) // multiple * multiple) for side in (width, height))
    # A very thin picture: its short side was raised to one multiple, so the long side gives way to keep
    # the area (else a 4000x1 picture asked for 8 times the default area, past the server's pixel limit).
    if w * h > area:
        longest = max(multiple, area // min(w, h) // multiple * multiple)
        w, h = (longest, h) if w > h else (w, longest)
    return w, h


def redux_variation(
    svc: Service, picture: Image.Image, size: tuple[int, int] | None, loras: str | None, **fields: Any
) -> ReduxVariation:
    """The generation a variation is with Redux loaded (see the module's docstring): its size (given, or the
    picture's aspect at the model's default area) and the picture flattened onto white."""
    pipe = svc.manager.pipeline
    assert pipe is not None and pipe.redux is not None
    limits = svc.settings.limits
    if size is None:
        area = min(int(pipe.defaults["width"]) * int(pipe.defaults["height"]), limits.max_pixels)
        size = redux_size(picture.width, picture.height, area, pipe.patch)
    try:
        body = ImageGenerationRequest(**fields, size=f"{size[0]}x{size[1]}")
    except ValidationError as exc:  # the form's own bounds are the body's: a safety net, as a 400
        raise RequestValidationError(exc.errors()) from None
    return ReduxVariation(body, on_white(picture), loras)


def drawn_from(
    svc: Service, picture: Image.Image, size: tuple[int, int] | None
) -> tuple[Image.Image, Image.Image | None]:
    """The picture a variation starts from (flattened onto white, resized to `size`) and its reference
    picture (the same one, on a model with a reference adapter; else None)."""
    pipe = svc.manager.pipeline
    assert pipe is not None  # variation_form answers 503 while the model loads
    limits = svc.settings.limits
    if size is None:
        width, height = picture.size
        if width * height > limits.max_pixels:
            # The suggestion keeps the picture's shape: size stretches to exactly WxH.
            scale = (limits.max_pixels / (width * height)) ** 0.5
            w, h = (max(pipe.patch, int(side * scale) // pipe.patch * pipe.patch) for side in (width, height))
            raise APIError(
                400,
                f"image is {width}x{height} = {width * height} pixels, more than this server makes "
                f"({limits.max_pixels}); give a size (e.g. {w}x{h}, its shape) and the picture is resized "
                "to it",
                param="image",
                code="image_too_large",
            )
    else:
        width, height = size
        # Before the resize allocates anything: size may say 99999x99999.
        check_limits(limits, "", 1, width, height, None)
        problem = settings_problem(pipe.patch, width=width, height=height)
        if problem:
            raise APIError(400, f"size {width}x{height}: {problem}", param="size", code="invalid_parameters")
    source = on_white(picture)
    if source.size != (width, height):
        source = source.resize((width, height), Image.Resampling.LANCZOS)
    return source, source if pipe.reference_adapter is not None else None


async def variation_form(
    request: Request,
    image: Annotated[
        UploadFile,
        File(description="PNG, JPEG or WebP; transparent pixels are flattened onto white (not a mask)"),
    ],
    prompt: Annotated[
        str, Form(description="What to steer the variations towards; may be empty (the picture alone)")
    ] = "",
    n: Count = 1,
    size: Annotated[
        str | None,
        Form(
            pattern=SIZE_PATTERN,
            description="WxH resizes the picture to that size first; absent or auto keeps its size",
        ),
    ] = None,
    response_format: ResponseFormat = "url",
    model: Text = None,
    user: User = None,
    strength: Annotated[
        float | None,
        Form(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description=f"How far the picture is noised: 0 keeps it, 1 ignores it (default "
            f"{VARIATION_STRENGTH})",
        ),
    ] = None,
    seed: Seed = None,
    steps: Steps = None,
    guidance: Number = None,
    negative_prompt: Text = None,
    sampler: Text = None,
    schedule: Text = None,
    cache_threshold: Fraction = None,
    denoise_tile: DenoiseTile = None,
    denoise_tile_overlap: DenoiseTileOverlap = None,
    prompt_weights: PromptWeights = False,
    prompt_editing: PromptEditing = False,
    composable: Composable = False,
    guidance_method: GuidanceMethodForm = None,
    loras: Loras = None,
    redux_strength: ReduxStrength = None,
) -> EditForm | ReduxVariation:
    """The one multipart grammar of both variation endpoints (synchronous and queued): an edit, or with
    FLUX.1 Redux loaded a generation from the picture's Redux tokens."""
    svc = service(request)
    limits = svc.settings.limits
    check_fields(set((await request.form()).keys()), FORM_FIELDS, set(), "variation")
    check_text(limits, user=user)
    # What costs nothing to check is checked before the picture is decoded, flattened and resized (up to
    # max_picture_pixels: hundreds of MB for a small upload), so a request refused anyway costs little.
    # edit_params checks these again with the rest.
    wanted = requested_size(size)
    check_limits(limits, prompt, n, *(wanted or (None, None)), steps)
    check_text(limits, prompt=prompt, negative_prompt=negative_prompt or "")
    check_names(sampler, schedule)
    # its JSON text, checked by the dataclass (a 400 naming guidance_method.<field>), before the picture too
    method = checked_guidance_method(guidance_method)
    svc.check_model(model)
    svc.manager.check_intake()  # shutting down, or the model failed to load: before the picture is read
    if svc.manager.pipeline is None:
        # Whether the picture also goes as a reference (or as a Redux picture) depends on the model.
        svc.need_model("what a variation does depends on it")
    if svc.manager.pipeline.control:  # every image of a Canny / Depth model needs a control picture
        raise APIError(
            400,
            "image: this is a FLUX.1 Canny / Depth model: every image needs a control picture, which "
            "variations do not take; use /v1/images/generations or /v1/images/edits with control_image",
            param="image",
            code="invalid_parameters",
        )
    if getattr(svc.manager.pipeline, "controlnets", None):  # every image needs the ControlNets' pictures
        raise APIError(
            400,
            "image: this server has FLUX.1 ControlNets loaded: every image needs their pictures, which "
            "variations do not take; use /v1/images/generations (controlnet_images) or /v1/images/edits "
            "(controlnet_image files)",
            param="image",
            code="invalid_parameters",
        )
    redux = svc.manager.pipeline.redux is not None  # the pipeline is there: 503 above while it loads
    if redux and strength is not None:
        raise APIError(
            400,
            "strength: with FLUX.1 Redux loaded a variation is drawn from noise with the picture as its "
            "Redux prompt, not noised from the picture; leave strength out (redux_strength says how strongly "
            "the picture speaks)",
            param="strength",
            code="invalid_parameters",
        )
    if not redux and redux_strength is not None:
        raise APIError(
            400,
            "redux_strength: this server has no FLUX.1 Redux loaded (pictor serve --redux-model FILE "
            "--siglip DIR), so a variation is an img2img edit of the picture, whose strength says how far it "
            "is noised",
            param="redux_strength",
            code="invalid_parameters",
        )
    # The picture may be resized before use, so it is held to the larger limit of a fitted picture (a
    # camera's photo); drawn_from holds it to the output limit when no size asks for a resize.
    picture = await read_image(image, "image", limits, fitted=True)
    assert picture is not None
    if redux:
        given = {"prompt": prompt, "negative_prompt": negative_prompt, "n": n, "model": model, "user": user}
        given |= {"response_format": response_format, "steps": steps, "guidance": guidance, "seed": seed}
        given |= {"sampler": sampler, "schedule": schedule, "cache_threshold": cache_threshold}
        given |= {"denoise_tile": denoise_tile, "denoise_tile_overlap": denoise_tile_overlap}
        given |= {"redux_strength": redux_strength, "prompt_weights": prompt_weights}
        given |= {"prompt_editing": prompt_editing, "composable": composable}
        given["guidance_method"] = method  # the method's record (the body's object), or None for plain CFG
        return await run_in_threadpool(redux_variation, svc, picture, wanted, loras, **given)
    source, reference = await run_in_threadpool(drawn_from, svc, picture, wanted)
    fields = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "n": n,
        "size": None,  # applied above: the source is the output's size
        "model": model,
        "steps": steps,
        "guidance": guidance,
        "sampler": sampler,
        "schedule": schedule,
        "cache_threshold": cache_threshold,
        "denoise_tile": denoise_tile,
        "denoise_tile_overlap": denoise_tile_overlap,
        "prompt_weights": prompt_weights,
        "prompt_editing": prompt_editing,
        "composable": composable,
        "guidance_method": guidance_method,  # its JSON text, as an edit form's (edit_params reads it)
        "seed": seed,
        "strength": VARIATION_STRENGTH if strength is None else strength,
        "layout": None,
        "regions": None,  # the variation form takes neither: the picture says where things go
        "loras": loras,
    }
    return EditForm(
        source, None, reference, None, fields, user, response_format, prompt_optional=True, variation=True
    )


@router.post(
    "/images/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=SYNC_ERRORS,
    summary="Create variations of an image (OpenAI Images API): img2img of the picture; waits for the job",
)
async def create_variation(
    request: Request, form: Annotated[EditForm | ReduxVariation, Depends(variation_form)]
) -> ImagesResponse:
    svc = service(request)
    job = await submit_variation(svc, form)
    return await finished_images(svc, request, job.id, form.response_format)


@router.post(
    "/jobs/variations",
    response_model=Job,
    status_code=202,
    responses=SUBMIT_ERRORS,
    summary="Queue a variation job (the same multipart form as /v1/images/variations); returns at once",
)
async def create_variation_job(
    request: Request, response: Response, form: Annotated[EditForm | ReduxVariation, Depends(variation_form)]
) -> Job:
    svc = service(request)
    return accepted(svc, request, response, await submit_variation(svc, form))


async def submit_variation(svc: Service, form: EditForm | ReduxVariation) -> JobRow:
    """Validate and queue a variation: an edit job, or with Redux a generation job (see `ReduxVariation`)."""
    if isinstance(form, EditForm):
        return await submit_edit(svc, form)

    def params() -> dict[str, Any]:
        loras = svc.library.choose_text(form.loras)  # before svc.params keeps the picture as an upload
        return {**svc.params(form.body, redux=form.picture), "loras": loras, **VARIATION}

    return await run_in_threadpool(svc.submit, await run_in_threadpool(params), form.body.user)


# Without these, GET /v1/images/variations would reach GET /v1/images/{image_id} (and /v1/jobs/variations
# GET /v1/jobs/{job_id}): a 400 on the id instead of a 405. app.py includes this router before that one.
router.api_route("/images/variations", methods=OTHER_METHODS, include_in_schema=False)(post_only)
router.api_route("/jobs/variations", methods=OTHER_METHODS, include_in_schema=False)(post_only)
