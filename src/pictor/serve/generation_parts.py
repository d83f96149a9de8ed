"""The nested objects of a generation body (`generation_body`): layout boxes, regional prompts, LoRA
choices and the guidance method, and the reading of ``control_canny``, which the edit form shares. Apart from
the body itself so that its one long class reads alone, and so the form (`edit_form_fields`) and the LoRA
library take what they need without it."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pictor.control_images import DEFAULT_CANNY
from pictor.guidance_methods import METHODS
from pictor.regional_prompts import MAX_STRENGTH as MAX_REGION_STRENGTH


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
    message words it as the multipart form field (`edit_form_fields.canny_form`)."""
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
