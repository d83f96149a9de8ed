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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from pictor.composable_prompts import MAX_PARTS
from pictor.edit_upscale import MAX_UPSCALE
from pictor.editing import EditRequest, eight_bit
from pictor.generation_request import DENOISE_TILING_FIELDS
from pictor.ip_adapter_files import MAX_SCALE as MAX_IP_ADAPTER_SCALE
from pictor.ip_adapter_files import ip_adapter_pixels
from pictor.redux_images import MAX_STRENGTH
from pictor.serve.api_models import ImagesResponse, Job, canny_setting
from pictor.serve.controlnets import (
    FORM_FILE,
    FormEnd,
    FormFiles,
    FormModes,
    FormScales,
    FormStart,
    form_field,
    read_pictures,
    resolved_settings,
)
from pictor.serve.edit_outpaint import (
    Expand,
    Feather,
    Fill,
    check_outpaint_fields,
    expand_form,
    expanded_size,
)
from pictor.serve.errors import APIError
from pictor.serve.guidance_fields import checked_guidance_method, guidance_method_of
from pictor.serve.job_requests import EDIT_KEYS, TUPLE_KEYS
from pictor.serve.pipeline_errors import HIRES_UPSCALER_HELP, REQUEST_ERRORS, request_error
from pictor.serve.regional_fields import FIELDS as REGIONAL_FIELDS
from pictor.serve.regional_fields import (
    RegionalBaseRatio,
    RegionalDoubleInterval,
    RegionalSingleInterval,
    RegionalSteps,
    checked_regional_options,
)
from pictor.serve.routes import (
    COMMON_ERRORS,
    SUBMIT_ERRORS,
    SYNC_ERRORS,
    V1_DEPENDENCIES,
    accepted,
    finished_images,
)
from pictor.serve.security import check_limits, check_policy, check_text
from pictor.serve.service import (
    Service,
    check_names,
    check_regional_attention,
    checked_layout,
    checked_regions,
    require_prompt,
    service,
)
from pictor.serve.settings import Limits
from pictor.serve.store import JobRow
from pictor.serve.uploads import decode_upload

router = APIRouter(prefix="/v1", dependencies=V1_DEPENDENCIES, responses=COMMON_ERRORS)

# The setting that marks a job sent as a variation (an edit or, with FLUX.1 Redux, a generation): its pictures
# all came from the form's one field `image`, which errors about them name (upload_retention.upload_field).
VARIATION = {"variation": True}

# Variation seeds (`pictor.noise_variation`): an edit takes them as a generation does, but not
# seed_resize_from (an edit's composition is its picture's), and a variation takes none.
VARIATION_SEED_FIELDS = ("variation_seed", "variation_strength")


def _transparent(image: Image.Image) -> Image.Image | None:
    """White where the image is fully transparent (OpenAI's "edit here"), or None without alpha."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def edit_params(
    svc: Service,
    source: Image.Image,
    mask: Image.Image | None,
    form: dict[str, Any],
    reference: Image.Image | None = None,
    context: Image.Image | None = None,
    prompt_optional: bool = False,
    control: Image.Image | None = None,
    redux: Image.Image | None = None,
    controlnets: list[Image.Image] | None = None,
    ip_adapter: Image.Image | None = None,
) -> dict[str, Any]:
    """Validate an edit (limits, policy, model, the pipeline's own checks); keep its images; job settings.
    `prompt_optional`: an empty prompt is fine without a reference too (a variation draws from the image).
    `controlnets`: the ControlNets' pictures, in order, already 8-bit RGB (`controlnets.read_pictures`).
    `ip_adapter`: the IP-Adapter's picture."""
    limits = svc.settings.limits
    prompt, negative, n = form["prompt"], form["negative_prompt"] or "", form["n"]
    svc.check_model(form["model"])
    check_limits(limits, prompt, n, source.width, source.height, form["steps"])
    check_text(limits, prompt=prompt, negative_prompt=negative)
    check_names(form["sampler"], form["schedule"])
    pictured = any(picture is not None for picture in (reference, redux, ip_adapter))
    require_prompt(prompt, pictured or prompt_optional)
    layout = checked_layout(form.get("layout"))
    regions = checked_regions(form.get("regions"), limits)
    check_regional_attention(bool(form.get("regional_attention")), regions)
    rpf = checked_regional_options(form, bool(form.get("regional_attention")), regions)  # None where absent
    method = checked_guidance_method(form.get("guidance_method"))  # JSON text, checked by the dataclass
    check_policy(svc.policy, prompt, negative, [box["phrase"] for box in layout or []], regions)
    upscale = form.get("upscale")
    # An outpainting edit's output is the grown canvas, known without the model: the limits apply to it
    # before anything is allocated or queued.
    expanded = expanded_size(form.get("expand"), source.size)
    if expanded is not None:
        _check_larger(limits, prompt, n, list(expanded), form["steps"], "expand")
    out_w, out_h = expanded or source.size
    if form["size"] not in (None, "", "auto") and (upscale is not None or form["size"] != f"{out_w}x{out_h}"):
        if upscale is not None:
            keeps = "an upscaling edit's size follows from upscale"
        elif expanded is not None:
            keeps = f"an outpainting edit's size is the image's plus expand ({out_w}x{out_h})"
        else:
            keeps = f"an edit keeps the image's size ({source.width}x{source.height})"
        raise APIError(400, f"{keeps}; omit size", param="size", code="invalid_parameters")
    if upscale is not None and svc.manager.pipeline is None:  # the loaded model's own size is checked below
        _check_upscale_while_loading(limits, prompt, n, upscale, source.size, form.get("steps"))
    if form.get("inpaint_size") is not None:
        _check_larger(limits, prompt, n, form["inpaint_size"], form.get("steps"), "inpaint_size")
    # 16-bit greyscale scaled by its depth first, as the CLI and library do (Pillow's conversions clip).
    source, mask = eight_bit(source), eight_bit(mask) if mask is not None else None
    reference = eight_bit(reference) if reference is not None else None
    context = eight_bit(context) if context is not None else None
    control = eight_bit(control) if control is not None else None
    redux = eight_bit(redux).convert("RGB") if redux is not None else None
    # transparency on white, as CLIP's processor and the CLI take it (not dropped): the record's hash is then
    # the original file's too
    ip_adapter = Image.fromarray(ip_adapter_pixels(ip_adapter)) if ip_adapter is not None else None
    if mask is not None:
        mask = _transparent(mask) or mask.convert("L")
    else:
        mask = _transparent(source)
        if mask is not None and not mask.getbbox():
            mask = None  # alpha channel, but nothing transparent: plain img2img
    check_outpaint_fields(form, masked=mask is not None)
    source = source.convert("RGB")
    reference = reference.convert("RGB") if reference is not None else None
    context = context.convert("RGB") if context is not None else None
    control = control.convert("RGB") if control is not None else None
    keys = ("steps", "guidance", "sampler", "schedule", "seed", "strength", "cache_threshold")
    settings = {k: form[k] for k in keys}
    # variation seeds (the pipeline checks them: a variation seed needs a strength); absent from a variation
    settings |= {k: form.get(k) for k in VARIATION_SEED_FIELDS}
    settings |= {k: form.get(k) for k in DENOISE_TILING_FIELDS}  # pixels, or None
    settings["cache_threshold"] = settings["cache_threshold"] or None  # 0 is off: batches with absent
    settings["prompt_weights"] = bool(form.get("prompt_weights"))
    settings["prompt_editing"] = bool(form.get("prompt_editing"))
    settings["composable"] = bool(form.get("composable"))
    settings["regional_attention"] = bool(form.get("regional_attention"))  # absent from a variation's form
    settings |= rpf  # its RPF controls (regional_fields), absent from a variation's form too
    settings["guidance_method"] = method  # its record, or None for plain CFG (guidance_fields)
    # an edit's own settings, as EditRequest names them; absent ones take its defaults
    edit_settings = {k: form[k] for k in EDIT_KEYS if form.get(k) is not None}
    if str(edit_settings.get("upscaler", "")).lower() == "lanczos":
        del edit_settings["upscaler"]  # None means Lanczos, so equal edits read alike
    if svc.manager.pipeline is None:  # read again below: it never goes away once loaded
        _check_upscaler_while_loading(svc, edit_settings.get("upscaler"))
    settings["layout"] = layout
    settings["regions"] = regions
    settings["control_canny"] = form.get("control_canny")  # [low, high] or None (canny_form)
    settings["redux_strength"] = form.get("redux_strength")
    settings["ip_adapter_scale"] = form.get("ip_adapter_scale")
    # ControlNets' settings as sent (lists, words checked), spelled out below once the model resolved them.
    for key in ("controlnet_scales", "controlnet_modes", "controlnet_start", "controlnet_end"):
        settings[key] = form.get(key)
    loras = svc.library.choose_text(form.get("loras"))
    pipe = svc.manager.pipeline
    # The output's size: an outpainting's is the grown canvas; an upscaling edit's is larger, and known once
    # the model is (its pixel multiple).
    width, height = (None, None) if "upscale" in edit_settings else (out_w, out_h)
    if pipe is not None:
        request = EditRequest(
            image=source,
            prompt=prompt,
            mask=mask,
            negative_prompt=negative,
            num_images=n,
            reference=reference,
            context_image=context,  # resolve_edit refuses it on a model that is not Kontext
            control_image=control,  # and this one on a model that is not FLUX.1 Canny / Depth
            redux_image=redux,  # and this one without Redux loaded
            ip_adapter_image=ip_adapter,  # and this one without the IP-Adapter loaded
            controlnet_images=controlnets,  # and these without ControlNets loaded
            **{**settings, "guidance_method": guidance_method_of(settings)},
            **{k: tuple(v) if k in TUPLE_KEYS else v for k, v in edit_settings.items()},
        )
        try:
            r, inputs = pipe.resolve_edit(request)
        except REQUEST_ERRORS as exc:
            message, param = request_error(exc, form=True)
            raise APIError(400, message, param=param, code="invalid_parameters") from None
        settings.update(**resolved_settings(r))
        settings.update(
            steps=r.steps,
            guidance=r.guidance,
            sampler=r.sampler,
            schedule=r.schedule,
            strength=inputs.strength,
            layout=r.layout,
            regions=r.regions,
            redux_strength=r.redux_strength,
            ip_adapter_scale=r.ip_adapter_scale,
            denoise_tile=r.denoise_tile,  # the overlap's default filled in: equal edits read alike
            denoise_tile_overlap=r.denoise_tile_overlap,
        )
        if "upscale" in edit_settings:  # the output is the enlarged picture: the server's limits apply to it
            _check_larger(limits, prompt, n, list(inputs.size), r.steps, "upscale")
            width, height = inputs.size
        if inputs.area is not None:  # a masked area is drawn at its own size: the limits apply to that
            field = "inpaint_size" if "inpaint_size" in edit_settings else "inpaint_area"
            _check_larger(limits, prompt, n, list(inputs.size), r.steps, field)
    # context_image: the key job_requests.edit_request reads back, as for a JSON generation's context_image.
    pictures = {"image": source, "mask": mask, "reference": reference, "context_image": context}
    pictures |= {"control_image": control, "redux_image": redux, "ip_adapter_image": ip_adapter}
    return {
        "kind": "edit",
        **svc.keep_uploads({**pictures, "controlnet_images": controlnets}),
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "n": n,
        "loras": loras,
        **settings,
        **edit_settings,
    }


def _check_larger(
    limits: Limits, prompt: str, n: int, size: list[int], steps: int | None, field: str
) -> None:
    """The server's limits on the size an upscaling edit makes (or a masked area is drawn at), named by the
    field that sets it."""
    try:
        check_limits(limits, prompt, n, size[0], size[1], steps)
    except APIError as exc:
        message = f"{field} makes {size[0]}x{size[1]}: {exc.message}"
        raise APIError(400, message, code=exc.code, param=field) from None


def _check_upscale_while_loading(
    limits: Limits, prompt: str, n: int, scale: float, size: tuple[int, int], steps: int | None
) -> None:
    """Before the model is there, its pixel multiple is not known: the factor is checked as the pipeline
    checks it, and the enlarged size bounded from above (every model rounds to a multiple of 16 or a divisor
    of it), so that no job the limits refuse is queued."""
    if not 1 < scale <= MAX_UPSCALE:
        raise APIError(
            400,
            f"upscale must be a number above 1 and at most {MAX_UPSCALE:g} (e.g. 2), got {scale:g}",
            param="upscale",
            code="invalid_parameters",
        )
    bound = [math.ceil(side * scale / 16) * 16 for side in size]
    _check_larger(limits, prompt, n, bound, steps, "upscale")


def _check_upscaler_while_loading(svc: Service, name: str | None) -> None:
    """Before the model is there, the upscale model it loads with is known by its file (--upscaler): an
    upscaler that names another is refused now, as the loaded model would refuse it."""
    path = svc.settings.upscaler
    if name is not None and (path is None or name != path.stem):
        loaded = f"'{path.stem}' is" if path is not None else "none is"
        raise APIError(
            400,
            f"upscaler '{name}' is not loaded ({loaded}); {HIRES_UPSCALER_HELP}",
            param="upscaler",
            code="invalid_parameters",
        )


# The form fields the edit and variation forms share, declared once so both validate them alike.
Number = Annotated[float | None, Form(ge=0, le=100, allow_inf_nan=False)]
Count = Annotated[int, Form(ge=1)]
SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
Size = Annotated[str | None, Form(pattern=SIZE_PATTERN)]
ResponseFormat = Annotated[Literal["url", "b64_json"], Form()]
Text = Annotated[str | None, Form()]
User = Annotated[str | None, Form(max_length=256)]
Fraction = Annotated[float | None, Form(ge=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int | None, Form(ge=0, le=2**63 - 1)]
VariationSeed = Annotated[
    int | None,
    Form(
        ge=0,
        le=2**63 - 1,
        description="The first image's variation seed (image i takes variation_seed+i); needs "
        "variation_strength; absent: random",
    ),
]
VariationStrength = Annotated[
    float | None,
    Form(
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Variation seeds (A1111's): above 0, every image keeps seed and blends its noise with "
        "that of variation seed variation_seed+i by this much; 0 or absent: off",
    ),
]
ReduxStrength = Annotated[
    float | None,
    Form(
        ge=0,
        le=MAX_STRENGTH,
        allow_inf_nan=False,
        description="FLUX.1 Redux: how strongly its picture speaks (its tokens times this; default 1)",
    ),
]
IPAdapterScale = Annotated[
    float | None,
    Form(
        ge=0,
        le=MAX_IP_ADAPTER_SCALE,
        allow_inf_nan=False,
        description="XLabs' FLUX.1 IP-Adapter: how strongly its picture speaks (its attention times this; "
        "default 1)",
    ),
]
Steps = Annotated[int | None, Form(ge=1)]
# Denoise tiles, in pixels: checked by the pipeline (multiples of the model's token size), which names them.
DenoiseTile = Annotated[
    int | None,
    Form(
        description="Denoise tiles (MultiDiffusion): run the model at each step over windows of this many "
        "pixels a side and blend them, for refining large images; a multiple of the model's token size; "
        "not with cache_threshold. Absent: whole"
    ),
]
DenoiseTileOverlap = Annotated[
    int | None,
    Form(description="Pixels neighbouring denoise tiles blend over, up to half the tile (default a quarter)"),
]
Loras = Annotated[
    str | None,
    Form(description='LoRAs of GET /v1/loras as JSON, e.g. [{"name": "style", "scale": 0.8}]'),
]
PromptWeights = Annotated[
    bool,
    Form(
        description="Read A1111's weights in the prompt and negative prompt: (words:1.5), "
        "(words) = 1.1, [words] = 1/1.1; false: brackets are text"
    ),
]
PromptEditing = Annotated[
    bool,
    Form(
        description="A1111's prompt editing: [from:to:when] reads from until step when and to after it, "
        "[to:when] adds to after it, [from::when] drops from after it (when below 1: a share of the steps); "
        "[a|b] alternates every step. Needs prompt_weights"
    ),
]
Composable = Annotated[
    bool,
    Form(
        description="A1111's composable diffusion: the prompt's parts joined by AND (upper case), each "
        "with an optional trailing :weight (a red circle AND a blue square:0.8), each one more transformer "
        f"pass per step; at most {MAX_PARTS} parts. Not with regions; false: AND is "
        "a word"
    ),
]
GuidanceMethodForm = Annotated[
    str | None,
    Form(
        description="how guidance combines the prompt's and the negative prompt's predictions, as JSON: "
        '{"method": "apg", "eta": 0, "rescale": 0.7, "start": 0, "stop": 0.7} (the fields of the JSON '
        "body's guidance_method; absent: plain CFG)"
    ),
]
RegionalAttention = Annotated[
    bool,
    Form(
        description="run the regions as one transformer pass with a masked joint attention (each region's "
        "prompt reaches only its box) instead of one more pass per region. Needs regions; false: a pass per "
        "region"
    ),
]
Upscale = Annotated[
    float | None,
    Form(
        allow_inf_nan=False,
        description="Enlarge the image (and mask) by this factor (above 1, at most 4; rounded up to the "
        "model's pixel multiple) and redraw it there (A1111's SD upscale; strength defaults to 0.3). The "
        "output is that larger size, which the server's pixel limit applies to; leave size out",
    ),
]
Upscaler = Annotated[
    str | None,
    Form(
        description="With upscale: lanczos (default) or the name of the upscale model the server loaded "
        "(GET /v1/models: upscaler)"
    ),
]
InpaintArea = Annotated[
    Literal["whole", "masked"] | None,
    Form(
        description="With a mask: whole (default) repaints on the whole image; masked cuts out the mask's "
        "box, draws it at the model's own resolution and blends it back (A1111's Only masked)"
    ),
]
MaskPadding = Annotated[
    int | None, Form(ge=0, description="inpaint_area masked: pixels of context around the mask (default 32)")
]
InpaintSize = Annotated[
    str | None,
    Form(
        pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description="inpaint_area masked: the size the area is drawn at, WxH (default: the model's default "
        "number of pixels, in the box's aspect ratio)",
    ),
]


def _inpaint_size(text: str | None) -> list[int] | None:
    """The inpaint_size field (WxH, its pattern checked) as [width, height], or None."""
    return [int(v) for v in text.split("x")] if text else None


# Fields that hold a list: repeated, as `name[]` fields, JSON text or comma-separated (controlnets.form_list).
LIST_FIELDS = ("controlnet_scales", "controlnet_modes")
# The form's fields: the parameters of `edit_form`, and OpenAI's that are accepted and ignored.
FORM_FIELDS = {
    "image",
    "prompt",
    "mask",
    "reference_image",
    "context_image",
    "control_image",
    "control_canny",
    "redux_image",
    "redux_strength",
    "ip_adapter_image",
    "ip_adapter_scale",
    FORM_FILE,
    *LIST_FIELDS,
    *(f"{name}[]" for name in LIST_FIELDS),  # the openai client's lists in extra_body
    "controlnet_start",
    "controlnet_end",
    "layout",
    "regions",
    "regional_attention",
    *REGIONAL_FIELDS,
    "guidance_method",
    "loras",
    "n",
    "size",
    "response_format",
    "model",
    "user",
    "strength",
    "seed",
    "variation_seed",
    "variation_strength",
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
    *EDIT_KEYS,  # an edit's own settings (upscaling, the masked area, outpainting, feather)
    "output_format",
    "stream",
}
IGNORED_FIELDS = {"quality", "background", "moderation", "safety_identifier", "input_fidelity", "style"}


def check_fields(
    names: set[str],
    known: set[str] = FORM_FIELDS,
    ignored: set[str] = IGNORED_FIELDS,
    kind: str = "edit",
) -> None:
    """Unknown form fields are refused, as in the JSON endpoints: a typo ("step") must not be ignored.
    `known` and `ignored` are the form's fields; `kind` names the form in the messages."""
    article = "an" if kind[0] in "aeiou" else "a"
    if "image[]" in names:
        raise APIError(
            400,
            f"{article} {kind} takes one image, as the field 'image'; lists of images (image[]) are not "
            "supported",
            param="image",
            code="invalid_parameters",
        )
    unknown = sorted(names - known - ignored)
    if unknown:
        raise APIError(
            400,
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}; "
            f"the {kind} form takes {', '.join(sorted(known))}",
            param=unknown[0],
            code="invalid_request",
        )


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


def canny_form(text: str | None) -> list[float] | None:
    """The control_canny form field: empty or ``false`` off, ``true`` the default thresholds, ``LOW,HIGH``
    or ``[LOW, HIGH]`` (as the JSON field's list); a 400 naming the field otherwise."""
    value: Any = None
    stripped = (text or "").strip()
    if stripped.lower() in ("true", "false"):
        value = stripped.lower() == "true"
    elif stripped:
        try:
            value = json.loads(stripped if stripped.startswith("[") else f"[{stripped}]")
        except ValueError:
            value = stripped
    try:
        return canny_setting(value, form=True)
    except ValueError as exc:
        raise APIError(
            400, f"control_canny {exc}", param="control_canny", code="invalid_parameters"
        ) from None


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
        "inpaint_size": _inpaint_size(inpaint_size),
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
