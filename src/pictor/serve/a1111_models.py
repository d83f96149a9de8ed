"""The ``/sdapi/v1`` schemas: AUTOMATIC1111's request fields (its ``StableDiffusionProcessing*`` and API
additions, with Forge's ``distilled_cfg_scale``) and its answers' shapes, so that A1111's clients work
unchanged.

Field names, types and the defaults that mean the same here are A1111's. Where A1111's default suits Stable
Diffusion 1.5 rather than the served model (512x512, 50 steps, CFG 7, Euler) the default is null: the
served model's own. Fields are read as A1111's (lax) pydantic models read them: ``"steps": "20"``, ``"seed":
"-1"`` and ``"width": 512.0`` are numbers, true and false are 1 and 0; a fractional number for a whole one,
NaN and infinities are refused. Fields A1111 does not have are accepted and ignored, as A1111 does (the
answer's ``info`` lists them; they are not echoed back).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from pictor.generation_request import MAX_SEED

FLAG_WORDS: dict[str, bool | int] = {"0": 0, "1": 1, "false": False, "true": True}


def _switch(value: Any) -> Any:
    """A1111's switches sent as 0 / 1 (its web UI's) or false / true, kept as sent (the answer echoes them);
    anything else is refused in those words, not as a failed union of types."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in FLAG_WORDS:
        return FLAG_WORDS[value.strip().lower()]
    raise PydanticCustomError(
        "switch", "must be 0 or 1 (or false / true), not {value}", {"value": repr(value)}
    )


Flag = Annotated[bool | Literal[0, 1], BeforeValidator(_switch)]  # A1111's web UI sends some as 0 / 1


class A1111Common(BaseModel):
    """What A1111's txt2img and img2img bodies share."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = Field(
        "", description="What to draw; `<lora:NAME:WEIGHT>` tags choose LoRAs of --lora-dir (null: empty)."
    )
    negative_prompt: str | None = Field(None, description="What to steer away from (real-CFG models).")
    styles: list[str] | None = Field(None, description="A1111's prompt styles: refused unless empty.")
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED, description="-1: random (info says which).")
    subseed: int | None = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed; -1: random.")
    subseed_strength: float | None = Field(0, ge=0, le=1, allow_inf_nan=False, description="0: off.")
    seed_resize_from_h: int | None = Field(-1, ge=-1, le=65535, description="With _w: resize seed from.")
    seed_resize_from_w: int | None = Field(-1, ge=-1, le=65535)
    sampler_name: str | None = Field(None, description="A1111's name (GET /sdapi/v1/samplers); 'Karras' too.")
    sampler_index: str | None = Field(None, description="A1111's older name of sampler_name.")
    scheduler: str | None = Field(None, description="Schedule type (GET /sdapi/v1/schedulers).")
    batch_size: int | None = Field(1, ge=1, le=10_000, description="Images per batch.")
    n_iter: int | None = Field(1, ge=1, le=10_000, description="Batches: images = batch_size * n_iter.")
    steps: int | None = Field(None, ge=1, le=100_000, description="null: the model's default.")
    cfg_scale: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False, description="Guidance; null: the model's default."
    )
    distilled_cfg_scale: float | None = Field(
        None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Forge's: the guidance a guidance-distilled model (FLUX.1 [dev]) reads.",
    )
    width: int | None = Field(
        None, ge=1, le=65535, description="null: the model's default (img2img: the image's)."
    )
    height: int | None = Field(None, ge=1, le=65535)
    restore_faces: bool | None = Field(None, description="Refused when true.")
    tiling: bool | None = Field(None, description="Refused when true.")
    do_not_save_samples: bool | None = Field(False, description="Ignored: every image goes to the history.")
    do_not_save_grid: bool | None = Field(False, description="Ignored: pictor makes no grids.")
    eta: float | None = Field(None, allow_inf_nan=False, description="Ignored (pictor's samplers fix it).")
    s_min_uncond: float | None = Field(None, allow_inf_nan=False, description="Ignored.")
    s_churn: float | None = Field(None, allow_inf_nan=False, description="Ignored.")
    s_tmax: float | None = Field(None, allow_inf_nan=False, description="Ignored.")
    s_tmin: float | None = Field(None, allow_inf_nan=False, description="Ignored.")
    s_noise: float | None = Field(None, allow_inf_nan=False, description="Ignored.")
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint must name the served model; other settings are ignored."
    )
    override_settings_restore_afterwards: bool | None = Field(True, description="Ignored.")
    refiner_checkpoint: str | None = Field(None, description="Refused unless empty or 'None'.")
    refiner_switch_at: float | None = Field(None, allow_inf_nan=False, description="Ignored without one.")
    disable_extra_networks: bool | None = Field(
        False, description="true: LoRA tags are dropped, not applied."
    )
    firstpass_image: str | None = Field(None, description="Refused unless empty.")
    comments: dict[str, Any] | None = Field(None, description="Ignored.")
    script_name: str | None = Field(None, description="Refused unless empty: pictor runs no A1111 scripts.")
    script_args: list[Any] | None = Field(None, description="Ignored without script_name.")
    send_images: bool | None = Field(True, description="false: the answer's images are left out.")
    save_images: bool | None = Field(False, description="Ignored: every image goes to the history.")
    alwayson_scripts: dict[str, Any] | None = Field(None, description="Refused unless empty.")
    force_task_id: str | None = Field(None, description="Ignored.")
    infotext: str | None = Field(None, description="Refused unless empty: send the settings as fields.")
    denoising_strength: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="img2img: the share redrawn (null: 0.75, 1 with a mask); txt2img: the hires fix's (null: "
        "0.75, A1111's).",
    )

    @model_validator(mode="after")
    def _no_null_prompt(self) -> A1111Common:
        self.prompt = self.prompt or ""  # A1111's fields are all nullable; a null prompt is an empty one
        return self


class Txt2ImgRequest(A1111Common):
    """A1111's ``StableDiffusionTxt2ImgProcessingAPI``."""

    enable_hr: bool | None = Field(False, description="The hires fix.")
    firstphase_width: int | None = Field(0, ge=0, le=65535, description="Refused unless 0 (A1111's old API).")
    firstphase_height: int | None = Field(0, ge=0, le=65535)
    hr_scale: float | None = Field(2.0, gt=0, le=100, allow_inf_nan=False, description="Hires: the factor.")
    hr_upscaler: str | None = Field(None, description="Lanczos (null too), None, or the server's upscaler.")
    hr_second_pass_steps: int | None = Field(0, ge=0, le=100_000, description="0: the first pass's steps.")
    hr_resize_x: int | None = Field(0, ge=0, le=65535, description="Hires: the final width (0: by hr_scale).")
    hr_resize_y: int | None = Field(0, ge=0, le=65535)
    hr_checkpoint_name: str | None = Field(None, description="Refused unless the served model.")
    hr_sampler_name: str | None = Field(None, description="Refused unless the first pass's.")
    hr_scheduler: str | None = Field(None, description="Refused unless the first pass's.")
    hr_prompt: str | None = Field("", description="Refused unless empty or the prompt.")
    hr_negative_prompt: str | None = Field("", description="Refused unless empty or the negative prompt.")
    hr_cfg: float | None = Field(None, allow_inf_nan=False, description="Forge's: refused unless cfg_scale.")
    hr_distilled_cfg: float | None = Field(
        None, allow_inf_nan=False, description="Forge's: refused unless distilled_cfg_scale."
    )


class Img2ImgRequest(A1111Common):
    """A1111's ``StableDiffusionImg2ImgProcessingAPI``."""

    init_images: list[str] | None = Field(
        None, max_length=16, description="One picture: base64 PNG, JPEG or WebP (a data: URL too)."
    )
    resize_mode: int | None = Field(0, ge=0, le=3, description="0: just resize to width x height.")
    image_cfg_scale: float | None = Field(None, allow_inf_nan=False, description="Ignored (pix2pix only).")
    mask: str | None = Field(None, description="base64 picture: white repaints (or opaque, with alpha).")
    mask_blur: int | None = Field(
        None, ge=0, le=256, description="Pixels: pictor's feather (null: mask_blur_x / _y, else 4, A1111's)."
    )
    mask_blur_x: int | None = Field(None, ge=0, le=256)
    mask_blur_y: int | None = Field(None, ge=0, le=256)
    mask_round: bool | None = Field(True, description="Refused when false: pictor's masks are binary.")
    inpainting_fill: int | None = Field(
        None,
        ge=0,
        le=3,
        description="1 original (null too); 0 (fill, A1111's default) is taken as 1 and listed in info's "
        "ignored_fields; 2, 3 only at denoising_strength 1.",
    )
    inpaint_full_res: Flag | None = Field(True, description="true: only the masked area (A1111's default).")
    inpaint_full_res_padding: int | None = Field(0, ge=0, le=65535, description="Pixels around the mask.")
    inpainting_mask_invert: Flag | None = Field(0, description="1: repaint where the mask is black.")
    initial_noise_multiplier: float | None = Field(None, allow_inf_nan=False, description="Refused unless 1.")
    latent_mask: str | None = Field(None, description="Refused unless empty.")
    include_init_images: bool | None = Field(False, description="Echo the pictures in `parameters`.")


class A1111Images(BaseModel):
    images: list[str] = Field(description="Base64 PNGs, with pictor's provenance chunks.")
    parameters: dict[str, Any] = Field(description="The request as taken.")
    info: str = Field(description="JSON text: A1111's keys (seed, all_seeds, infotexts...), and job_id.")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1, of the A1111 jobs now queued or running.")
    eta_relative: float = Field(description="Seconds left, estimated from the running job's pace.")
    state: ProgressState
    current_image: str | None = Field(None, description="The running job's live preview, base64 JPEG.")
    textinfo: str | None = None


class PNGInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    image: str = Field(description="A base64 PNG, JPEG or WebP (a data: URL too).")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="Its A1111 `parameters` text ('' without one).")
    items: dict[str, Any] = Field(description="Its other text chunks (pictor's record among them).")
    parameters: dict[str, Any] = Field(description="The parameters text read into fields, as A1111 does.")
