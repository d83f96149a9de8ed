"""Live previews: what the images look like while the sampler runs (A1111's live previews, ComfyUI's latent
previews), made from the sampler's data prediction (the x0 it expects) at each step.

Two ways to turn those latents into a picture:
- ``full``: the autoencoder decodes them, as it decodes the final images (exact, and as costly as that);
- ``approx``: a linear map from each latent pixel to a colour (ComfyUI's "latent2rgb", A1111's "Approx
  cheap"), a picture at the latent grid's size for the cost of a matrix product. The map is fitted by least
  squares to this model's own autoencoder: to latents and their decoded pixels (averaged over each latent
  pixel's patch). Fixed factors for one autoencoder would not fit another (a pictor model trains its own),
  and probing a decoder with flat latents or encoding test patterns fits badly (on the shipped model: 31 and
  40 levels of 255 off, against 41 for a flat mean colour and 12 for a fit to its own pictures), so the
  pairs come from its real pictures: the first preview of a model decodes the prediction it
  shows, and every finished sampler run adds its final latents and pixels, which it decodes anyway.

Previews are a view, never part of an image: they are not recorded and change no pixel of a result; an
``approx`` map improves as a pipeline makes pictures, so two previews of one seed may differ in colour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pictor.edit_blending import to_pil
from pictor.models.autoencoder import AutoEncoder
from pictor.models.autoencoder_tiling import autoencoder_decode

__all__ = ["PREVIEW_METHODS", "LatentColours", "PreviewError", "PreviewFn", "Previews", "preview_pictures"]

PREVIEW_METHODS = ("approx", "full")
# A preview is for looking at while waiting, so `full` pictures are shrunk to this longest side: a
# megapixel decode would cost far more to encode and send every step than it shows.
MAX_PREVIEW_SIDE = 512
# Ridge term (times the pairs' count) of the colour fit: keeps it solvable while the pairs hardly vary
# (an early, blurry prediction) without pulling a well-posed fit visibly.
_RIDGE = 1e-4

# (pictures of the sampler run's images, index of the run's first image in its request) -> None; raising
# from it stops the run as raising from a progress callback does.
PreviewFn = Callable[[list[Image.Image], int], None]


class PreviewError(ValueError):
    """Preview settings that cannot be used; the message says what to give."""


@dataclass(frozen=True)
class Previews:
    """What a caller of `Pipeline.generate` / `edit` asks for: `on_frame` gets the pictures of a sampler
    run's images every `every` steps (and at its last step), made by `method` (one of PREVIEW_METHODS)."""

    on_frame: PreviewFn
    method: str = "approx"
    every: int = 1
    # The request's index of the first image of the sampler run being shown: set by the pipeline per run.
    first_index: int = 0

    def __post_init__(self) -> None:
        if self.method not in PREVIEW_METHODS:
            raise PreviewError(f"preview method '{self.method}' is not one of {', '.join(PREVIEW_METHODS)}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise PreviewError(
                f"previews every {self.every!r} steps: give a whole number of steps, 1 or more"
            )


class LatentColours:
    """The least-squares linear map latent pixel -> RGB of one autoencoder, from the pairs it was given
    (the normal equations are summed, in float64, so every pair counts and the fit only grows firmer)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self._gram = torch.zeros(channels + 1, channels + 1, dtype=torch.float64)
        self._cross = torch.zeros(channels + 1, 3, dtype=torch.float64)
        self._pairs = 0
        self._map: Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self._pairs > 0

    def add(self, latents: Tensor, pixels: Tensor, factor: int) -> None:
        """Pairs from latents [B, C, h, w] and their decoded pixels [B, 3, h * factor, w * factor]."""
        z = _rows(latents)
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)  # the constant term's column
        rgb = _rows(F.avg_pool2d(pixels.float(), factor))
        if len(z) != len(rgb):
            raise ValueError(f"latents give {len(z)} pixels, their pictures {len(rgb)}: not the same grid")
        finite = torch.isfinite(z).all(dim=1) & torch.isfinite(rgb).all(dim=1)  # one broken run spoils no fit
        z, rgb = z[finite], rgb[finite]
        if not len(z):
            return
        self._gram += z.T @ z
        self._cross += z.T @ rgb
        self._pairs += len(z)
        self._map = None

    def apply(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> colours [B, 3, h, w] in [-1, 1]."""
        if self._map is None:
            if not self.fitted:
                raise RuntimeError("no latents and pixels were added: nothing to fit the colours to")
            ridge = _RIDGE * self._pairs * torch.eye(self.channels + 1, dtype=torch.float64)
            ridge[-1, -1] = 0.0  # the constant term is not pulled towards 0
            self._map = torch.linalg.solve(self._gram + ridge, self._cross).float()
        b, _, h, w = latents.shape
        ones = torch.ones(b, 1, h, w, dtype=torch.float32, device=latents.device)
        z = torch.cat([latents.float(), ones], dim=1)
        return torch.einsum("bchw,cd->bdhw", z, self._map.to(latents.device)).clamp(-1.0, 1.0)


def _rows(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B * h * w, C] float64 rows on the CPU (one per pixel)."""
    return x.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def preview_pictures(
    latents: Tensor,
    autoencoder: AutoEncoder,
    colours: LatentColours,
    method: str,
    vae_tile: int | None = None,
    vae_tile_overlap: int | None = None,
) -> list[Image.Image]:
    """The pictures of latents [B, C, h, w] (the sampler's prediction, unpacked) by `method`; `colours` is
    the autoencoder's map, fitted here first if it has no pairs yet."""
    factor = autoencoder.params.downsample_factor
    if method == "full" or not colours.fitted:
        with torch.inference_mode():
            pixels = autoencoder_decode(autoencoder, latents, vae_tile, vae_tile_overlap)
        if not colours.fitted:
            colours.add(latents, pixels, factor)
        if method == "full" or not colours.fitted:  # nothing finite to fit yet: this frame's decode
            return [_shrunk(p) for p in to_pil(pixels)]
    return to_pil(colours.apply(latents))


def _shrunk(picture: Image.Image) -> Image.Image:
    side = max(picture.size)
    if side <= MAX_PREVIEW_SIDE:
        return picture
    w, h = (max(1, round(s * MAX_PREVIEW_SIDE / side)) for s in picture.size)
    return picture.resize((w, h), Image.Resampling.BILINEAR)
