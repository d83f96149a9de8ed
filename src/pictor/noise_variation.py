"""Variation seeds and seed resizing (A1111's "Extra" seed options): an image's initial noise blended with a
second seed's, so a picture can be varied a little while keeping its composition, and noise drawn at another
size and centred, so a composition carries over to a slightly different size.

A1111's rules, on pictor's per-image noise (each image's latent noise [C, H, W] drawn from a CPU generator
seeded with its seed):
- with a variation strength s > 0, image i of a request keeps the request's seed and takes the variation seed
  v + i, so the images are variations of one picture; its noise is slerp(s, noise(seed), noise(v + i)),
  where A1111's slerp normalises along the rows' axis (dim 1 of [C, H, W]) and blends each (channel, column)
  vector along the great circle, so s = 0 is the seed's noise and s = 1 the variation seed's;
- with "seed resize from" (w, h), the noise (blended, if varied) is drawn at the latent size of w x h and
  centred on noise of the image's own size drawn from the seed: cropped where it is larger, framed where it
  is smaller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# (seeds, latent height, latent width) -> noise [B, C, h, w] on the CPU in float32
NoiseDraw = Callable[[list[int], int, int], Tensor]

# A1111's slerp falls back to a straight blend when the two noises point (almost) the same way.
_PARALLEL = 0.9995
# sin(omega) below this: a column's vectors are (anti)parallel and its slerp undefined (see `slerp`).
_DEGENERATE = 1e-6


def slerp(strength: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's slerp of two images' noise [B, C, H, W], along the rows' axis of each image's [C, H, W].

    Two guards A1111 lacks, which change nothing where its maths is defined: the cosine is clamped to
    [-1, 1] (rounding can leave it just outside, and acos would give NaN), and a column whose two vectors
    are (anti)parallel, where the slerp divides by sin(omega) = 0 (a noise one row high always is), is
    blended straight. A1111's own straight branch (the whole image nearly parallel) is written the
    right way round here: it is reached only by (nearly) equal noises, where both orders agree."""
    low_norm = low / torch.norm(low, dim=2, keepdim=True)
    high_norm = high / torch.norm(high, dim=2, keepdim=True)
    dot = (low_norm * high_norm).sum(2).clamp(-1.0, 1.0)  # [B, C, W]
    out = torch.empty_like(low)
    straight = low * (1.0 - strength) + high * strength
    for b in range(low.shape[0]):  # A1111 decides the straight blend per image, from its mean
        if dot[b].mean() > _PARALLEL:
            out[b] = straight[b]
            continue
        omega = torch.acos(dot[b])
        so = torch.sin(omega)
        degenerate = so < _DEGENERATE
        so = torch.where(degenerate, torch.ones_like(so), so)
        a = (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1)
        c = (torch.sin(strength * omega) / so).unsqueeze(1)
        out[b] = torch.where(degenerate.unsqueeze(1), straight[b], a * low[b] + c * high[b])
    return out


def varied_noise(
    draw: NoiseDraw,
    seeds: list[int],
    lat_h: int,
    lat_w: int,
    variation_seed: int | None = None,
    variation_strength: float | None = None,
    resize_from: tuple[int, int] | None = None,
) -> Tensor:
    """The initial noise of images `seeds` at latent size lat_h x lat_w: image j's seed's noise, blended
    with that of variation seed `variation_seed + j` when a strength is given, drawn at latent size
    `resize_from` (w, h: latent pixels) and centred when that is given. Without either, exactly
    `draw(seeds, lat_h, lat_w)`."""
    h, w = (resize_from[1], resize_from[0]) if resize_from else (lat_h, lat_w)
    noise = draw(seeds, h, w)
    if variation_strength:
        assert variation_seed is not None
        others = draw([variation_seed + j for j in range(len(seeds))], h, w)
        noise = slerp(variation_strength, noise, others)
    if (h, w) == (lat_h, lat_w):
        return noise
    framed = draw(seeds, lat_h, lat_w)
    # A1111's placement: the smaller of the two sizes' overlap, centred in both (rounding down)
    dx, dy = (lat_w - w) // 2, (lat_h - h) // 2
    cw, ch = (w if dx >= 0 else w + 2 * dx), (h if dy >= 0 else h + 2 * dy)
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    framed[:, :, ty : ty + ch, tx : tx + cw] = noise[:, :, sy : sy + ch, sx : sx + cw]
    return framed


def variation_problem(
    num_images: int,
    variation_seed: int | None,
    variation_strength: float | None,
    resize_from: tuple[int, int] | None,
    multiple: int,
    max_pixels: int,
    max_seed: int,
) -> str | None:
    """What is wrong with a request's variation settings, in words (None: nothing). `multiple`: what image
    sides are multiples of (the model's pixels per token side), which a seed resize's sides must be too."""
    if variation_strength is not None:
        if isinstance(variation_strength, bool) or not isinstance(variation_strength, (int, float)):
            return f"variation strength must be a number from 0 to 1, got {variation_strength!r}"
        if not 0.0 <= variation_strength <= 1.0:  # NaN fails this too
            return (
                "variation strength must be from 0 (off) to 1 (the variation seed's noise), got "
                f"{variation_strength}"
            )
    if variation_seed is not None:
        if variation_strength is None:
            return (
                "a variation seed changes nothing without a variation strength: give one from 0 to 1 "
                "(--variation-strength; 0.1-0.3 varies a picture a little)"
            )
        if isinstance(variation_seed, bool) or not isinstance(variation_seed, int):
            return f"variation seed must be an integer, got {variation_seed!r}"
        last = max_seed - num_images + 1  # image i takes variation seed + i
        if not 0 <= variation_seed <= last:
            return f"variation seed must be between 0 and {last}, got {variation_seed}"
    if resize_from is not None:
        w, h = resize_from
        if any(isinstance(v, bool) or not isinstance(v, int) or v < multiple or v % multiple for v in (w, h)):
            return (
                f"seed resize from must be a size WxH whose sides are positive multiples of {multiple}, "
                f"as an image's are, got {w}x{h}"
            )
        if w * h > max_pixels:
            return f"seed resize from {w}x{h} is more than {max_pixels} pixels; give a smaller size"
    return None


def variation_fields(r: Any, index: int) -> dict[str, Any]:
    """A record's variation fields for image `index` of a sampler run of request `r` (a GenerationRequest
    whose variation seed is its run's first image's): none when the request has none."""
    out: dict[str, Any] = {}
    if r.variation_strength:
        out |= {"variation_seed": r.variation_seed + index, "variation_strength": r.variation_strength}
    if r.seed_resize_from:
        out["seed_resize_from"] = list(r.seed_resize_from)
    return out
