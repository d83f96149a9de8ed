"""``POST /v1/images/edits``: OpenAI's image edit endpoint (multipart upload) on ``Pipeline.edit``, and
``POST /v1/jobs/edits``: the same form queued as a job that answers at once (202), as ``POST /v1/jobs``.

Uploads are untrusted bytes: size-capped (413), opened only as PNG, JPEG or WebP, with Pillow's
decompression-bomb guard on (its warning is an error here too), and checked against the pixel limit
before any pixel is decoded. Accepted images are kept under the data dir so the job can run again after
a restart.

Masks follow OpenAI: where the mask is fully transparent (alpha 0) the image is repainted. A mask without
an alpha channel follows pictor's convention instead: white repaints, black keeps. Without a mask, an
image with transparent pixels is repainted there (OpenAI's dall-e-2 rule); otherwise the edit is img2img.

pictor's own fields go as in ``/v1/images/generations``: ``layout``, ``regions`` (regional prompts) and
``guidance_method`` (`guidance_fields`) as their JSON text in form fields, ``reference_image``,
``context_image`` (FLUX.1 Kontext's picture to edit by instruction; a Kontext model only) and
``control_image`` (FLUX.1 Canny / Depth's control picture; a control model needs one), each a further file
checked like the others, and ``control_canny`` (``true``, ``LOW,HIGH`` or ``[LOW, HIGH]``: draw the control
picture's Canny edges first); ``redux_image`` (FLUX.1 Redux's picture, on a server with Redux loaded) as a
file too, with ``redux_strength``; ``ip_adapter_image`` (XLabs' FLUX.1 IP-Adapter's picture, on a server with
the IP-Adapter loaded) as a file too, with ``ip_adapter_scale``; the prompt may be empty only with a
reference, Redux or IP-Adapter picture. On a server with FLUX.1 ControlNets, ``controlnet_image`` files (the
field repeated, one per ControlNet, in order) with ``controlnet_scales``, ``controlnet_modes``,
``controlnet_start`` and ``controlnet_end`` (see `controlnets` for how a form sends a list). Variation seeds
(``variation_seed``, ``variation_strength``) go as on a generation; ``seed_resize_from`` is refused (an edit's
composition is its picture's).

An edit's own settings go as `pictor.editing.EditRequest` names them: ``upscale`` and ``upscaler`` (enlarge
the source first), ``inpaint_area``, ``mask_padding`` and ``inpaint_size`` (inpaint only the masked area),
and ``expand`` (outpainting: ``L,T,R,B`` pixels added around the image, its new area repainted with the
mask's, if any), ``fill`` (how that area starts: ``edge`` or ``noise``) and ``feather`` (pixels of blending
inside a mask's edge; see `edit_outpaint`). An upscaling or outpainting edit's output is the larger size,
which the server's pixel limit applies to.

This module holds the form's grammar and the endpoints; the fields' types are in `edit_form_fields`, the
checks of an edit and its job's settings in `edit_validation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from pictor.serve.api_models import ImagesResponse, Job
from pictor.serve.controlnets import (
    FormEnd,
    FormFiles,
    FormModes,
    FormScales,
    FormStart,
    form_field,
    read_pictures,
)
from pictor.serve.edit_form_fields import (
    Composable,
    Count,
    DenoiseTile,
    DenoiseTileOverlap,
    Fraction,
    GuidanceMethodForm,
    InpaintArea,
    InpaintSize,
    IPAdapterScale,
    Loras,
    MaskPadding,
    Number,
    PromptEditing,
    PromptWeights,
    ReduxStrength,
    RegionalAttention,
    ResponseFormat,
    Seed,
    Size,
    Steps,
    Text,
    Upscale,
    Upscaler,
    User,
    VariationSeed,
    VariationStrength,
    canny_form,
    check_fields,
    inpaint_size_of,
)
from pictor.serve.edit_outpaint import Expand, Feather, Fill, expand_form
from pictor.serve.edit_validation import edit_params
from pictor.serve.errors import APIError
from pictor.serve.regional_fields import (
    RegionalBaseRatio,
    RegionalDoubleInterval,
    RegionalSingleInterval,
    RegionalSteps,
)
from pictor.serve.routes import (
    COMMON_ERRORS,
    SUBMIT_ERRORS,
    SYNC_ERRORS,
    V1_DEPENDENCIES,
    accepted,
    finished_images,
)
from pictor.serve.security import check_text
from pictor.serve.service import Service, service
from pictor.serve.settings import Limits
from pictor.serve.store import JobRow
from pictor.serve.uploads import decode_upload

router = APIRouter(prefix="/v1", dependencies=V1_DEPENDENCIES, responses=COMMON_ERRORS)

# The setting that marks a job sent as a variation (an edit or, with FLUX.1 Redux, a generation): its pictures
# all came from the form's one field `image`, which errors about them name (upload_retention.upload_field).
VARIATION = {"variation": True}


@dataclass
class EditForm:
    """A decoded multipart edit request: the images, the job's form fields and how to answer."""

    source: Image.Image
    mask: Image.Image | None
    reference: Image.Image | None
    context: Image.Image | None
    fields: dict[str, Any]
    user: str | None
    response_format: str
    prompt_optional: bool = False  # see edit_params
    control: Image.Image | None = None  # FLUX.1 Canny / Depth's control picture
    redux: Image.Image | None = None  # FLUX.1 Redux's picture
    ip_adapter: Image.Image | None = None  # XLabs' FLUX.1 IP-Adapter's picture
    controlnets: list[Image.Image] | None = None  # FLUX.1 ControlNets' pictures, in order
    variation: bool = False  # sent to a variation endpoint, whose one picture is `image`


async def read_image(
    upload: UploadFile | None, what: str, limits: Limits, fitted: bool = False
) -> Image.Image | None:
    """An uploaded file as a loaded image (see `decode_upload`, and its `fitted`); None when absent."""
    if upload is None:
        return None
    # One byte past the cap tells decode_upload that an upload is too large, without reading all of it.
    data = await upload.read(limits.max_upload_bytes + 1)
    return await run_in_threadpool(decode_upload, data, what, limits, fitted)


async def edit_form(
    request: Request,
    image: Annotated[UploadFile, File(description="PNG, JPEG or WebP; transparent pixels are repainted")],
    # Optional to FastAPI, which reads an empty form field as a missing one; require_prompt refuses an
    # empty prompt unless a reference picture says what to draw.
    prompt: Annotated[
        str, Form(description="What to draw; may be empty only with a reference, Redux or IP-Adapter picture")
    ] = "",
    mask: Annotated[
        UploadFile | None, File(description="alpha 0 (or white, without alpha) = repaint")
    ] = None,
    reference_image: Annotated[
        UploadFile | None,
        File(description="a picture whose content the images take; needs a model with a reference adapter"),
    ] = None,
    context_image: Annotated[
        UploadFile | None,
        File(
            description="an image that a FLUX.1 Kontext model edits by the prompt's instruction; needs a "
            "Kontext model"
        ),
    ] = None,
    control_image: Annotated[
        UploadFile | None,
        File(
            description="FLUX.1 Canny / Depth: the control picture whose structure the images follow (an "
            "edge map, or a photo with control_canny; a depth map); a control model needs one"
        ),
    ] = None,
    control_canny: Annotated[
        str | None,
        Form(
            description="FLUX.1 Canny: draw control_image's Canny edges first: true (thresholds 50 and 200) "
            "or LOW,HIGH"
        ),
    ] = None,
    redux_image: Annotated[
        UploadFile | None,
        File(
            description="FLUX.1 Redux: a picture whose content and style the images take; needs a server "
            "with Redux loaded"
        ),
    ] = None,
    redux_strength: ReduxStrength = None,
    ip_adapter_image: Annotated[
        UploadFile | None,
        File(
            description="XLabs' FLUX.1 IP-Adapter: a picture whose look the images take; needs a server "
            "with the IP-Adapter loaded"
        ),
    ] = None,
    ip_adapter_scale: IPAdapterScale = None,
    controlnet_image: FormFiles = None,
    controlnet_scales: FormScales = None,
    controlnet_modes: FormModes = None,
    controlnet_start: FormStart = None,
    controlnet_end: FormEnd = None,
    layout: Annotated[
        str | None,
        Form(
            description='boxes with phrases as JSON, e.g. [{"box": [0, 0, 0.5, 1], "phrase": "a red circle"}]'
        ),
    ] = None,
    regions: Annotated[
        str | None,
        Form(
            description="regional prompts as JSON, a prompt of its own for each box (any model), e.g. "
            '[{"box": [0, 0, 0.5, 1], "prompt": "a red circle", "strength": 1}]; strength optional (1)'
        ),
    ] = None,
    loras: Loras = None,
    n: Count = 1,
    size: Size = None,
    response_format: ResponseFormat = "url",
    model: Text = None,
    user: User = None,
    strength: Fraction = None,
    seed: Seed = None,
    variation_seed: VariationSeed = None,
    variation_strength: VariationStrength = None,
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
    regional_attention: RegionalAttention = False,
    regional_steps: RegionalSteps = None,
    regional_double_interval: RegionalDoubleInterval = None,
    regional_single_interval: RegionalSingleInterval = None,
    regional_base_ratio: RegionalBaseRatio = None,
    guidance_method: GuidanceMethodForm = None,
    upscale: Upscale = None,
    upscaler: Upscaler = None,
    inpaint_area: InpaintArea = None,
    mask_padding: MaskPadding = None,
    inpaint_size: InpaintSize = None,
    expand: Expand = None,
    fill: Fill = None,
    feather: Feather = None,
    # OpenAI's fields with no meaning here: accepted so OpenAI clients work unchanged.
    output_format: Annotated[str | None, Form(description="Only png.")] = None,
    stream: Annotated[str | None, Form(description="Only false.")] = None,
) -> EditForm:
    """The one multipart grammar of both edit endpoints (synchronous and queued)."""
    svc = service(request)
    limits = svc.settings.limits
    sent = await request.form()
    if "seed_resize_from" in sent:  # a generation's field: said so, rather than "unknown field"
        raise APIError(
            400,
            "seed_resize_from keeps a composition drawn from noise at another size; an edit's composition is "
            "its picture's, so drop it (variation_seed and variation_strength do work on edits)",
            param="seed_resize_from",
            code="invalid_parameters",
        )
    check_fields(set(sent.keys()))
    check_text(limits, user=user)
    if output_format not in (None, "", "png"):
        raise APIError(400, "output_format: only png", param="output_format", code="invalid_parameters")
    if stream not in (None, "", "false"):
        raise APIError(
            400,
            "streaming is not offered; use POST /v1/jobs/edits and GET /v1/jobs/{id}/events",
            param="stream",
            code="invalid_parameters",
        )

    # A request refused anyway (shutting down, the model failed to load) is refused before any picture is
    # decoded; submit checks again.
    svc.manager.check_intake()
    # Reference and context pictures are fitted before use: held to max_picture_pixels, not to the output
    # limit.
    source = await read_image(image, "image", limits)
    assert source is not None
    mask_image = await read_image(mask, "mask", limits)
    reference = await read_image(reference_image, "reference_image", limits, fitted=True)
    context = await read_image(context_image, "context_image", limits, fitted=True)
    control = await read_image(control_image, "control_image", limits, fitted=True)
    redux = await read_image(redux_image, "redux_image", limits, fitted=True)
    ip_adapter = await read_image(ip_adapter_image, "ip_adapter_image", limits, fitted=True)
    nets = await read_pictures(controlnet_image, limits)
    lists = {"controlnet_scales": controlnet_scales, "controlnet_modes": controlnet_modes}
    fields = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "n": n,
        "size": size,
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
        "upscale": upscale,
        "upscaler": upscaler or None,
        "inpaint_area": inpaint_area or None,
        "mask_padding": mask_padding,
        "inpaint_size": inpaint_size_of(inpaint_size),
        "expand": expand_form(expand),
        "fill": fill or None,
        "feather": feather,
        "seed": seed,
        "variation_seed": variation_seed,
        "variation_strength": variation_strength,
        "strength": strength,
        "layout": layout,
        "regions": regions,
        "regional_attention": regional_attention,
        "regional_steps": regional_steps,
        "regional_double_interval": regional_double_interval,
        "regional_single_interval": regional_single_interval,
        "regional_base_ratio": regional_base_ratio,
        "guidance_method": guidance_method,
        "loras": loras,
        "control_canny": canny_form(control_canny),
        "redux_strength": redux_strength,
        "ip_adapter_scale": ip_adapter_scale,
        **{name: form_field(values, name, sent) for name, values in lists.items()},
        "controlnet_start": controlnet_start,
        "controlnet_end": controlnet_end,
    }
    return EditForm(
        source,
        mask_image,
        reference,
        context,
        fields,
        user,
        response_format,
        control=control,
        redux=redux,
        ip_adapter=ip_adapter,
        controlnets=nets,
    )


async def submit_edit(svc: Service, form: EditForm) -> JobRow:
    """Validate, keep the uploads and queue the job; a refused job leaves no upload behind."""
    # edit_params writes the uploads only once everything is valid; svc.submit deletes them (every key of
    # upload_retention.UPLOAD_KEYS, context_image included) when the job is not queued.
    kept = await run_in_threadpool(
        edit_params,
        svc,
        form.source,
        form.mask,
        form.fields,
        form.reference,
        form.context,
        form.prompt_optional,
        form.control,
        form.redux,
        form.controlnets,
        form.ip_adapter,
    )
    params = {**kept, **VARIATION} if form.variation else kept
    return await run_in_threadpool(svc.submit, params, form.user)


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=SYNC_ERRORS,
    summary="Edit an image (OpenAI Images API): img2img, or inpainting with a mask; waits for the job",
)
async def create_edit(request: Request, form: Annotated[EditForm, Depends(edit_form)]) -> ImagesResponse:
    svc = service(request)
    job = await submit_edit(svc, form)
    return await finished_images(svc, request, job.id, form.response_format)


@router.post(
    "/jobs/edits",
    response_model=Job,
    status_code=202,
    responses=SUBMIT_ERRORS,
    summary="Queue an edit job (the same multipart form as /v1/images/edits); returns at once",
)
async def create_edit_job(
    request: Request, response: Response, form: Annotated[EditForm, Depends(edit_form)]
) -> Job:
    svc = service(request)
    return accepted(svc, request, response, await submit_edit(svc, form))
