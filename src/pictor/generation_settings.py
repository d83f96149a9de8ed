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
    """A quarter of the tile (what diffusers and ComfyUI blend over), on the autoencoder's latent grid."""
    return tile // 4 // factor * factor


def resolve_tiling(factor: int, tile: int | None, overlap: int | None) -> tuple[int | None, int | None]:
    """A request's VAE tile and overlap with the default overlap filled in (both None without a tile);
    ValueError says what is wrong with them."""
    problem = tiling_problem(factor, tile, overlap)
    if problem:
        raise ValueError(problem)
    if tile is None:
        return None, None
    return tile, default_tile_overlap(tile, factor) if overlap is None else overlap


def tiling_problem(factor: int, tile: int | None, overlap: int | None) -> str | None:
    """What is wrong with a VAE tile size and overlap in image pixels (`pictor.models.autoencoder_tiling`)
    for an autoencoder with downsample `factor`; None when they are fine or not given."""
    if tile is None:
        return "a VAE tile overlap needs a tile size: give the tile too" if overlap is not None else None
    least = 4 * factor
    if tile < least or tile % factor:
        near = max(least, tile // factor * factor)
        return (
            f"VAE tile {tile} must be a multiple of {factor} pixels (the autoencoder's factor) and at least "
            f"{least}; try {near}"
        )
    if overlap is not None and (overlap < 0 or overlap % factor or overlap > tile // 2):
        return (
            f"VAE tile overlap {overlap} must be a multiple of {factor} pixels from 0 to half the tile "
            f"({tile // 2 // factor * factor}); the default is {default_tile_overlap(tile, factor)}"
        )
    return None


def denoise_tiling_problem(patch: int, tile: int | None, overlap: int | None) -> str | None:
    """What is wrong with a denoise tile and overlap in image pixels (`pictor.denoise_tiles`) for a model
    whose tokens are `patch` pixels a side; None when they are fine or not given."""
    if tile is None:
        return "a denoise tile overlap needs a tile size: give the tile too" if overlap is not None else None
    least = 4 * patch
    for name, value in (("denoise tile", tile), ("denoise tile overlap", overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{name} must be a whole number of pixels, got {value!r}"
    if tile < least or tile % patch:
        whole = isinstance(tile, int) and not isinstance(tile, bool)
        near = max(least, tile // patch * patch) if whole else least
        return (
            f"denoise tile {tile} must be a multiple of {patch} pixels (the model's token size) and at least "
            f"{least}; try {near}"
        )
    if overlap is not None and (
        isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap % patch
        or overlap > tile // 2
    ):  # fmt: skip
        return (
            f"denoise tile overlap {overlap} must be a multiple of {patch} pixels from 0 to half the tile "
            f"({tile // 2 // patch * patch}); the default is {default_tile_overlap(tile, patch)}"
        )
    return None


def resolve_denoise_tiling(
    patch: int, tile: int | None, overlap: int | None
) -> tuple[int | None, int | None]:
    """A request's denoise tile and overlap with the default overlap (a quarter of the tile) filled in,
    both None without a tile; ValueError says what is wrong with them."""
    problem = denoise_tiling_problem(patch, tile, overlap)
    if problem:
        raise ValueError(problem)
    if tile is None:
        return None, None
    return tile, default_tile_overlap(tile, patch) if overlap is None else overlap
