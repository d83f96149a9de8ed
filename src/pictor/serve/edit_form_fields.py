"""The multipart form fields that the edit, variation and upscale forms share: their annotated types
(bounds, patterns and the descriptions the OpenAPI document shows), the readers of fields sent as text
(``inpaint_size``, ``control_canny``) and the check that refuses unknown fields. Declared once, apart from the
endpoints (`edits`, `variations`, `upscales`), so every form validates them alike.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Form

from pictor.composable_prompts import MAX_PARTS
from pictor.ip_adapter_files import MAX_SCALE as MAX_IP_ADAPTER_SCALE
from pictor.redux_images import MAX_STRENGTH
from pictor.serve.controlnets import FORM_FILE
from pictor.serve.errors import APIError
from pictor.serve.generation_parts import canny_setting
from pictor.serve.job_requests import EDIT_KEYS
from pictor.serve.regional_fields import FIELDS as REGIONAL_FIELDS

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


def inpaint_size_of(text: str | None) -> list[int] | None:
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
