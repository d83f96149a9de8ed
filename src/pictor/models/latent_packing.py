"""FLUX's latent packing: 2x2 patches of a ``[B, C, H, W]`` latent as tokens, and the tokens' position ids.

What the transformer (:class:`pictor.models.flux.Flux`) reads and writes is packed tokens ``[B, N, 4C]``
with ids ``[B, N, 3]``; these turn an autoencoder's latent into them and back (FLUX.1's ``prepare`` and
``unpack`` in ``sampling.py``).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from pictor.models.input_checks import shape_of

__all__ = ["make_img_ids", "make_txt_ids", "pack_latents", "unpack_latents"]


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(
            f"latent height and width must be even for FLUX's 2x2 packing, got {height}x{width} "
            "(choose an image size that is a multiple of 2 * the autoencoder's downsampling factor)"
        )


def pack_latents(z: Tensor) -> Tensor:
    """2x2 patchify: ``z [B, C, H, W]`` -> tokens ``[B, (H/2)(W/2), 4C]`` (row-major over patches)."""
    if z.ndim != 4:
        raise ValueError(f"pack_latents: z must be [B, C, H, W], got {shape_of(z)}")
    _check_even(z.shape[2], z.shape[3])
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`; ``height``/``width`` are the latent (not packed) size."""
    _check_even(height, width)
    n = (height // 2) * (width // 2)
    if tokens.ndim != 3 or tokens.shape[1] != n or tokens.shape[2] % 4:
        raise ValueError(
            f"unpack_latents: tokens must be [B, {n}, 4C] for a {height}x{width} latent, "
            f"got {shape_of(tokens)}"
        )
    return rearrange(
        tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2
    )


def make_img_ids(batch: int, lat_h: int, lat_w: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``[B, (H/2)(W/2), 3]`` for packed tokens: axis 0 = 0, axis 1 = row, axis 2 = column."""
    _check_even(lat_h, lat_w)
    h, w = lat_h // 2, lat_w // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).repeat(batch, 1, 1)


def make_txt_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Text tokens all sit at position 0 on every axis (FLUX.1): ``zeros [B, L, 3]``."""
    return torch.zeros(batch, length, 3, device=device)
