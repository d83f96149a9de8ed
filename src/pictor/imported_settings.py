"""What reading another image's settings gives: `ImportedSettings` (`pictor generate` option values and
notices) and `SettingsImportError`, with `take_guidance_method`, the one path by which an image's guidance
method becomes those options.

Separate so that both readers build the same result without importing each other: `pictor.settings_import`
(a pictor record, A1111's `parameters` text) and `pictor.comfy_settings_import` (a ComfyUI graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pictor.guidance_methods import GuidanceMethod


class SettingsImportError(ValueError):
    """An image whose settings cannot be taken as asked; the message says what to give instead."""


@dataclass
class ImportedSettings:
    """`pictor generate` option values (argparse dests) and what could not be taken, in words."""

    values: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    # The upscale model the image's hires fix used: a file (a pictor record's) or only a name (A1111's),
    # which the command line must then give with --hires-upscaler.
    hires_upscaler_file: str | None = None
    hires_upscaler_name: str | None = None
    sampler_name: str | None = None  # the image's sampler when pictor has none of that name
    # The image's guidance method (`pictor.guidance_methods`), not plain CFG; `values` hold it as the
    # guidance-method options (GUIDANCE_DESTS), each of which fills the command line's where it has none.
    guidance_method: GuidanceMethod | None = None
    source: str = "pictor"  # what the settings were read from: pictor (its record), a1111 or comfyui


def take_guidance_method(method: GuidanceMethod, out: ImportedSettings) -> None:
    """A guidance method read from a record or A1111's text, as the request's and as `pictor generate`'s
    options (GUIDANCE_DESTS, each parameter the method reads): the one path both take. Plain CFG over every
    step is what runs without one: nothing is taken."""
    if method.is_default:
        return
    method = method.normalized()
    out.guidance_method = method
    v = out.values
    v["guidance_method"], v["guidance_rescale"] = method.method, method.rescale
    v["guidance_interval"] = [method.start, method.stop]
    if method.method == "apg":
        v["apg_eta"], v["apg_norm_threshold"] = method.eta, method.norm_threshold
        v["apg_momentum"] = method.momentum
    if method.method == "cfg-zero-star":
        v["zero_init_steps"] = method.zero_init_steps
