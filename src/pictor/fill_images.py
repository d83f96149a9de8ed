"""FLUX.1 Fill [dev]: an inpainting transformer that reads the masked picture and the mask beside the noise.

Its ``img_in`` takes each packed noisy token (4 x C latent channels, 64 for FLUX.1) concatenated with the
packed latents of the picture with the repainted region blanked (another 4 x C) and the mask at pixel
resolution folded into the token (each latent pixel's f x f mask pixels, 2 x 2 of them: 4 f^2 = 256 for
FLUX.1's factor 8): 384 input channels for 64 output ones. So a Fill model is known by its shapes alone,
``in_channels == 2 * out_channels + 4 f^2``, and needs no flag in its config.

The conditioning follows diffusers' ``FluxFillPipeline``: the picture in [-1, 1] times (1 - mask) is encoded
(pictor takes the autoencoder's mean where diffusers draws a sample of it: their difference is the encoder's
tiny posterior noise), the mask goes in as 0/1 at its full resolution. The model paints the region itself,
so no latent blending is needed; pictor still composites the kept pixels back after decoding, as for every
inpainting (`pictor.picture_runs`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pictor.generation_request import GenerationError
from pictor.models.autoencoder import AutoEncoder
from pictor.models.autoencoder_tiling import autoencoder_encode
from pictor.models.flux import FluxParams, pack_latents


class FillError(GenerationError):
    """A request a Fill model cannot draw (no mask, or conditioning it does not take)."""


def is_fill_model(params: FluxParams, ae_factor: int) -> bool:
    """Whether the transformer's input is FLUX.1 Fill's: noise, masked-picture latents and the folded mask."""
    return params.in_channels == 2 * params.out_channels + 4 * ae_factor * ae_factor


def fold_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """A bool mask [H, W] (True = repaint) as FLUX.1 Fill reads it: each latent pixel's factor x factor
    mask pixels as channels, [1, factor^2, H / factor, W / factor] of 0/1 (diffusers' layout)."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    m = torch.from_numpy(mask.astype(np.float32)).reshape(1, h, factor, w, factor)
    return m.permute(0, 2, 4, 1, 3).reshape(1, factor * factor, h, w)


@torch.inference_mode()
def fill_conditioning(
    autoencoder: AutoEncoder,
    canvas: np.ndarray,
    mask: np.ndarray,
    dtype: torch.dtype,
    tile: int | None = None,
    overlap: int | None = None,
) -> torch.Tensor:
    """The tokens a Fill model reads beside the noise: packed latents of the canvas (uint8 [H, W, 3]) with
    the mask's region blanked, then the packed folded mask: [1, N, 4 C + 4 f^2]."""
    param = next(autoencoder.parameters())
    pixels = torch.from_numpy(canvas).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    keep = torch.from_numpy(~mask)[None, None].float()
    z = autoencoder_encode(autoencoder, (pixels * keep).to(param.device, param.dtype), tile, overlap)
    folded = fold_mask(mask, autoencoder.params.downsample_factor).to(param.device, param.dtype)
    return torch.cat([pack_latents(z), pack_latents(folded)], dim=-1).to(dtype)


def check_fill_request(r: Any, has_mask: bool) -> None:
    """Refuse what a Fill model cannot do: draw without a mask, or take other conditioning with it."""
    if not has_mask:
        raise FillError(
            "this is a FLUX.1 Fill model: it repaints the masked part of a picture; give a picture and a "
            "mask (`pictor edit --source IMG --mask MASK`, or the server's edits with a mask)"
        )
    for field, what in (
        ("layout", "a layout"),
        ("reference", "a reference picture"),
        ("context_image", "a context image"),
    ):
        if getattr(r, field, None) is not None:
            raise FillError(f"a FLUX.1 Fill model does not take {what}; leave it out")
    if getattr(r, "hires_scale", None):
        raise FillError("the hires fix is not offered for FLUX.1 Fill models; leave --hires out")
