"""FLUX.1 Kontext: editing by instruction with a context image that the transformer reads in context.

The convention is FLUX.1 Kontext's (black-forest-labs/flux `sampling.prepare_kontext` and `denoise` with
`img_cond_seq`; diffusers' `FluxKontextPipeline`):

- the context picture is resized to a preferred resolution (the one whose aspect ratio is closest to the
  picture's, from the list Kontext was trained on), encoded by the autoencoder (its mean: no sampling) and
  packed into 2x2 tokens like the noisy latents;
- its tokens go AFTER the noisy image tokens in the transformer's image sequence, with position ids
  (1, row, column): the generated image's first coordinate is 0, so RoPE tells the two pictures apart
  while their (row, column) grids overlap;
- no noise is added to them, they share the timestep, and the transformer's output is cut back to the
  generated tokens.

A model says it was trained for this with ``"kontext": true`` in its bundle config (`pictor convert flux
--kontext`, preset ``flux-kontext-dev``); any other model refuses a context image, since one not trained
on it reads the extra tokens as noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from pictor.editing import EditError, ImageSource, image_info, rgb_picture
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.models.autoencoder import AutoEncoder
from pictor.models.autoencoder_tiling import autoencoder_encode
from pictor.models.flux import make_img_ids, pack_latents
from pictor.models.offload import bring_in

__all__ = [
    "KONTEXT_RESOLUTIONS",
    "ContextImageError",
    "ContextTokens",
    "context_fields",
    "context_pixels",
    "context_problem",
    "context_size",
    "context_tokens",
    "resolve_context",
]

# (width, height) pairs FLUX.1 Kontext was trained on, all near 1024**2 pixels (BFL's
# PREFERED_KONTEXT_RESOLUTIONS, diffusers' PREFERRED_KONTEXT_RESOLUTIONS).
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
KONTEXT_AREA = 1024 * 1024
# The first position-id coordinate of the context tokens (the generated image's is 0).
CONTEXT_INDEX = 1


class ContextImageError(GenerationError):
    """A context image that cannot be used; the message says what to change."""


def context_problem(model_name: str, kontext: bool, r: GenerationRequest) -> str | None:
    """Why a request with a context image cannot run on this model, or None."""
    if r.context_image is None:
        return None
    if not kontext:
        return (
            f"model '{model_name}' is not a FLUX.1 Kontext model, so it cannot read a context image (a "
            "model not trained on one takes its tokens for noise): drop the context image, or use a Kontext "
            "model (import flux1-kontext-dev.safetensors with `pictor convert flux --kontext ...`)"
        )
    if isinstance(r.context_image, list | tuple) and len(r.context_image) != 1:
        return (
            f"{len(r.context_image)} context images were given; FLUX.1 Kontext [dev] is trained on one: "
            "give one (combine several pictures side by side into one image first)"
        )
    if r.layout:
        # The layout adapter's residuals are one per generated token; it never saw context tokens.
        return "a layout cannot be combined with a context image; drop one of them"
    if r.hires_scale is not None:
        # The second pass would redraw an upscaled picture against a context of another size: untested.
        return "the hires fix cannot be combined with a context image; drop the hires scale (--hires)"
    return None


def resolve_context(
    r: GenerationRequest, model_name: str, kontext: bool, area: int, multiple: int
) -> GenerationRequest:
    """The request with its context image (if any) checked and fitted (`context_pixels`); a request that
    gives neither width nor height takes the fitted context's size, as BFL's Kontext sampling does."""
    problem = context_problem(model_name, kontext, r)
    if problem:
        raise ContextImageError(problem)
    if r.context_image is None:
        return r
    source = r.context_image
    if isinstance(source, list | tuple):  # a list of one, as `--context` may collect
        source = source[0]
    pixels = context_pixels(source, area, multiple)
    if r.width is None and r.height is None:
        return replace(r, context_image=pixels, width=int(pixels.shape[1]), height=int(pixels.shape[0]))
    return replace(r, context_image=pixels)


def context_size(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """The (width, height) a width x height context picture is resized to: the Kontext resolution whose
    aspect ratio is closest to the picture's, scaled from 1024**2 pixels to the model's default `area`,
    rounded down to a multiple of `multiple` pixels (at least one). For a 1024x1024-default model this is
    exactly diffusers' `_auto_resize` and BFL's choice."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    scale = math.sqrt(area / KONTEXT_AREA)
    w, h = round(w * scale), round(h * scale)
    return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)


def context_pixels(source: ImageSource | np.ndarray, area: int, multiple: int) -> np.ndarray:
    """The context as uint8 [H, W, 3] at its `context_size`: any mode made RGB (an alpha channel is dropped,
    as BFL's `convert("RGB")` does), resized with Lanczos (aspect ratio as close as the list allows, no
    crop), as diffusers and BFL prepare it. Idempotent: fitted pixels come back unchanged."""
    try:
        im = Image.fromarray(rgb_picture(source, "context image"))
    except EditError as exc:
        raise ContextImageError(str(exc)) from exc
    if min(im.size) < 8:
        raise ContextImageError(f"context image is {im.size[0]}x{im.size[1]} pixels; give one at least 8x8")
    size = context_size(im.size[0], im.size[1], area, multiple)
    # Pillow returns a copy when the size is already right, so resolving twice changes nothing.
    return np.asarray(im.resize(size, Image.Resampling.LANCZOS), dtype=np.uint8).copy()


def context_fields(pixels: np.ndarray) -> dict[str, Any]:
    """What a context image adds to a record: the fitted pixels' SHA-256 and size (not the picture)."""
    return {"context_image": image_info(pixels)}


@dataclass
class ContextTokens:
    """A context picture as the transformer reads it: tokens [1, M, in_channels] and ids [1, M, 3]."""

    tokens: torch.Tensor
    ids: torch.Tensor

    def extend(self, x: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy tokens x [B, N, C] and their ids [B, N, 3] with the context appended after them:
        ([B, N + M, C], [B, N + M, 3]). The context is the same for every row (both CFG halves too)."""
        tokens = self.tokens.expand(x.shape[0], -1, -1)
        ids = self.ids.expand(img_ids.shape[0], -1, -1)
        return torch.cat([x, tokens], dim=1), torch.cat([img_ids, ids], dim=1)


@torch.inference_mode()
def context_tokens(
    autoencoder: AutoEncoder,
    pixels: np.ndarray,
    dtype: torch.dtype,
    tile: int | None = None,
    overlap: int | None = None,
) -> ContextTokens:
    """Encode fitted context pixels (uint8 [H, W, 3]) once per sampler run; in tiles of `tile` image
    pixels when the run decodes in tiles (`--vae-tile`), which bounds this encode's memory too."""
    # the autoencoder's run device (under CPU offload: brought in, not CPU memory where it waits)
    device, dtype_in = bring_in(autoencoder), next(autoencoder.parameters()).dtype
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    z = autoencoder_encode(autoencoder, x.to(device, dtype_in), tile, overlap)  # [1, C, h, w]
    ids = make_img_ids(1, z.shape[2], z.shape[3], device=z.device)  # beside the tokens, wherever they are
    ids[..., 0] = CONTEXT_INDEX
    return ContextTokens(tokens=pack_latents(z).to(dtype), ids=ids.to(dtype))
