"""Regional prompts: a prompt of its own for each box of the image, with no training and with any model
(ComfyUI's ConditioningSetMask with box masks, A1111's Regional Prompter in its mask mode).

A region is ``{"box": [x0, y0, x1, y1], "prompt": "a red circle", "strength": 1.0}``, the box in fractions
of the image (y grows downward) and the strength optional (1 by default). At every model call the
transformer runs once on the whole prompt and once on each region's prompt, each over the whole image (so
each sees the picture as one), and each image token's conditional velocity is their mean weighted by
where the token lies: the whole prompt weighs 1 everywhere, a region its strength times the share of the
token's cell that its box covers (ComfyUI's rule for masked conditions: summed with their weights, then
divided by the weights' sum). Outside every box the image follows the whole prompt alone; inside a box of
strength 1 the whole prompt and the region's share equally, and a larger strength gives the region more.
Classifier-free guidance then guides that blend away from the negative prompt, as it would one prompt
(`pictor.composable_prompts.compose`, with weights that sum to 1).

A layout file (``{"box", "phrase"}``, `pictor.layout_files`) reads as regions too: a phrase is a prompt.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from pictor.data.layouts import box_problem, json_arg_text
from pictor.models.layout import box_coverage

__all__ = [
    "MAX_REGIONS",
    "REGIONS_EXAMPLE",
    "RegionError",
    "parse_regions",
    "read_regions_arg",
    "region_cover",
    "region_weights",
]

MAX_REGIONS = 8  # each region is one more transformer pass per step
MAX_PROMPT_CHARS = 2000
MAX_STRENGTH = 10.0  # ComfyUI's limit for a condition's strength
REGIONS_EXAMPLE = (
    '[{"box": [0, 0, 0.5, 1], "prompt": "a red circle"}, '
    '{"box": [0.5, 0, 1, 1], "prompt": "a blue square", "strength": 2}]'
)


class RegionError(ValueError):
    """A region list that cannot be read, with what to write instead."""


def parse_regions(value: Any) -> list[dict[str, Any]]:
    """Checked, normalised regions (each with its strength) from a list of objects or its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RegionError(f"regions: not valid JSON ({exc}); write them like {REGIONS_EXAMPLE}") from None
        except RecursionError:  # "[[[[...]]]]" thousands deep: not regions, and not a server fault
            raise RegionError(f"regions: JSON nested too deeply; write them like {REGIONS_EXAMPLE}") from None
    if not isinstance(value, list) or not value:
        raise RegionError(f"regions: give a non-empty list of regions, like {REGIONS_EXAMPLE}")
    if len(value) > MAX_REGIONS:
        raise RegionError(
            f"regions: at most {MAX_REGIONS} regions (each is one more transformer pass a step), got "
            f"{len(value)}"
        )
    return [_region(i, item) for i, item in enumerate(value)]


def _region(i: int, item: Any) -> dict[str, Any]:
    where = f"region {i}"
    if not isinstance(item, dict) or "box" not in item or set(item) - {"box", "prompt", "phrase", "strength"}:
        raise RegionError(
            f"{where}: each region is an object with 'box', 'prompt' and optionally 'strength', like "
            f"{REGIONS_EXAMPLE}"
        )
    if "prompt" in item and "phrase" in item:
        raise RegionError(f"{where}: give 'prompt' or a layout's 'phrase', not both")
    prompt = item.get("prompt", item.get("phrase"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise RegionError(f"{where}: 'prompt' must be a non-empty string (what to draw in the box)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RegionError(f"{where}: 'prompt' is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, which JSON escapes can carry ("\ud800")
        raise RegionError(
            f"{where}: 'prompt' is not valid Unicode text (a lone surrogate at character {exc.start})"
        ) from None
    problem = box_problem(item["box"])
    if problem:
        raise RegionError(f"{where}: {problem}")
    strength = item.get("strength", 1.0)
    if (
        not isinstance(strength, int | float)
        or isinstance(strength, bool)
        or not math.isfinite(strength)
        or not 0.0 < strength <= MAX_STRENGTH
    ):
        raise RegionError(
            f"{where}: 'strength' must be a number above 0 and at most {MAX_STRENGTH:g} (how much the "
            f"region's prompt outweighs the whole prompt in its box; 1 shares equally), got {strength!r}"
        )
    return {"box": [float(v) for v in item["box"]], "prompt": prompt.strip(), "strength": float(strength)}


def read_regions_arg(text: str) -> list[dict[str, Any]]:
    """Regions from the command line: a path to a JSON file, or the JSON itself."""
    return parse_regions(json_arg_text(text, "--regions", REGIONS_EXAMPLE, RegionError))


def region_cover(regions: list[dict[str, Any]], grid_h: int, grid_w: int) -> torch.Tensor:
    """The share of each image token's cell that each region's box covers, ``[len(regions), grid_h *
    grid_w]`` in float64 (row-major tokens, as `pack_latents`)."""
    boxes = torch.tensor([[region["box"] for region in regions]], dtype=torch.float64)
    return box_coverage(boxes, grid_h, grid_w)[0].double()


def region_weights(regions: list[dict[str, Any]], grid_h: int, grid_w: int) -> torch.Tensor:
    """Each prompt's weight at each image token, ``[1 + len(regions), grid_h * grid_w]`` (row-major tokens,
    as `pack_latents`): row 0 the whole prompt's, then one row per region; every column sums to 1."""
    cover = region_cover(regions, grid_h, grid_w)  # [R, N]
    strength = torch.tensor([region["strength"] for region in regions], dtype=torch.float64)
    weights = torch.cat([torch.ones(1, grid_h * grid_w, dtype=torch.float64), cover * strength[:, None]])
    return (weights / weights.sum(0, keepdim=True)).float()
