"""The values of an X/Y/Z plot's axes (`pictor.grid_axes`): each setting's parser, from the text typed on
the command line to the setting's value, checked by the same rules the pipeline applies to a request, so a
bad value fails when the grid is planned, naming the value, not in the middle of a grid."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from pictor.generation_request import MAX_SEED
from pictor.generation_settings import MAX_STEPS, settings_problem
from pictor.guidance_methods import METHODS
from pictor.hires import UPSCALER, hires_problem
from pictor.models.block_cache import cache_threshold_problem


class GridError(ValueError):
    """Axes or a grid that cannot be made; the message says what to change."""


_SIZE_RE = re.compile(r"^(\d+)[xX](\d+)$")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise GridError(f"'{text}' is not a whole number") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GridError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise GridError(f"'{text}' is not a finite number")
    return value


def _checked(problem: str | None) -> None:
    if problem:
        raise GridError(problem)


def parse_steps(text: str) -> int:
    value = _whole(text)
    # Sizes are the model's to check (its latent packing); these settings' rules hold for every model.
    _checked(settings_problem(pixel_multiple=1, steps=value))
    return value


def parse_guidance(text: str) -> float:
    value = _number(text)
    _checked(settings_problem(pixel_multiple=1, guidance=value))
    return value


def parse_sampler(text: str) -> str:
    _checked(settings_problem(pixel_multiple=1, sampler=text))
    return text


def parse_schedule(text: str) -> str:
    _checked(settings_problem(pixel_multiple=1, schedule=text))
    return text


def parse_seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= MAX_SEED:
        raise GridError(f"seed must be between 0 and {MAX_SEED}, got {value}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    m = _SIZE_RE.match(text)
    if not m:
        raise GridError(f"size must be WIDTHxHEIGHT, e.g. 64x64; got '{text}'")
    return int(m.group(1)), int(m.group(2))


def parse_lora(text: str) -> float:
    return _number(text)


def parse_cache_threshold(text: str) -> float:
    value = _number(text)
    _checked(cache_threshold_problem(value))
    return value


def bounded(low: float, high: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _number(text)
        if not low <= value <= high:
            raise GridError(f"{what} must be from {low:g} to {high:g}, got {value:g}")
        return value

    return parse


def parse_text(text: str) -> str:
    return text


def parse_guidance_method(text: str) -> str:
    """A guidance method's name (`pictor.guidance_methods`)."""
    if text not in METHODS:
        raise GridError(f"guidance-method is one of {', '.join(METHODS)}, got {text!r}")
    return text


# How a request's regions run (`pictor.regional_prompts`, `pictor.regional_attention`).
REGIONS_MODES = ("blend", "attention")


def parse_regions_mode(text: str) -> str:
    if text not in REGIONS_MODES:
        raise GridError(
            f"regions-mode is blend (a pass per region) or attention (one pass, masked), got {text!r}"
        )
    return text


# The hires axis's value for a cell without the hires fix (one pass; its request's hires_scale is None).
HIRES_OFF = "off"
# A valid scale to check a hires strength or steps value by `hires_problem`, the pipeline's own rules, alone.
_SOME_SCALE = 2.0


def parse_hires(text: str) -> float | None:
    if text.lower() == HIRES_OFF:
        return None
    value = _number(text)
    problem = hires_problem(value, None, None, MAX_STEPS)
    if problem:
        raise GridError(f"{problem} (or {HIRES_OFF}: no hires fix)")
    return value


def parse_hires_strength(text: str) -> float:
    value = _number(text)
    _checked(hires_problem(_SOME_SCALE, value, None, MAX_STEPS))
    return value


def parse_hires_steps(text: str) -> int:
    value = _whole(text)
    _checked(hires_problem(_SOME_SCALE, None, value, MAX_STEPS))
    return value


def parse_hires_upscaler(text: str) -> str:
    """Lanczos ("lanczos") or the absolute path of an upscale model file, read when the grid runs."""
    if text.lower() == UPSCALER:
        return UPSCALER
    path = Path(text)
    if not path.is_file():
        raise GridError(
            f"'{text}' is not a file; give an upscale model (ESRGAN, Real-ESRGAN, ... as .safetensors) or "
            f"{UPSCALER}"
        )
    # Resolved as `Pipeline.set_upscaler` resolves it, so the stem is the name the pipeline gives the model.
    path = path.resolve()
    if path.stem.lower() == UPSCALER:
        raise GridError(f"'{text}': a model named '{UPSCALER}' would be taken for Lanczos; rename it")
    return str(path)


def upscaler_name(value: str) -> str | None:
    """A hires-upscaler value as a request names it: None for Lanczos, else the model file's stem."""
    return None if value == UPSCALER else Path(value).stem
