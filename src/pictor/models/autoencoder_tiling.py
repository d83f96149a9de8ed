"""Tiled autoencoder passes: decode (or encode) a large latent (or image) in overlapping tiles and blend
them, so that peak memory follows the tile size instead of the image size.

A whole decode holds several activations of ``128 x H x W`` floats per image at its last stage (FLUX.1's
autoencoder: ~2 GB each for one 2048x2048 image, in fp32), plus conv workspaces. Tiles bound that to one
tile's worth. Linear ramps across each overlap hide the seams (what diffusers' ``enable_tiling`` and
ComfyUI's tiled VAE nodes do). The price: each tile is normalized by its own GroupNorm statistics, so a
tile of plain background is normalized differently than the whole image would be, and colours and
contrast can shift from tile to tile; larger tiles shift less (numbers in benchmarks/results/vae_tiling.json).
A tile as large as the input gives exactly the whole pass.

Sizes here are in latent pixels: a decode tile of ``t`` latent pixels is ``t * factor`` image pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pictor.models.autoencoder import AutoEncoder

TileFn = Callable[[Tensor], Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """How to cover ``[0, size)`` with tiles of at most ``tile``: (their offsets, their common length).

    As few tiles as keep every overlap at least ``overlap``, each only as long as that needs (so no more
    work than necessary: 64 in tiles of at most 32 overlapping by 8 is three tiles of 27, not of 32),
    evenly spread, the first at 0 and the last ending at ``size``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be >= 0 and smaller than the tile ({tile}), got {overlap}")
    if size <= tile:
        return [0], size
    n = -(-(size - overlap) // (tile - overlap))  # ceil: the fewest tiles whose overlaps are all >= overlap
    length = -(-(size + (n - 1) * overlap) // n)  # ceil: n tiles of this length overlap by >= overlap
    # Floors of an even spread: consecutive offsets differ by at most ceil((size - length) / (n - 1)),
    # which is <= length - overlap, so no overlap falls short.
    return [i * (size - length) // (n - 1) for i in range(n)], length


def _ramps(starts: list[int], tile: int, size: int, scale: int, dtype: torch.dtype) -> list[Tensor]:
    """Per tile, its blend weights along one axis in output pixels: rising linearly across the overlap
    with the tile before it, falling across the overlap with the tile after it, 1 elsewhere (and at the
    edges of the whole input, where there is nothing to blend with). Never 0, so every pixel has weight."""
    out = []
    for i, s in enumerate(starts):
        length = min(tile, size - s) * scale
        w = torch.ones(length, dtype=dtype)
        if i > 0:
            rise = (starts[i - 1] + tile - s) * scale
            w[:rise] *= (torch.arange(rise, dtype=dtype) + 0.5) / rise
        if i + 1 < len(starts):
            fall = (s + tile - starts[i + 1]) * scale
            w[length - fall :] *= (torch.arange(fall, 0, -1, dtype=dtype) - 0.5) / fall
        out.append(w)
    return out


def _tiled(
    fn: TileFn,
    x: Tensor,
    tile: int,
    overlap: int,
    unit_in: int,
    unit_out: int,
    on_tile: Callable[[], None] | None,
) -> Tensor:
    """Apply ``fn`` tile by tile, one tile alive at a time, and blend. Tiles, offsets and overlaps are
    counted in units of the latent grid: one unit is ``unit_in`` input pixels and ``unit_out`` output
    pixels (decode 1 -> factor, encode factor -> 1), so every tile boundary falls on the latent grid and
    the tiles' outputs line up exactly."""
    b, _, h_in, w_in = x.shape
    h, w = h_in // unit_in, w_in // unit_in
    ys, th = tile_starts(h, tile, overlap)
    xs, tw = tile_starts(w, tile, overlap)
    if len(ys) == len(xs) == 1:
        return fn(x)
    wy = _ramps(ys, th, h, unit_out, torch.float32)
    wx = _ramps(xs, tw, w, unit_out, torch.float32)
    out: Tensor | None = None
    weight = torch.zeros(1, 1, h * unit_out, w * unit_out, dtype=torch.float32, device=x.device)
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            piece = x[..., y0 * unit_in : (y0 + th) * unit_in, x0 * unit_in : (x0 + tw) * unit_in]
            result = fn(piece).float()  # [B, C_out, th * unit_out, tw * unit_out]
            if out is None:
                out = torch.zeros(b, result.shape[1], h * unit_out, w * unit_out, device=x.device)
            blend = (wy[iy][:, None] * wx[ix][None, :]).to(x.device)
            ys_out = slice(y0 * unit_out, y0 * unit_out + result.shape[-2])
            xs_out = slice(x0 * unit_out, x0 * unit_out + result.shape[-1])
            out[..., ys_out, xs_out] += result * blend
            weight[..., ys_out, xs_out] += blend
            if on_tile is not None:
                on_tile()
    assert out is not None
    return (out / weight).to(x.dtype)


def tiled_decode(
    decode: TileFn,
    z: Tensor,
    tile: int,
    overlap: int,
    factor: int,
    on_tile: Callable[[], None] | None = None,
) -> Tensor:
    """Latents [B, C, h, w] -> images [B, 3, h * factor, w * factor], decoded in tiles of at most ``tile``
    latent pixels with neighbours overlapping by at least ``overlap``. ``on_tile`` runs after each tile (a
    progress callback that may raise to stop)."""
    return _tiled(decode, z, tile, overlap, 1, factor, on_tile)


def tiled_encode(
    encode: TileFn,
    x: Tensor,
    tile: int,
    overlap: int,
    factor: int,
    on_tile: Callable[[], None] | None = None,
) -> Tensor:
    """Images [B, C, H, W] (H, W multiples of ``factor``) -> latents [B, c, H / factor, W / factor],
    encoded in tiles of at most ``tile`` latent pixels (``tile * factor`` image pixels)."""
    return _tiled(encode, x, tile, overlap, factor, 1, on_tile)


def autoencoder_decode(
    ae: AutoEncoder,
    z: Tensor,
    tile: int | None,
    overlap: int | None,
    on_tile: Callable[[], None] | None = None,
) -> Tensor:
    """``ae.decode(z)``, or the same in tiles of ``tile`` image pixels overlapping by ``overlap`` (both
    multiples of the autoencoder's factor) when a tile is given."""
    if tile is None:
        return ae.decode(z)
    f = ae.params.downsample_factor
    return tiled_decode(ae.decode, z, tile // f, (overlap or 0) // f, f, on_tile)


def autoencoder_encode(
    ae: AutoEncoder,
    x: Tensor,
    tile: int | None,
    overlap: int | None,
    on_tile: Callable[[], None] | None = None,
) -> Tensor:
    """``ae.encode(x)`` (the mean, scaled), or the same in tiles of ``tile`` image pixels."""
    if tile is None:
        return ae.encode(x)
    f = ae.params.downsample_factor
    return tiled_encode(ae.encode, x, tile // f, (overlap or 0) // f, f, on_tile)
