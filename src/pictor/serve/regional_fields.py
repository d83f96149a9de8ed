"""Regional attention's Regional-Prompting-FLUX controls (`pictor.regional_attention.RegionalOptions`) as
request fields: ``regional_steps``, ``regional_double_interval``, ``regional_single_interval`` and
``regional_base_ratio``, in a generation's JSON body (and so a job's) and as fields of an edit's multipart
form, as ``pictor generate --regional-steps`` and the like take them.

They are checked by the pipeline's own rules (`check_regional_options`), known without the model (so also
while it loads): a bad value, or one given without ``regional_attention`` and ``regions``, is a 400 whose
``param`` names the field, in the pipeline's words. A job keeps them as sent (None where absent, so a job
queued before them reads as without them); a whole ``regional_steps`` of 1 or more is a count of steps, as
the CLI reads it. Records keep those that are not their defaults (the pipeline's)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import Form

from pictor.regional_attention import REGIONAL_OPTION_FIELDS, check_regional_options
from pictor.serve.errors import APIError

FIELDS = REGIONAL_OPTION_FIELDS

# The fields' descriptions, shared by the JSON body (generation_body) and the edit form.
DESCRIPTIONS = {
    "regional_steps": "With regional_attention: the regions' mask in the first N steps only (a share below "
    "1: that share of the steps, rounded up; Regional-Prompting-FLUX's mask_inject_steps); the later steps "
    "run the prompt alone. Absent: every step.",
    "regional_double_interval": "With regional_attention: the mask in every K-th double block only (1 or "
    "more; RPF's double_inject_blocks_interval); the other blocks see no region's words. Absent: 1, every "
    "block.",
    "regional_single_interval": "With regional_attention: the mask in every K-th single block only (1 or "
    "more; RPF's single_inject_blocks_interval). Absent: 1, every block.",
    "regional_base_ratio": "With regional_attention: the share (0 to 1) of the image's attention in masked "
    "blocks taken from the prompt alone's, unmasked (RPF's base_ratio, e.g. 0.2). Absent: 0.",
}

RegionalSteps = Annotated[float | None, Form(allow_inf_nan=False, description=DESCRIPTIONS["regional_steps"])]
RegionalDoubleInterval = Annotated[int | None, Form(description=DESCRIPTIONS["regional_double_interval"])]
RegionalSingleInterval = Annotated[int | None, Form(description=DESCRIPTIONS["regional_single_interval"])]
RegionalBaseRatio = Annotated[
    float | None, Form(allow_inf_nan=False, description=DESCRIPTIONS["regional_base_ratio"])
]


def checked_regional_options(
    values: dict[str, Any], regional_attention: bool, regions: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """The four options as a job keeps them (each None where absent), checked as the pipeline checks them
    (`check_regional_options`): a 400 whose ``param`` is the first field its message names."""
    options = {name: values.get(name) for name in FIELDS}
    problem = check_regional_options(
        SimpleNamespace(regional_attention=regional_attention, regions=regions, **options)
    )
    if problem is not None:
        param = next((name for name in FIELDS if problem.startswith(name)), FIELDS[0])
        raise APIError(400, problem, param=param, code="invalid_parameters")
    steps = options["regional_steps"]
    if steps is not None and steps >= 1:  # a whole number (checked): a count of steps, as the CLI's
        options["regional_steps"] = int(steps)
    for name in ("regional_double_interval", "regional_single_interval"):
        if options[name] is not None:
            options[name] = int(options[name])
    return options
