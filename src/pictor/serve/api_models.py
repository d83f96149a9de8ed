"""Request and response schemas. The generation request is OpenAI's Images API shape plus pictor's fields;
the OpenAPI document at /openapi.json is generated from these."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from pictor.composable_prompts import MAX_PARTS
from pictor.control_images import DEFAULT_CANNY
from pictor.controlnet_runs import MAX_SCALE
from pictor.guidance_methods import METHODS
from pictor.ip_adapter_files import MAX_SCALE as MAX_IP_ADAPTER_SCALE
from pictor.pipeline import MAX_SEED
from pictor.redux_images import MAX_STRENGTH
from pictor.regional_prompts import MAX_REGIONS, RegionError, parse_regions
from pictor.regional_prompts import MAX_STRENGTH as MAX_REGION_STRENGTH
from pictor.serve.controlnets import json_modes, json_scales, too_many
from pictor.serve.regional_fields import DESCRIPTIONS as REGIONAL_DESCRIPTIONS
from pictor.serve.settings import MAX_CONTROLNETS

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class LayoutBox(BaseModel):
    """One box of a layout: where (fractions of the image, y down) and what (a phrase)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    box: list[float] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1], fractions 0..1.")
    phrase: str = Field(min_length=1, description="What to draw in the box, e.g. 'a red circle'.")


class Region(BaseModel):
    """One regional prompt: where (fractions of the image, y down), what to draw there and how strongly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    box: list[float] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1], fractions 0..1.")
    prompt: str = Field(min_length=1, description="What to draw in the box, e.g. 'a red circle'.")
    strength: float | None = Field(
        None,
        gt=0,
        le=MAX_REGION_STRENGTH,
        allow_inf_nan=False,
        description="How much the region's prompt outweighs the whole prompt in its box (absent: 1, equal "
        "shares; 2: twice the whole prompt's weight).",
    )


class LoraChoice(BaseModel):
    """One LoRA of the server's folder (GET /v1/loras), by name, and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, description="A name from GET /v1/loras.")
    scale: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False, description="Its weight (1: as trained).")


class GuidanceMethodBody(BaseModel):
    """How classifier-free guidance combines the prompt's and the negative prompt's predictions
    (`pictor.guidance_methods`, diffusers' guiders): the method and its parameters, each left out at its
    default. Checked by pictor's GuidanceMethod: a bad value is a 400 naming guidance_method.<field>."""

    model_config = ConfigDict(extra="forbid")

    method: Any = Field(
        None,
        description="cfg (classifier-free guidance, the default), apg (Adaptive Projected Guidance), "
        "cfg-zero-star (CFG-Zero*) or tcfg (Tangential CFG); the model card's guidance_methods.",
        json_schema_extra={"type": "string", "enum": list(METHODS)},
    )
    rescale: Any = Field(
        None,
        description="CFG rescale, any method (0 off to 1; 0.7 is the paper's): the guided prediction's "
        "spread pulled toward the prompt's, against overexposure at high guidance.",
        json_schema_extra={"type": "number"},
    )
    start: Any = Field(
        None,
        description="Guide only from this share of the steps (0 to below 1; default 0).",
        json_schema_extra={"type": "number"},
    )
    stop: Any = Field(
        None,
        description="... to this one (above start, at most 1; default 1); elsewhere the prompt's prediction "
        "alone, and the negative prompt's pass does not run.",
        json_schema_extra={"type": "number"},
    )
    eta: Any = Field(
        None,
        description="apg: how much of the guidance parallel to the prediction stays, 0 to 1 (default 0).",
        json_schema_extra={"type": "number"},
    )
    norm_threshold: Any = Field(
        None,
        description="apg: the guidance's L2 norm per image is clipped to this; 0 off (default 15).",
        json_schema_extra={"type": "number"},
    )
    momentum: Any = Field(
        None,
        description="apg: running average of the guidance over the steps, above -1 and below 1 (default 0, "
        "off; the paper uses negative values).",
        json_schema_extra={"type": "number"},
    )
    zero_init_steps: Any = Field(
        None,
        description="cfg-zero-star: the first steps predict zero velocity (default 1).",
        json_schema_extra={"type": "integer"},
    )


def canny_setting(value: Any, form: bool = False) -> list[float] | None:
    """``control_canny`` as sent (null or false: off; true: BFL's thresholds 50 and 200; [low, high]) as
    [low, high] or None; a ValueError that says what it takes otherwise. Checked here, not only by the
    pipeline, so that a request is refused while the model loads too, not failed when it runs. `form`: the
    message words it as the multipart form field (`edits.canny_form`)."""
    if value is None or value is False:
        return None
    if value is True:
        return [float(v) for v in DEFAULT_CANNY]
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        low, high = float(value[0]), float(value[1])
        if all(math.isfinite(v) and 0 <= v <= 10_000 for v in (low, high)):
            return [low, high]
        raise ValueError(f"the Canny thresholds must be numbers from 0 to 10000, got {text}")
    off, pair = ("empty or false", "LOW,HIGH") if form else ("null", "[low, high]")
    raise ValueError(
        f"must be {off} (no edges drawn), true (draw the control picture's Canny edges with the thresholds "
        f"{DEFAULT_CANNY[0]:g} and {DEFAULT_CANNY[1]:g}) or two thresholds {pair}, got {text}"
    )


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``POST /v1/images/generations`` body; ``seed`` ... ``schedule`` are pictor's."""

    # Unknown fields are refused so a typo ("step") is a 400 that names it, not a silently ignored value;
    # strict, so "n": "2" or "stream": 0 are errors as the schema says, not quietly converted.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(
        description="What to draw; may be empty only with a reference_image, redux_image or ip_adapter_image."
    )
    n: int | None = Field(1, ge=1, description="Number of images (the server's limit applies).")
    size: str | None = Field(
        None,
        pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
        description="WIDTHxHEIGHT, e.g. 64x64; 'auto' or absent: the model's default.",
    )
    response_format: Literal["url", "b64_json"] | None = Field("url", description="How images are returned.")
    model: str | None = Field(None, description="Checked against the served model when given.")
    user: str | None = Field(None, max_length=256, description="End-user id, stored with the job.")
    # pictor's fields, sent by the openai client through extra_body
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i gets seed+i; absent: random.")
    variation_strength: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Variation seeds (A1111's): above 0, every image keeps seed and blends its noise with "
        "that of variation seed variation_seed+i by this much (0.1-0.3: small variations of one picture; "
        "1: the variation seed's picture); 0 or absent: off.",
    )
    variation_seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="The first image's variation seed (image i takes variation_seed+i); needs "
        "variation_strength; absent: random (the records keep it).",
    )
    seed_resize_from: str | None = Field(
        None,
        pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description="A1111's resize seed from, WIDTHxHEIGHT: each image's noise is drawn as for an image of "
        "that size and centred on its own, so a seed's composition at that size carries over to a nearby "
        "size; absent: off.",
    )
    steps: int | None = Field(None, ge=1, description="Sampler steps (the server's limit applies).")
    guidance: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, description="Guidance scale.")
    negative_prompt: str | None = Field(None, description="What to steer away from (CFG models).")
    prompt_weights: bool = Field(
        False,
        description="Read A1111's weights in the prompt and negative prompt: (words:1.5), "
        "(words) = 1.1, [words] = 1/1.1, nesting multiplies; false: brackets are text.",
    )
    prompt_editing: bool = Field(
        False,
        description="A1111's prompt editing: words that change during sampling. [from:to:when] reads from "
        "until step when and to after it, [to:when] adds to after it, [from::when] drops from after it "
        "(when below 1: a share of the steps); [a|b] alternates a and b every step. Needs prompt_weights.",
    )
    composable: bool = Field(
        False,
        description="A1111's composable diffusion: the prompt's parts joined by AND (upper case), each with "
        "an optional trailing :weight (a red circle AND a blue square:0.8), each part one more transformer "
        f"pass per step, guided together (with prompt_editing, each part reads its own); at most {MAX_PARTS} "
        "parts. Not with regions; false: AND is a word.",
    )
    guidance_method: GuidanceMethodBody | None = Field(
        None,
        description="How guidance combines the prompt's and the negative prompt's predictions, for models "
        'with real CFG: {"method": "apg", "eta": 0, "rescale": 0.7, "start": 0, "stop": 0.7, ...} (see '
        "GuidanceMethodBody; absent: plain CFG over every step). Refused on a guidance-distilled model, at "
        "guidance 1, and with an interval that holds none of the steps.",
    )
    sampler: str | None = Field(
        None,
        description="euler, heun, dpmpp_2m, unipc, deis, ipndm, res_multistep, lms, dpm_2, heunpp2, "
        "gradient_estimation, or the stochastic euler_ancestral, dpmpp_2m_sde, lcm, dpm_2_ancestral, "
        "dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde_heun and dpmpp_3m_sde (fresh noise every step, drawn "
        "from the image's seed, so the seed still reproduces it). The model card lists them.",
    )
    schedule: str | None = Field(
        None,
        description="Timestep schedule: flux, linear, shifted, karras, exponential, beta, or ComfyUI's "
        "normal, kl_optimal and linear_quadratic.",
    )
    layout: list[LayoutBox] | None = Field(
        None, max_length=32, description="Boxes with phrases; needs a model with a layout adapter."
    )
    regions: list[Region] | None = Field(
        None,
        max_length=MAX_REGIONS,
        description="Regional prompts, with any model (no adapter): a prompt of its own for each box, "
        "blended with the whole prompt where the box lies (ComfyUI's ConditioningSetMask, A1111's Regional "
        f"Prompter); at most {MAX_REGIONS}, each one more transformer pass per step (with prompt_editing, "
        "each region's prompt is edited too). Not with a prompt that composable splits at AND.",
    )
    regional_attention: bool = Field(
        False,
        description="Run the regions as one transformer pass with a masked joint attention (each region's "
        "prompt reaches only its box; Regional-Prompting-FLUX's mask, ComfyUI's attention couple) instead "
        "of one more pass per region: the cost grows with the regions' tokens, not their number. Needs "
        "regions; false: a pass per region, their velocities blended.",
    )
    # Regional-Prompting-FLUX's controls of regional attention (`serve.regional_fields`): they need
    # regional_attention and regions; checked by the pipeline's rules, a 400 naming the field.
    regional_steps: float | None = Field(
        None, allow_inf_nan=False, description=REGIONAL_DESCRIPTIONS["regional_steps"]
    )
    regional_double_interval: int | None = Field(
        None, description=REGIONAL_DESCRIPTIONS["regional_double_interval"]
    )
    regional_single_interval: int | None = Field(
        None, description=REGIONAL_DESCRIPTIONS["regional_single_interval"]
    )
    regional_base_ratio: float | None = Field(
        None, allow_inf_nan=False, description=REGIONAL_DESCRIPTIONS["regional_base_ratio"]
    )
    reference_image: str | None = Field(
        None,
        description="A reference picture whose content the images take: a PNG, JPEG or WebP file, base64 "
        "(or a data:image/...;base64, URL); needs a model with a reference adapter.",
    )
    context_image: str | None = Field(
        None,
        description="FLUX.1 Kontext: the picture the prompt's instruction edits (e.g. 'make the circle "
        "blue'): a PNG, JPEG or WebP file, base64 (or a data:image/...;base64, URL); resized to the model's "
        "preferred size, which the images take unless size is given; needs a Kontext model.",
    )
    control_image: str | None = Field(
        None,
        description="FLUX.1 Canny / Depth: the control picture whose structure the images follow (an edge "
        "map for a Canny model, or a photo with control_canny; a depth map, near = bright, for a Depth "
        "model): a PNG, JPEG or WebP file, base64 (or a data:image/...;base64, URL); resized to the images' "
        "size; a control model needs one, other models refuse it.",
    )
    control_canny: bool | list[float] | None = Field(
        None,
        description="FLUX.1 Canny: draw control_image's Canny edges first (OpenCV's Canny): true for the "
        "thresholds 50 and 200, or [low, high]; null or false: the picture is the edge map.",
    )
    redux_image: str | None = Field(
        None,
        description="FLUX.1 Redux: a picture whose content and style the images take (SigLIP reads it; its "
        "tokens follow the prompt's): a PNG, JPEG or WebP file, base64 (or a data:image/...;base64, URL); "
        "the prompt may then be empty; needs a server with Redux loaded (the model card's redux).",
    )
    redux_strength: float | None = Field(
        None,
        ge=0,
        le=MAX_STRENGTH,
        allow_inf_nan=False,
        description="How strongly redux_image speaks: its tokens times this (default 1, BFL's).",
    )
    ip_adapter_image: str | None = Field(
        None,
        description="XLabs' FLUX.1 IP-Adapter: a picture whose look the images take (CLIP reads it; the "
        "transformer's double blocks attend to its embedding): a PNG, JPEG or WebP file, base64 (or a "
        "data:image/...;base64, URL); the prompt may then be empty; needs a server with the IP-Adapter "
        "loaded (the model card's ip_adapter).",
    )
    ip_adapter_scale: float | None = Field(
        None,
        ge=0,
        le=MAX_IP_ADAPTER_SCALE,
        allow_inf_nan=False,
        description="How strongly ip_adapter_image speaks: its attention times this (default 1; XLabs "
        "suggest 0.5 to 1).",
    )
    controlnet_images: list[str] | None = Field(
        None,
        description="FLUX.1 ControlNets: one control picture per ControlNet the server loaded (GET "
        "/v1/models lists them), in that order: an edge map, depth map, pose...; PNG, JPEG or WebP files, "
        "base64 (or data:image/...;base64, URLs); each resized to the images' size. A server with "
        "ControlNets needs "
        f"them; at most {MAX_CONTROLNETS}.",
    )
    controlnet_scales: list[float] | None = Field(
        None,
        description="How strongly the ControlNets speak (their residuals times this; default 1): one number "
        f"for all, or a list with one per ControlNet, each from 0 to {MAX_SCALE:g}.",
    )
    controlnet_modes: list[str | int | None] | None = Field(
        None,
        description="A Union ControlNet's mode (what its picture is: canny, tile, depth, blur, pose, gray, "
        "lq, or the number; the model card lists each ControlNet's modes): one for all the Union "
        "ControlNets, or a list with one per ControlNet, null for a ControlNet without modes.",
    )
    controlnet_start: float | None = Field(
        None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="The share of the steps from which the ControlNets run (default 0).",
    )
    controlnet_end: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="The share of the steps until which the ControlNets run (default 1).",
    )
    hires_scale: float | None = Field(
        None,
        gt=1,
        le=4,
        allow_inf_nan=False,
        description="Hires fix: generate at size, upscale by this factor and redraw details at that size "
        "(the larger size is what the server's pixel limit applies to).",
    )
    hires_strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="Share of the upscaled picture redrawn (0.3)."
    )
    hires_steps: int | None = Field(None, ge=1, description="Steps of the second pass (default: steps).")
    hires_upscaler: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="What enlarges the first pass: lanczos (the default), or the name of the upscale model "
        "the server loaded (pictor serve --upscaler FILE; the model card's upscaler.name), which enlarges it "
        "before Lanczos brings it to the hires size.",
    )
    cache_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="First-block cache: skip the model's later blocks on steps where its first block changed "
        "by at most this share (0.05-0.2: fewer full passes, small changes; 0 or absent: off).",
    )
    denoise_tile: int | None = Field(
        None,
        description="Denoise tiles (MultiDiffusion, A1111's Tiled Diffusion): run the model at each step "
        "over windows of this many pixels a side and blend them, for refining large images (img2img, a "
        "hires fix's second pass); a multiple of the model's token size (the model card's "
        "limits.size_multiple), at least 4 tokens; a pass no larger than one window runs whole. Not with "
        "cache_threshold. Absent: the model runs on the whole image.",
    )
    denoise_tile_overlap: int | None = Field(
        None,
        description="Pixels neighbouring denoise tiles share and blend over: a multiple of the model's token "
        "size up to half the tile (default a quarter of it); needs denoise_tile.",
    )
    loras: list[LoraChoice] | None = Field(
        None, max_length=8, description="LoRAs of the server's folder (GET /v1/loras) with their scales."
    )
    # OpenAI's fields with no meaning here: accepted so OpenAI clients work unchanged, otherwise ignored.
    quality: str | None = Field(None, description="Accepted and ignored.")
    style: str | None = Field(None, description="Accepted and ignored.")
    background: str | None = Field(None, description="Accepted and ignored.")
    moderation: str | None = Field(None, description="Accepted and ignored; see the server's prompt policy.")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    output_format: Literal["png"] | None = Field(None, description="Only png.")
    stream: Literal[False] | None = Field(None, description="Only false: follow a job with /v1/jobs events.")

    @field_validator("control_canny", mode="before")
    @classmethod
    def _canny(cls, value: Any) -> Any:
        return canny_setting(value)

    @field_validator("controlnet_images", mode="before")
    @classmethod
    def _controlnet_count(cls, value: Any) -> Any:
        # Before each picture is looked at: a body of many pictures is refused by its count.
        if isinstance(value, list) and len(value) > MAX_CONTROLNETS:
            raise ValueError(too_many(len(value), "controlnet_images").message.split(": ", 1)[1])
        return value

    @field_validator("controlnet_scales", mode="before")
    @classmethod
    def _controlnet_scales(cls, value: Any) -> Any:
        return json_scales(value)

    @field_validator("controlnet_modes", mode="before")
    @classmethod
    def _controlnet_modes(cls, value: Any) -> Any:
        return json_modes(value)

    @field_validator("regions", mode="before")
    @classmethod
    def _region_count(cls, value: Any) -> Any:
        # Before each region is looked at, in the words of `parse_regions` (which says why there is a limit);
        # the field's name is said once, by the error's place. A custom error, as pydantic starts a
        # ValueError's message with "Value error, ".
        if isinstance(value, list) and len(value) > MAX_REGIONS:
            try:
                parse_regions(value)
            except RegionError as exc:
                reason = str(exc).removeprefix("regions: ")
                raise PydanticCustomError("too_many_regions", "{reason}", {"reason": reason}) from None
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _no_streaming(cls, value: Any) -> Any:
        # Literal[False] alone would take 0 (0 == False in Python)
        if value is not None and value is not False:
            raise ValueError("streaming is not offered; use POST /v1/jobs and GET /v1/jobs/{id}/events")
        return value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    job_id: str = Field(description="pictor: the history entry of this request (GET /v1/jobs/{id}).")
    warnings: list[str] | None = Field(
        None,
        description="pictor: what the request's user should know, e.g. the end of a prompt longer than the "
        "text encoder reads; absent when there is nothing to say.",
    )


class JobProgress(BaseModel):
    step: int
    total: int
    fraction: float


class JobResult(BaseModel):
    image_id: str
    seed: int
    url: str


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    created: float
    started_at: float | None = None
    finished_at: float | None = None
    request: dict[str, Any] = Field(description="The normalized request (prompt, size, steps, seed...).")
    user: str | None = None
    progress: JobProgress
    queue_position: int | None = Field(None, description="0 = next to run; only while queued.")
    attempts: int
    results: list[JobResult]
    error: ErrorBody | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="What the user should know about how the job ran, e.g. the end of a prompt longer than "
        "the text encoder reads (set when the job starts to run; empty when there is nothing to say).",
    )


class DeletedJob(BaseModel):
    """A finished job deleted from the history, as OpenAI answers a deletion."""

    id: str
    object: Literal["job.deleted"] = "job.deleted"
    deleted: bool = True


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    total: int
    limit: int
    offset: int
    has_more: bool


class ImageMetadata(BaseModel):
    id: str
    job_id: str
    seed: int
    url: str
    parameters: str = Field(description="The A1111 'parameters' text stored in the PNG.")
    postprocessing: str = Field(
        "",
        description="A1111's Extras text of an upscaled image ('Postprocess upscale by: ...'), else empty.",
    )
    record: dict[str, Any] = Field(description="The pictor JSON record stored in the PNG.")


class ControlNetCard(BaseModel):
    """A FLUX.1 ControlNet the server loaded (pictor serve --controlnet), in controlnet_images' order."""

    name: str = Field(description="Its file's or folder's name.")
    kind: Literal["instantx", "union", "xlabs"] = Field(
        description="instantx (latents of its picture), union (the same, told what the picture is by a mode) "
        "or xlabs (the picture's pixels)."
    )
    modes: list[str] | None = Field(
        None,
        description="A Union ControlNet's modes, by name (or number past the named ones); its "
        "controlnet_modes entry is one of them. null: a ControlNet without modes (its entry is null).",
    )


class UpscalerCard(BaseModel):
    """The upscale model the server loaded (pictor serve --upscaler FILE)."""

    name: str = Field(description="Its file's name without the suffix: hires_upscaler names it so.")
    architecture: str = Field(description="ESRGAN (RRDBNet) or Compact (Real-ESRGAN's SRVGGNet).")
    scale: int = Field(description="Its own factor: one run makes a picture this many times as large.")
    sha256: str = Field(description="Its file's SHA-256, which the records of its pictures keep.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(0, description="When this server started serving it (Unix seconds).")
    owned_by: str = "pictor"
    ready: bool
    trained: bool | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, int] = Field(default_factory=dict)
    samplers: list[str] = Field(default_factory=list)
    schedules: list[str] = Field(
        default_factory=list,
        description="The timestep schedules a request's schedule may name (without one: the model's own).",
    )
    guidance_methods: list[str] = Field(
        default_factory=list,
        description="The guidance methods a request's guidance_method.method may name (plain cfg first); "
        "they act on real CFG, so a guidance-distilled model refuses all but plain cfg.",
    )
    kontext: bool = Field(
        False,
        description="A FLUX.1 Kontext model: it takes context_image (false while the model loads).",
    )
    reference: bool = Field(
        False,
        description="The model has a reference adapter: it takes reference_image, and a variation's picture "
        "is also its reference (false while the model loads).",
    )
    layout: bool = Field(
        False, description="The model has a layout adapter: it takes layout (false while the model loads)."
    )
    fill: bool = Field(
        False,
        description="A FLUX.1 Fill model: it only repaints masked pictures (edits with a mask); generations "
        "and variations are refused (false while the model loads).",
    )
    control: Literal["canny", "depth"] | None = Field(
        None,
        description="A FLUX.1 Canny or Depth model: what its control_image is, an edge map (canny) or a "
        "depth map (depth); every image needs one, and control_canny goes with canny only (null for other "
        "models, and while the model loads).",
    )

    redux: bool = Field(
        False,
        description="The server has FLUX.1 Redux loaded: it takes redux_image and redux_strength, and a "
        "variation is drawn from its picture through Redux (false while the model loads).",
    )
    ip_adapter: bool = Field(
        False,
        description="The server has XLabs' FLUX.1 IP-Adapter loaded: it takes ip_adapter_image and "
        "ip_adapter_scale (false while the model loads).",
    )
    controlnets: list[ControlNetCard] = Field(
        default_factory=list,
        description="The FLUX.1 ControlNets the server loaded, in order: every generation and edit then "
        "gives one picture each (controlnet_images; an edit's controlnet_image files), and variations are "
        "refused (empty without ControlNets, and while the model loads).",
    )
    upscaler: UpscalerCard | None = Field(
        None,
        description="The upscale model the server loaded: POST /v1/images/upscale (and /v1/jobs/upscales) "
        "run it, and a generation's hires_upscaler may name it (null without one, and while the model "
        "loads).",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str | None = None
    detail: str | None = None
