"""FLUX.1 Canny [dev] and Depth [dev]: structural control by a picture read beside the noise.

Their ``img_in`` takes each packed noisy token (4 x C latent channels, 64 for FLUX.1) concatenated with the
packed latents of a control picture at the image's size (another 4 x C): 128 input channels for 64 output
ones. So a control model is known by its shapes alone, ``in_channels == 2 * out_channels``; whether it was
trained on edge maps (Canny) or depth maps (Depth) is not in its weights, so the bundle config says it
(``"control": "canny"`` or ``"depth"``).

The conditioning follows BFL's reference code (flux ``sampling.prepare_control``) and diffusers'
``FluxControlPipeline``: the control picture is resized to the image's size with Lanczos (no crop, as
both do), scaled to [-1, 1], encoded by the autoencoder (pictor takes its mean where both draw a sample of
it: their difference is the encoder's tiny posterior noise) and packed; the same tokens go beside every
image of a run and both halves of classifier-free guidance. A Canny model reads an edge map: give one, or
give a photo with ``canny`` thresholds and pictor draws its edges as BFL's ``CannyImageEncoder`` does
(`pictor.edge_maps`: OpenCV's Canny, 50 and 200 by default, of the picture after BFL's float round trip,
which lowers pixel values 1 to 63 by one: `bfl_canny_input`). A Depth model reads a depth map (near =
bright, as Depth Anything draws it); pictor ships no depth estimator, so the map is the user's.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Real
from typing import Any

import numpy as np
import torch
from PIL import Image

from pictor.edge_maps import FLUX_CANNY_HIGH, FLUX_CANNY_LOW, canny_control_picture
from pictor.editing import EditError, ImageSource, image_info, rgb_picture
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.models.autoencoder import AutoEncoder
from pictor.models.autoencoder_tiling import autoencoder_encode
from pictor.models.flux import FluxParams, pack_latents
from pictor.models.offload import bring_in

__all__ = [
    "CONTROL_KINDS",
    "DEFAULT_CANNY",
    "ControlImageError",
    "bfl_canny_input",
    "check_control_kind",
    "control_fields",
    "control_picture",
    "control_problem",
    "control_tokens",
    "fit_control",
    "is_control_model",
    "resolve_control",
]

CONTROL_KINDS: tuple[str, ...] = ("canny", "depth")
# BFL's CannyImageEncoder thresholds (flux `modules/image_embedders.py`), diffusers' example's too.
DEFAULT_CANNY: tuple[float, float] = (float(FLUX_CANNY_LOW), float(FLUX_CANNY_HIGH))


class ControlImageError(GenerationError):
    """A control picture that cannot be used, or a control model asked for what it cannot do."""


def is_control_model(params: FluxParams) -> bool:
    """Whether the transformer's input is FLUX.1 Canny/Depth's: the noise and a control picture's latents."""
    return params.in_channels == 2 * params.out_channels


def check_control_kind(kind: Any, where: str) -> None:
    """Refuse a control kind that is not one of CONTROL_KINDS, naming where it was read."""
    if kind not in CONTROL_KINDS:
        raise ControlImageError(f"{where}: control kind {kind!r} is not one of {', '.join(CONTROL_KINDS)}")


def _model_words(kind: str | None) -> str:
    return "FLUX.1 Depth" if kind == "depth" else "FLUX.1 Canny" if kind == "canny" else "FLUX.1 control"


def control_problem(model_name: str, control: bool, kind: str | None, r: Any) -> str | None:
    """Why a request cannot run on this model as far as control goes, or None. `control`: the model reads
    a control picture (`is_control_model`); `kind`: what it was trained on ("canny", "depth" or None)."""
    given = getattr(r, "control_image", None) is not None
    canny = getattr(r, "control_canny", None)
    if not control:
        if canny is not None and not given:
            return (
                f"model '{model_name}' is not a FLUX.1 Canny or Depth model, so --canny (the edges of a "
                "control picture) has nothing to draw for: drop --canny"
            )
        if given:
            return (
                f"model '{model_name}' is not a FLUX.1 Canny or Depth model, so it cannot read a control "
                "picture (its input has no room for one): drop --control, or use a control model (import "
                "flux1-canny-dev.safetensors or flux1-depth-dev.safetensors with `pictor convert flux`)"
            )
        return None
    words = _model_words(kind)
    if not given:
        picture = "a depth map (near = bright)" if kind == "depth" else "an edge map, or a photo with --canny"
        return (
            f"model '{model_name}' is a {words} model: it draws what a control picture shows; give "
            f"{picture} (`--control IMAGE`, the server's control_image)"
        )
    if canny is not None:
        if kind == "depth":
            return (
                f"model '{model_name}' is a FLUX.1 Depth model: it reads depth maps, not the edge maps "
                "--canny makes; drop --canny and give a depth map"
            )
        if (
            not isinstance(canny, list | tuple)
            or len(canny) != 2
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in canny)
        ):
            return f"canny thresholds must be two numbers LOW,HIGH (e.g. 50,200), got {canny!r}"
        if not all(math.isfinite(float(v)) and 0 <= float(v) <= 10_000 for v in canny):
            return f"canny thresholds must be finite numbers between 0 and 10000, got {list(canny)}"
    for field, what in (
        ("layout", "a layout"),
        ("reference", "a reference picture"),
        ("context_image", "a context image"),
    ):
        if getattr(r, field, None) is not None:
            return f"a {words} model does not take {what} beside its control picture; leave it out"
    if getattr(r, "hires_scale", None):
        return f"the hires fix is not offered for {words} models; leave --hires out"
    return None


def fit_control(source: ImageSource | np.ndarray, width: int, height: int) -> np.ndarray:
    """The control picture as uint8 [height, width, 3]: any mode made RGB (alpha dropped, as BFL's
    ``convert("RGB")``), resized to the image's size with Lanczos, as BFL and diffusers prepare it.
    Idempotent: fitted pixels come back unchanged."""
    # a float depth map's range is unknown, so 8-bit conversion would clip it
    floats = (
        "the control picture holds floating-point values (mode F); save the depth map as an 8- or "
        "16-bit image, near = bright"
    )
    try:
        im = Image.fromarray(rgb_picture(source, "control picture", floats))
    except EditError as exc:
        raise ControlImageError(str(exc)) from exc
    if min(im.size) < 1:
        raise ControlImageError(f"the control picture is {im.size[0]}x{im.size[1]} pixels: it is empty")
    # Pillow returns a copy when the size is already right, so resolving twice changes nothing.
    return np.asarray(im.resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8).copy()


def resolve_control(
    r: GenerationRequest, model_name: str, control: bool, kind: str | None
) -> GenerationRequest:
    """The request (width and height resolved) with its control picture checked and fitted to its size,
    and canny thresholds as a tuple of floats."""
    problem = control_problem(model_name, control, kind, r)
    if problem:
        raise ControlImageError(problem)
    if r.control_image is None:
        return r
    assert r.width and r.height
    source = r.control_image
    if isinstance(source, list | tuple):  # a list of one, as a repeated flag may collect
        if len(source) != 1:
            raise ControlImageError(f"{len(source)} control pictures were given; give one")
        source = source[0]
    canny = tuple(float(v) for v in r.control_canny) if r.control_canny is not None else None
    return replace(r, control_image=fit_control(source, r.width, r.height), control_canny=canny)


def bfl_canny_input(pixels: np.ndarray) -> np.ndarray:
    """The uint8 picture BFL's CannyImageEncoder hands to cv2.Canny: the picture taken to [-1, 1] in
    float32 (``/ 127.5 - 1``, as `prepare_control` does), clamped, and back with ``(x + 1) * 127.5`` cast
    to uint8, which truncates: values 1 to 63 come back one lower. Edges of the untouched picture differ from
    BFL's in thousands of pixels on a photo, so pictor follows the round trip (equal to torch's, tested)."""
    x = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    x = np.clip(x, np.float32(-1.0), np.float32(1.0))
    return ((x + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)


def control_picture(pixels: np.ndarray, canny: tuple[float, float] | None) -> np.ndarray:
    """What the model reads: the fitted picture itself, or the Canny edges BFL's code draws of it (0/255 in
    all three channels)."""
    if canny is None:
        return pixels
    return canny_control_picture(bfl_canny_input(pixels), canny[0], canny[1])


def control_fields(pixels: np.ndarray, canny: tuple[float, float] | None) -> dict[str, Any]:
    """What a control picture adds to a record: the fitted picture's SHA-256 and size (not the picture),
    and the Canny thresholds when pictor drew its edges."""
    return {
        "control_image": image_info(pixels),
        **({"control_canny": [float(canny[0]), float(canny[1])]} if canny is not None else {}),
    }


@torch.inference_mode()
def control_tokens(
    autoencoder: AutoEncoder,
    pixels: np.ndarray,
    canny: tuple[float, float] | None,
    dtype: torch.dtype,
    tile: int | None = None,
    overlap: int | None = None,
) -> torch.Tensor:
    """The tokens a control model reads beside the noise: the packed latents of the control picture
    (fitted uint8 [H, W, 3], its edges drawn first when `canny` is given): [1, N, 4 C]. In tiles of
    `tile` pixels when the run decodes in tiles (`--vae-tile`), which bounds this encode's memory too."""
    # the autoencoder's run device (under CPU offload: brought in, not CPU memory where it waits; a tiled
    # encode builds its result where x is)
    device, dtype_in = bring_in(autoencoder), next(autoencoder.parameters()).dtype
    picture = control_picture(pixels, canny)
    x = torch.from_numpy(picture).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    z = autoencoder_encode(autoencoder, x.to(device, dtype_in), tile, overlap)
    return pack_latents(z).to(dtype)
