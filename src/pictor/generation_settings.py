"""The checks a generation setting gets wherever it comes from: a request (pipeline.resolve_request) or a
bundle's stored defaults (bundle_defaults), so a default can never be one that every request would refuse."""

from __future__ import annotations

import math

from pictor.sampling import SAMPLERS, SCHEDULES

MAX_STEPS = 1000
# 4096 x 4096: twice FLUX.1's largest trained size in each direction. Beyond it the timestep shift of
# the flux schedule overflows, and no machine here would finish such an image.
MAX_PIXELS = 4096 * 4096


def settings_problem(
    pixel_multiple: int,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    schedule: str | None = None,
) -> str | None:
    """What is wrong with the given settings (None for one not given), in words that say what to change;
    None when all are fine. Width and height must fit the latent packing: multiples of `pixel_multiple`."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % pixel_multiple):
            lo = (value // pixel_multiple) * pixel_multiple
            hi = lo + pixel_multiple
            near = f"{lo} or {hi}" if lo > 0 else str(hi)
            return (
                f"{name} {value} does not fit the latent packing: it must be a positive multiple of "
                f"{pixel_multiple} (autoencoder factor {pixel_multiple // 2} x 2x2 patches); try {near}"
            )
    if width is not None and height is not None and width * height > MAX_PIXELS:
        return (
            f"size {width}x{height} is {width * height:,} pixels; the most pictor makes is {MAX_PIXELS:,} "
            "(e.g. 4096x4096)"
        )
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        return f"steps must be between 1 and {MAX_STEPS}, got {steps}"
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        return f"guidance must be a finite number >= 0, got {guidance}"
    if sampler is not None and sampler not in SAMPLERS:
        return f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}"
    if schedule is not None and schedule not in SCHEDULES:
        return f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}"
    return None
