"""``ImageGenerationRequest``: OpenAI's ``POST /v1/images/generations`` body plus pictor's fields, with the
checks pydantic runs on it (so that a bad field is a 400 naming it). Its nested objects are in
`generation_parts`; the responses in `api_models`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from pictor.composable_prompts import MAX_PARTS
from pictor.controlnet_requests import MAX_SCALE
from pictor.ip_adapter_files import MAX_SCALE as MAX_IP_ADAPTER_SCALE
from pictor.pipeline import MAX_SEED
from pictor.redux_images import MAX_STRENGTH
from pictor.regional_prompts import MAX_REGIONS, RegionError, parse_regions
from pictor.serve.controlnets import json_modes, json_scales, too_many
from pictor.serve.generation_parts import GuidanceMethodBody, LayoutBox, LoraChoice, Region, canny_setting
from pictor.serve.regional_fields import DESCRIPTIONS as REGIONAL_DESCRIPTIONS
from pictor.serve.settings import MAX_CONTROLNETS


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
        description="euler, heun, dpmpp_2m, unipc, deis, ipndm, ipndm_v, res_multistep, lms, dpm_2, heunpp2, "
        "gradient_estimation, exp_heun_2_x0, euler_cfg_pp, dpmpp_2m_cfg_pp, res_multistep_cfg_pp, "
        "gradient_estimation_cfg_pp, or the stochastic euler_ancestral, dpmpp_2m_sde, lcm, dpm_2_ancestral, "
        "dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde, res_multistep_ancestral, er_sde, "
        "seeds_2, seeds_3, exp_heun_2_x0_sde, sa_solver, sa_solver_pece, euler_ancestral_cfg_pp, "
        "dpmpp_2s_ancestral_cfg_pp and res_multistep_ancestral_cfg_pp (fresh noise every step, drawn from "
        "the image's seed, so the seed still reproduces it). The *_cfg_pp ones are CFG++: they renoise with "
        "the negative prompt's prediction, so they need a model with real CFG, run its negative pass at "
        "guidance 1 too, and refuse a guidance interval. The model card lists them.",
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
