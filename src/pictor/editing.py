"""Image editing: img2img, inpainting and outpainting, as pure functions the Pipeline wires in.

The three modes are one operation: start the sampler from the source latents noised to t = strength, and
keep a "known" region on its exact noising path while the rest is repainted.

- img2img: no mask; x = interpolate(z0, noise, strength), sample from t = strength to 0. strength 0 keeps
  the image (no sampling at all), strength 1 ignores it (the same pixels as plain generation).
- inpaint: a mask, white = repaint, black = keep. The latent mask is the pixel mask max-pooled onto the
  latent grid (a latent that touches any repainted pixel is repainted) and packed like the latents.
- outpaint: the canvas is extended by (left, top, right, bottom) pixels, pre-filled from the edge pixels
  (or noise); the new area is the mask, together with any mask given for the original image.

An img2img or inpainting edit may first enlarge its source (`upscale`, with Lanczos or an upscale model):
A1111's "SD upscale", ComfyUI's upscale followed by a KSampler at low denoise. The enlarged canvas is made
when a sampler run first needs it, so validating a request (as the server does) stays cheap.

How the known region is kept while sampling and after decoding is `pictor.edit_blending`; the request
is `pictor.edit_request.EditRequest`, and how its pictures and masks are read `pictor.edit_images`.

Layering: this module checks and prepares the inputs with numpy and PIL only (no torch); `pictor.pipeline`
imports it, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pictor.edit_common import EditError, nearest_mask, scaled_size
from pictor.edit_images import (
    ImageSource,
    eight_bit,
    image_info,
    load_image,
    load_mask,
    mask_sha256,
    pixel_sha256,
    rgb_picture,
    to_rgb,
)
from pictor.edit_request import DEFAULT_FEATHER, EditRequest
from pictor.edit_upscale import (
    DEFAULT_UPSCALE_STRENGTH,
    Enlarge,
    SourceUpscaler,
    upscale_plan,
)
from pictor.inpaint_area import (
    DEFAULT_MASK_PADDING,
    INPAINT_AREAS,
    MaskedArea,
    cut_out,
    cut_out_mask,
    plan_masked_area,
)

EDIT_MODES = ("img2img", "inpaint", "outpaint")
FILLS = ("edge", "noise")
# A1111's default denoising strength for img2img; inpainting and outpainting repaint fully by default.
DEFAULT_IMG2IMG_STRENGTH = 0.75
# The noise fill is part of the input, not of the sample: a fixed seed keeps it reproducible from the record.
NOISE_FILL_SEED = 0

__all__ = [
    "DEFAULT_FEATHER",
    "DEFAULT_IMG2IMG_STRENGTH",
    "DEFAULT_UPSCALE_STRENGTH",
    "EDIT_MODES",
    "FILLS",
    "EditError",
    "EditInputs",
    "EditRequest",
    "ImageSource",
    "SourceUpscaler",
    "eight_bit",
    "expand_canvas",
    "image_info",
    "load_image",
    "load_mask",
    "mask_sha256",
    "pixel_sha256",
    "prepare_edit",
    "rgb_picture",
    "scaled_size",
    "to_rgb",
]


@dataclass
class EditInputs:
    """A validated edit: the canvas the sampler starts from and what to keep of it."""

    mode: str
    strength: float
    picture: np.ndarray  # uint8 [h, w, 3], the source (expanded and pre-filled for outpainting), not enlarged
    mask: np.ndarray | None  # bool [H, W] on the canvas, True = repaint; None for img2img
    expand: tuple[int, int, int, int] | None
    fill: str
    feather: int
    source: dict[str, Any]  # {"sha256", "width", "height"} of the original image
    mask_info: dict[str, Any] | None  # {"sha256"} of the thresholded mask at the original size
    # An upscaling edit's enlargement as records keep it ({"scale", "upscaler", "width", "height"[,
    # "upscaler_file"]}) and the function that makes it; None for an edit at the source's size.
    upscale: dict[str, Any] | None = None
    enlarge: Enlarge | None = None
    # Inpainting only the masked area: where it is cut out and the size it is inpainted at; `mask` is then
    # the area's, at that size.
    area: MaskedArea | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The canvas's (width, height), known without making an enlarged canvas."""
        if self.upscale is not None:
            return int(self.upscale["width"]), int(self.upscale["height"])
        if self.area is not None:
            return self.area.width, self.area.height
        return int(self.picture.shape[1]), int(self.picture.shape[0])

    @cached_property
    def canvas(self) -> np.ndarray:
        """uint8 [H, W, 3], what the sampler starts from: the picture, enlarged for an upscaling edit (made
        once, on first use: an upscale model's run can take a while), or the masked area cut out."""
        if self.area is not None:
            return cut_out(self.picture, self.area)
        if self.upscale is None or self.enlarge is None:
            return self.picture
        width, height = self.size
        canvas = self.enlarge(self.picture, width, height)
        if canvas.shape != (height, width, 3) or canvas.dtype != np.uint8:
            raise EditError(  # a bug of the enlarging function, not of the request
                f"enlarging the source gave {canvas.dtype} {list(canvas.shape)}, not uint8 "
                f"[{height}, {width}, 3]"
            )
        return canvas

    def record_fields(self) -> dict[str, Any]:
        """What an edit adds to a generation record."""
        fields: dict[str, Any] = {
            "mode": self.mode,
            "strength": self.strength,
            "source_image": dict(self.source),
            "expand": list(self.expand) if self.expand else None,
        }
        if self.upscale is not None:
            fields["source_upscale"] = dict(self.upscale)
        if self.area is not None:
            fields.update(self.area.record())
        if self.mask_info is not None:
            fields["mask"] = dict(self.mask_info)
        if self.mask is not None:
            fields["feather"] = self.feather
        if self.mode == "outpaint":
            fields["fill"] = self.fill
        return fields


# ---------------------------------------------------------------------------------------- validation


def _check_multiple(width: int, height: int, multiple: int) -> None:
    bad = [n for n in (width, height) if n % multiple]
    if not bad:
        return

    def near(n: int) -> str:
        lo, hi = n // multiple * multiple, (n // multiple + 1) * multiple
        return f"{lo} or {hi}" if lo > 0 else str(hi)

    raise EditError(
        f"the image is {width}x{height}, but this model needs both sides to be multiples of {multiple} "
        f"(its pixel multiple); crop or resize it to a width of {near(width)} and a height of {near(height)}"
    )


def _check_strength(strength: float) -> float:
    s = float(strength)
    if not 0.0 <= s <= 1.0:  # also false for NaN
        raise EditError(f"strength must lie in [0, 1] (0 keeps the image, 1 ignores it), got {strength}")
    return s


def _check_expand(expand: tuple[int, int, int, int], multiple: int) -> tuple[int, int, int, int]:
    values = tuple(int(v) for v in expand)
    if len(values) != 4:
        raise EditError(f"expand takes 4 values (left, top, right, bottom), got {len(values)}")
    names = ("left", "top", "right", "bottom")
    for name, v in zip(names, values, strict=True):
        if v < 0:
            raise EditError(f"expand {name} must be >= 0 pixels, got {v}")
        if v % multiple:
            lo, hi = v // multiple * multiple, (v // multiple + 1) * multiple
            raise EditError(
                f"expand {name} = {v} is not a multiple of {multiple} (this model's pixel multiple); "
                f"use {lo} or {hi}"
            )
    return values  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------- canvas


def new_area(shape: tuple[int, ...], expand: tuple[int, int, int, int]) -> np.ndarray:
    """bool [H', W']: the part of an expanded canvas of `shape` (H', W') that the expansion added."""
    left, top, right, bottom = expand
    h, w = shape[0], shape[1]
    new = np.ones((h, w), dtype=bool)
    new[top : h - bottom, left : w - right] = False
    return new


def expand_canvas(
    pixels: np.ndarray, expand: tuple[int, int, int, int], fill: str = "edge"
) -> tuple[np.ndarray, np.ndarray]:
    """(canvas uint8 [H', W', 3], new-area mask bool [H', W']) for a canvas grown by (l, t, r, b).

    "edge" replicates the border pixels outward, so the sampler starts from colours that continue the
    image; "noise" starts from uniform noise (fixed seed), for when the border should not be continued.
    """
    if fill not in FILLS:
        raise EditError(f"unknown fill '{fill}'; choose one of {', '.join(FILLS)}")
    left, top, right, bottom = expand
    pad = ((top, bottom), (left, right), (0, 0))
    canvas = np.pad(pixels, pad, mode="edge")
    new = new_area(canvas.shape[:2], expand)
    if fill == "noise":
        rng = np.random.default_rng(NOISE_FILL_SEED)
        noise = rng.integers(0, 256, size=canvas.shape, dtype=np.uint8)
        canvas = np.where(new[..., None], noise, canvas)
    return canvas, new


def _check_area(request: EditRequest, reproducing: bool) -> None:
    """`inpaint_area` and its settings: known, with what they need, and not with what they cannot take."""
    if request.inpaint_area not in INPAINT_AREAS:
        raise EditError(
            f"unknown inpaint area '{request.inpaint_area}'; choose one of {', '.join(INPAINT_AREAS)}"
        )
    if request.inpaint_area == "whole":
        settings = (("mask padding", request.mask_padding), ("inpaint size", request.inpaint_size))
        given = [name for name, value in settings if value is not None]
        if given and not reproducing:
            raise EditError(
                f"{' and '.join(given)} shape{'s' if len(given) == 1 else ''} inpainting only the masked "
                "area; add inpaint area 'masked' or drop it"
            )
        return
    if request.mode != "inpaint":
        raise EditError(
            "inpaint area 'masked' inpaints around a mask: give a mask (and no expand; outpaint first)"
        )
    if request.upscale is not None:
        raise EditError(
            "an edit either enlarges its source (upscale) or inpaints only the masked area, not both: the "
            "masked area is already drawn at the model's own resolution"
        )
    spatial = [
        name
        for name, value in (
            ("layout boxes", request.layout),
            ("regions", request.regions),
            ("a control picture", request.control_image),
            ("ControlNet pictures", request.controlnet_images),
            ("a context image", request.context_image),  # Kontext's tokens lie over the whole picture
        )
        if value is not None and (not isinstance(value, list) or value)
    ]
    if spatial:
        raise EditError(
            f"{' and '.join(spatial)} cover the whole image, but inpaint area 'masked' draws only the masked "
            "area: inpaint the whole image (inpaint area 'whole')"
        )


def prepare_edit(
    request: EditRequest,
    multiple: int,
    max_pixels: int = 4096 * 4096,
    reproducing: bool = False,
    upscaler: SourceUpscaler | None = None,
    work_pixels: int = 1024 * 1024,
) -> EditInputs:
    """Load and validate an edit's image and mask; errors say what to change. `max_pixels` bounds an
    expanded or enlarged canvas, checked before it is allocated (the pipeline passes its MAX_PIXELS).
    `reproducing`: an existing image's record, so a setting that changes nothing is not refused.
    `upscaler`: the upscale model `request.upscaler` may name. `work_pixels`: how many pixels a masked
    area is inpainted at when no size is given (the pipeline passes its model's default size's)."""
    mode = request.mode
    _check_area(request, reproducing)
    if request.strength is not None:
        strength = _check_strength(request.strength)
    elif mode == "img2img":
        strength = DEFAULT_UPSCALE_STRENGTH if request.upscale is not None else DEFAULT_IMG2IMG_STRENGTH
    else:
        strength = 1.0
    feather = request.feather
    if (
        isinstance(feather, bool)
        or not isinstance(feather, int | float)
        or feather < 0
        or feather != int(feather)
    ):
        raise EditError(f"feather must be a whole number of pixels >= 0, got {feather!r}")
    if request.expand is not None and not any(request.expand):  # not silently an img2img
        raise EditError("expand 0,0,0,0 adds nothing: give the pixels to add on some side, or drop expand")
    if request.fill not in FILLS:
        raise EditError(f"unknown fill '{request.fill}'; choose one of {', '.join(FILLS)}")
    expand = _check_expand(request.expand, multiple) if mode == "outpaint" and request.expand else None
    if expand is not None and strength == 0 and not reproducing:
        raise EditError(
            "strength 0 keeps the image as it is, so the expanded area would stay its raw fill; give a "
            "strength above 0 (outpainting's default is 1)"
        )
    pixels = to_rgb(load_image(request.image))
    height, width = pixels.shape[:2]
    expanding = request.expand is not None and any(request.expand)
    upscale, enlarge = upscale_plan(
        request.upscale, request.upscaler, expanding, width, height, multiple, max_pixels, upscaler
    )
    if upscale is None and request.inpaint_area != "masked":  # those canvases are sized to the multiple
        _check_multiple(width, height, multiple)
    if expand is not None:  # before the canvas is allocated: a huge expand must not fill memory first
        grown_w, grown_h = width + expand[0] + expand[2], height + expand[1] + expand[3]
        if grown_w * grown_h > max_pixels:
            raise EditError(
                f"the expanded canvas would be {grown_w}x{grown_h}, {grown_w * grown_h:,} pixels; the most "
                f"pictor makes is {max_pixels:,}: expand by less"
            )
    source = image_info(pixels)

    mask, drawn_enlarged = None, False
    if request.mask is not None and upscale is not None:  # drawn on the source, or on the enlarged picture
        size = (upscale["width"], upscale["height"])
        picture = load_image(request.mask, "mask")  # read once, whichever size it was drawn at
        drawn_enlarged = picture.size == size
        mask = load_mask(picture, *size) if drawn_enlarged else load_mask(picture, width, height)
    elif request.mask is not None:
        mask = load_mask(request.mask, width, height)
    mask_info = {"sha256": mask_sha256(mask)} if mask is not None else None
    if mode == "inpaint" and mask is not None and not mask.any():
        raise EditError(
            "the mask is all black (below 128 after conversion to grey): nothing to repaint; "
            "paint the area to repaint white"
        )
    canvas = pixels
    if expand is not None:
        canvas, new = expand_canvas(pixels, expand, request.fill)
        if mask is not None:
            left, top = expand[0], expand[1]
            new[top : top + height, left : left + width] |= mask
        mask = new
    if upscale is not None and mask is not None and not drawn_enlarged:
        mask = nearest_mask(mask, upscale["width"], upscale["height"])  # every side grows: no row is lost
    area = None
    if request.inpaint_area == "masked" and mask is not None:
        area = plan_masked_area(
            mask,
            DEFAULT_MASK_PADDING if request.mask_padding is None else request.mask_padding,
            multiple,
            work_pixels,
            request.inpaint_size,
            max_pixels,
        )
        mask = cut_out_mask(area)
    return EditInputs(
        mode=mode,
        strength=strength,
        picture=canvas,
        mask=mask,
        expand=expand,
        fill=request.fill,
        feather=int(request.feather),
        source=source,
        mask_info=mask_info,
        upscale=upscale,
        enlarge=enlarge,
        area=area,
    )
