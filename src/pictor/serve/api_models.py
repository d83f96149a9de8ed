"""Response schemas: errors, images, jobs, model cards, health. The OpenAPI document at /openapi.json is
generated from these and from the generation request's body (`generation_body`, OpenAI's Images API shape
plus pictor's fields, its nested objects in `generation_parts`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


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
