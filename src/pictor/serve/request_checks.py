"""The checks of a request's fields that need no model (sampler and schedule names, layout, regions, the
prompt), so they hold while the model loads too: a 400 before anything is kept or queued. Shared by the JSON
body (`Service.params`), the edit form (`edit_validation`) and the variation form; apart from the service,
since they need none of its state.
"""

from __future__ import annotations

from typing import Any

from pictor.layout_files import LayoutError, parse_layout
from pictor.regional_prompts import RegionError, parse_regions
from pictor.sampling import SAMPLERS, SCHEDULES
from pictor.serve.errors import APIError
from pictor.serve.settings import Limits


def check_names(sampler: str | None, schedule: str | None) -> None:
    """Sampler and schedule names, known without the model (so also while it loads): a 400, not a job that
    fails when it runs."""
    for param, name, known in (("sampler", sampler, sorted(SAMPLERS)), ("schedule", schedule, SCHEDULES)):
        if name and name not in known:
            raise APIError(
                400,
                f"unknown {param} {name!r}; choose one of {', '.join(known)}",
                param=param,
                code="invalid_parameters",
            )


def checked_layout(layout: Any) -> list[dict[str, Any]] | None:
    """A layout (boxes with phrases, or its JSON text) checked and normalised; None when absent."""
    if layout is None or (isinstance(layout, str) and not layout.strip()):
        return None
    try:
        return parse_layout(layout)
    except LayoutError as exc:
        raise APIError(400, str(exc), param="layout", code="invalid_parameters") from None


def checked_regions(regions: Any, limits: Limits) -> list[dict[str, Any]] | None:
    """Regional prompts (a list of regions, or its JSON text) checked and normalised, each with its
    strength; None when absent. Each region's prompt is held to the server's prompt limit too, since it is
    encoded as the prompt is."""
    if regions is None or (isinstance(regions, str) and not regions.strip()):
        return None
    try:
        parsed = parse_regions(regions)
    except RegionError as exc:
        raise APIError(400, str(exc), param="regions", code="invalid_parameters") from None
    for i, region in enumerate(parsed):
        if len(region["prompt"]) > limits.max_prompt_chars:
            raise APIError(
                400,
                f"region {i}: 'prompt' is {len(region['prompt'])} characters; this server's limit is "
                f"{limits.max_prompt_chars}",
                param="regions",
                code="prompt_too_long",
            )
    return parsed


# The pipeline's words (`pictor.request_resolution`), which say nothing of the CLI; a test holds them equal.
REGIONAL_ATTENTION_WITHOUT_REGIONS = (
    "regional attention is a way to run regions: give regions (boxes with prompts) with it, or drop it"
)


def check_regional_attention(on: bool, regions: list[dict[str, Any]] | None) -> None:
    """Regional attention runs regions as one masked pass: without regions it means nothing, which is known
    without the model, so refused before anything is kept or queued (also while the model loads), as the
    pipeline refuses it."""
    if on and not regions:
        raise APIError(
            400, REGIONAL_ATTENTION_WITHOUT_REGIONS, param="regional_attention", code="invalid_parameters"
        )


def require_prompt(prompt: str, has_reference: bool) -> None:
    """An empty prompt is an error unless a reference (or Redux, or IP-Adapter) picture says what to draw."""
    if not prompt.strip() and not has_reference:
        raise APIError(
            400,
            "prompt is empty: say what to draw (an empty prompt goes only with a reference_image, a "
            "redux_image or an ip_adapter_image, whose content the images then take)",
            param="prompt",
            code="invalid_parameters",
        )
