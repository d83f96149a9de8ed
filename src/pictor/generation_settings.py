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


def default_tile_overlap(tile: int, factor: int) -> int:
    """A quarter of the tile (what diffusers and ComfyUI blend over), in whole `factor`s (the autoencoder's
    latent pixels, or a model's tokens)."""
    return tile // 4 // factor * factor


def resolve_tiling(factor: int, tile: int | None, overlap: int | None) -> tuple[int | None, int | None]:
    """A request's VAE tile and overlap with the default overlap filled in (both None without a tile);
    ValueError says what is wrong with them."""
    return _resolved(tiling_problem(factor, tile, overlap), factor, tile, overlap)


def tiling_problem(factor: int, tile: int | None, overlap: int | None) -> str | None:
    """What is wrong with a VAE tile size and overlap in image pixels (`pictor.models.autoencoder_tiling`)
    for an autoencoder with downsample `factor`; None when they are fine or not given."""
    return _tile_problem("VAE tile", factor, "the autoencoder's factor", tile, overlap)


def denoise_tiling_problem(patch: int, tile: int | None, overlap: int | None) -> str | None:
    """What is wrong with a denoise tile and overlap in image pixels (`pictor.denoise_tiles`) for a model
    whose tokens are `patch` pixels a side; None when they are fine or not given."""
    for name, value in (("denoise tile", tile), ("denoise tile overlap", overlap)):
        # a request from Python or JSON may hold 64.0 or True, which the checks below would take for 64 or 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{name} must be a whole number of pixels, got {value!r}"
    return _tile_problem("denoise tile", patch, "the model's token size", tile, overlap)


def resolve_denoise_tiling(
    patch: int, tile: int | None, overlap: int | None
) -> tuple[int | None, int | None]:
    """A request's denoise tile and overlap with the default overlap (a quarter of the tile) filled in,
    both None without a tile; ValueError says what is wrong with them."""
    return _resolved(denoise_tiling_problem(patch, tile, overlap), patch, tile, overlap)


def _tile_problem(what: str, unit: int, unit_is: str, tile: int | None, overlap: int | None) -> str | None:
    """The rules both kinds of tile follow, in pixels: a multiple of `unit` (`unit_is` says what it is), at
    least 4 units, an overlap of whole units up to half the tile, and no overlap without a tile."""
    if tile is None:
        return f"a {what} overlap needs a tile size: give the tile too" if overlap is not None else None
    least = 4 * unit
    if tile < least or tile % unit:
        near = max(least, tile // unit * unit)
        return (
            f"{what} {tile} must be a multiple of {unit} pixels ({unit_is}) and at least {least}; try {near}"
        )
    if overlap is not None and (overlap < 0 or overlap % unit or overlap > tile // 2):
        return (
            f"{what} overlap {overlap} must be a multiple of {unit} pixels from 0 to half the tile "
            f"({tile // 2 // unit * unit}); the default is {default_tile_overlap(tile, unit)}"
        )
    return None


def _resolved(
    problem: str | None, unit: int, tile: int | None, overlap: int | None
) -> tuple[int | None, int | None]:
    if problem:
        raise ValueError(problem)
    if tile is None:
        return None, None
    return tile, default_tile_overlap(tile, unit) if overlap is None else overlap
