"""Reference-adapter files and reference images: saving and loading adapters (no pickles), and turning a
reference picture into what `pictor.models.reference.ReferenceAdapter` adds to a prompt.

An adapter file is a ``.safetensors`` of adapter weights whose header names its params and the model it
was trained on, so a mismatched pair is refused with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from pictor.adapter_files import AdapterKind
from pictor.editing import EditError, ImageSource, load_image
from pictor.models.autoencoder import AutoEncoder
from pictor.models.flux import FluxParams, pack_latents
from pictor.models.reference import ReferenceAdapter, ReferenceConditioning, ReferenceParams

__all__ = [
    "REFERENCE_FILE",
    "ReferenceImageError",
    "load_reference_adapter",
    "open_reference_adapter",
    "reference_context",
    "reference_params_for",
    "reference_pixels",
    "save_reference_adapter",
]

REFERENCE_FILE = "reference.safetensors"


class ReferenceImageError(ValueError):
    """A reference image or adapter that cannot be used; the message says what to change."""


def reference_params_for(model: FluxParams, num_tokens: int) -> ReferenceParams:
    """An adapter for this transformer and a text encoder that pads prompts to `num_tokens` tokens."""
    return ReferenceParams(
        latent_dim=model.in_channels,
        context_dim=model.context_in_dim,
        pooled_dim=model.vec_in_dim,
        num_tokens=num_tokens,
    )


def reference_pixels(source: ImageSource | np.ndarray, width: int, height: int) -> np.ndarray:
    """The reference as uint8 [height, width, 3]: any mode made RGB (transparency on white), scaled to
    cover the canvas and centre-cropped, as training saw it (reference and image the same size)."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ReferenceImageError(
                f"a reference array must be uint8 [H, W, 3], got {source.dtype} {list(source.shape)}"
            )
        im = Image.fromarray(source)
    else:
        try:
            im = load_image(source, "reference image")
        except EditError as exc:
            raise ReferenceImageError(str(exc)) from exc
    if min(im.size) < 8:
        raise ReferenceImageError(
            f"reference image is {im.size[0]}x{im.size[1]} pixels; give one at least 8x8"
        )
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(flat, im)
    im = ImageOps.fit(im.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8).copy()


@torch.inference_mode()
def reference_context(
    adapter: ReferenceAdapter, autoencoder: AutoEncoder, pixels: np.ndarray, dtype: torch.dtype
) -> ReferenceConditioning:
    """What a reference (uint8 [H, W, 3]) adds to the prompt's tokens [1, num_tokens, context_dim] and to
    its pooled vector [1, pooled_dim]."""
    device = next(adapter.parameters()).device
    ae_dtype = next(autoencoder.parameters()).dtype
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    z = autoencoder.encode(x.to(device, ae_dtype))  # [1, C, h, w], scaled and shifted
    grid_h, grid_w = z.shape[2] // 2, z.shape[3] // 2
    out = adapter(pack_latents(z).float(), grid_h, grid_w)
    return ReferenceConditioning(out.tokens.to(dtype), out.pooled.to(dtype))


# -- adapter files ----------------------------------------------------------------------------------------


REFERENCE_KIND = AdapterKind(
    "reference", lambda d: ReferenceAdapter(ReferenceParams.from_dict(d)), ReferenceImageError
)


def save_reference_adapter(
    adapter: nn.Module, params: ReferenceParams, path: str | os.PathLike[str], metadata: Mapping[str, str]
) -> str:
    """Write adapter weights (the module or an EMA copy of it) with their params; returns the SHA-256."""
    return REFERENCE_KIND.save(adapter, params.to_dict(), path, metadata)


def load_reference_adapter(path: str | os.PathLike[str]) -> tuple[ReferenceAdapter, dict[str, str]]:
    """(adapter in float32, header) from a reference adapter file; other files are refused with the reason."""
    return REFERENCE_KIND.load(path)


def open_reference_adapter(
    path: str | os.PathLike[str], model: FluxParams, num_tokens: int, model_hash: str
) -> tuple[ReferenceAdapter, dict[str, Any]]:
    """An adapter file checked against the model it is to steer: (adapter, its entry for the records).
    One trained on another model with the same shapes loads with a warning."""
    adapter, header = load_reference_adapter(path)
    want = reference_params_for(model, num_tokens)
    have = adapter.params
    fields = ("latent_dim", "context_dim", "pooled_dim", "num_tokens")
    if [getattr(have, f) for f in fields] != [getattr(want, f) for f in fields]:
        raise ReferenceImageError(
            f"{path}: this reference adapter makes {have.num_tokens} {have.context_dim}-dim tokens and a "
            f"{have.pooled_dim}-dim vector from {have.latent_dim}-channel latents, but the model reads "
            f"{want.num_tokens} {want.context_dim}-dim tokens and a {want.pooled_dim}-dim vector and has "
            f"{want.latent_dim}-channel latents; use an adapter trained on this model "
            "(`pictor train reference --base MODEL`)"
        )
    return adapter, REFERENCE_KIND.opened(path, header, model_hash)
