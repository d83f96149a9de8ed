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

How the known region is kept while sampling and after decoding is `pictor.edit_blending`.

Layering: this module checks and prepares the inputs with numpy and PIL only (no torch); `pictor.pipeline`
imports it, never the other way round.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pictor.edit_common import MASK_THRESHOLD, EditError, nearest_mask, scaled_size
from pictor.edit_upscale import (
    DEFAULT_UPSCALE_STRENGTH,
    Enlarge,
    SourceUpscaler,
    upscale_plan,
)
from pictor.guidance_methods import GuidanceMethod
from pictor.inpaint_area import (
    DEFAULT_MASK_PADDING,
    INPAINT_AREAS,
    MaskedArea,
    cut_out,
    cut_out_mask,
    plan_masked_area,
)

ImageSource = Image.Image | str | os.PathLike[str]

EDIT_MODES = ("img2img", "inpaint", "outpaint")
FILLS = ("edge", "noise")
# A1111's default denoising strength for img2img; inpainting and outpainting repaint fully by default.
DEFAULT_IMG2IMG_STRENGTH = 0.75
DEFAULT_FEATHER = 2
# The noise fill is part of the input, not of the sample: a fixed seed keeps it reproducible from the record.
NOISE_FILL_SEED = 0

__all__ = [
    "DEFAULT_IMG2IMG_STRENGTH",
    "DEFAULT_UPSCALE_STRENGTH",
    "EDIT_MODES",
    "FILLS",
    "EditError",
    "EditInputs",
    "EditRequest",
    "SourceUpscaler",
    "expand_canvas",
    "image_info",
    "load_image",
    "load_mask",
    "mask_sha256",
    "pixel_sha256",
    "prepare_edit",
    "scaled_size",
]


@dataclass
class EditRequest:
    """An edit of `image` towards `prompt`.

    The generation fields (negative_prompt ... batch_size) mean what they mean in
    `pictor.pipeline.GenerationRequest` and carry the same names: `Pipeline.edit` copies them over by name,
    so a field added there must be added here too (tests/test_editing.py checks). Width and height are not
    among them: an edit keeps the image's size (plus `expand`, or times `upscale`).
    """

    image: ImageSource
    prompt: str
    # White (>= 128 after conversion to grey) = repaint, black = keep; same size as `image` (or a scaled
    # copy with the same aspect ratio, resized with nearest); with `upscale`, also the enlarged size.
    mask: ImageSource | None = None
    # None: 1.0 for inpainting/outpainting (with upscale too), DEFAULT_IMG2IMG_STRENGTH for img2img,
    # DEFAULT_UPSCALE_STRENGTH for an upscaling img2img.
    strength: float | None = None
    # Pixels added on the (left, top, right, bottom); each a multiple of the model's pixel multiple.
    expand: tuple[int, int, int, int] | None = None
    fill: str = "edge"  # how the expanded area starts: "edge" (replicated border pixels) or "noise"
    feather: int = DEFAULT_FEATHER  # pixels of blending inside the mask edge; 0 = hard edge
    # Enlarge the source (and mask) by this factor, above 1 and at most MAX_UPSCALE, before the edit; the
    # size rounds to the model's pixel multiple. img2img's default strength is then DEFAULT_UPSCALE_STRENGTH.
    upscale: float | None = None
    # With `upscale`: the name of the upscale model the pipeline loaded (`Pipeline.set_upscaler`), or
    # None / "lanczos" for Lanczos.
    upscaler: str | None = None
    # Inpainting: "whole" repaints the mask on the whole image; "masked" cuts the mask's box (grown by
    # `mask_padding` pixels) out, inpaints it at `inpaint_size` (None: the model's default pixel count in
    # the box's aspect ratio) and blends it back (`pictor.inpaint_area`).
    inpaint_area: str = "whole"
    mask_padding: int | None = None  # None: DEFAULT_MASK_PADDING
    inpaint_size: tuple[int, int] | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    seed: int | None = None
    num_images: int = 1
    guidance_method: GuidanceMethod | None = None  # `GenerationRequest.guidance_method`
    batch_size: int | None = None
    prompt_editing: bool = False
    composable: bool = False
    variation_seed: int | None = None
    variation_strength: float | None = None
    seed_resize_from: tuple[int, int] | None = None  # refused: an edit's composition is its picture's
    layout: list[dict[str, Any]] | None = None
    regions: list[dict[str, Any]] | None = None
    regional_attention: bool = False
    regional_steps: float | None = None  # `GenerationRequest.regional_steps` and the like
    regional_double_interval: int | None = None
    regional_single_interval: int | None = None
    regional_base_ratio: float | None = None
    reference: ImageSource | np.ndarray | None = None
    context_image: ImageSource | np.ndarray | None = None
    control_image: ImageSource | np.ndarray | None = None
    control_canny: tuple[float, float] | None = None
    redux_image: ImageSource | np.ndarray | None = None
    redux_strength: float | None = None
    ip_adapter_image: ImageSource | np.ndarray | None = None
    ip_adapter_scale: float | None = None
    controlnet_images: list[ImageSource | np.ndarray] | None = None
    controlnet_scales: list[float] | None = None
    controlnet_modes: list[str | int | None] | None = None
    controlnet_start: float | None = None
    controlnet_end: float | None = None
    vae_tile: int | None = None
    vae_tile_overlap: int | None = None
    denoise_tile: int | None = None
    denoise_tile_overlap: int | None = None
    cache_threshold: float | None = None
    prompt_weights: bool = False

    @property
    def mode(self) -> str:
        if self.expand is not None and any(self.expand):
            return "outpaint"
        return "inpaint" if self.mask is not None else "img2img"


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


# ------------------------------------------------------------------------------------- loading and hashes


def load_image(source: ImageSource, what: str = "image") -> Image.Image:
    """A PIL image from a path or an image; errors name the file and what is wrong with it."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise EditError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            # Camera JPEGs store rotation as a tag; edit the image as viewers show it.
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EditError(
            f"{what} {path}: not a readable image ({exc}); give a PNG, JPEG or WebP file"
        ) from exc


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16", "I") as 8-bit "L", 65535 -> 255: Pillow's own conversion clips at 255,
    which turns a 16-bit image (or mask) almost all white. A transparent grey level (a PNG's tRNS) becomes
    an alpha channel ("LA"), as an 8-bit image's would be seen."""
    if not image.mode.startswith("I"):
        return image
    raw = np.asarray(image)
    grey = Image.fromarray(np.clip(raw.astype(np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    key = image.info.get("transparency")
    if isinstance(key, int):  # a PNG's transparent grey level: kept as an alpha channel ("LA")
        grey.putalpha(Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), mode="L"))
    return grey


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3]; an alpha channel is dropped (the visible colours are what gets edited)."""
    return np.asarray(eight_bit(image).convert("RGB"), dtype=np.uint8).copy()


def rgb_picture(source: ImageSource | np.ndarray, what: str, float_refusal: str | None = None) -> np.ndarray:
    """A conditioning picture (a path, a PIL image or a uint8 [H, W, 3] array) as uint8 [H, W, 3]: any mode
    made RGB (alpha dropped, as BFL's ``convert("RGB")``); an array is taken as it is. Errors are EditError
    naming `what` ("context image", ...); `float_refusal`: the message for a floating-point (mode F) picture,
    whose range 8-bit conversion would clip, else it is converted."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise EditError(
                f"a {what} array must be uint8 [H, W, 3], got {source.dtype} {list(source.shape)}"
            )
        return source
    if not isinstance(source, Image.Image | str) and not hasattr(source, "__fspath__"):
        raise EditError(
            f"a {what} must be a path, a PIL image or a uint8 [H, W, 3] array, got {type(source).__name__}"
        )
    im = load_image(source, what)
    if float_refusal is not None and im.mode == "F":
        raise EditError(float_refusal)
    return to_rgb(im)


def pixel_sha256(pixels: np.ndarray) -> str:
    """SHA-256 of the pixel values and shape, so re-encoding or re-tagging a file does not change it."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{arr.dtype.str}{list(arr.shape)}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def image_info(pixels: np.ndarray) -> dict[str, Any]:
    return {"sha256": pixel_sha256(pixels), "width": int(pixels.shape[1]), "height": int(pixels.shape[0])}


def mask_sha256(mask: np.ndarray) -> str:
    """Hash of the thresholded mask (bool [H, W]): equivalent masks (any mode, any grey >= 128) agree."""
    return pixel_sha256(mask.astype(np.uint8))


def load_mask(source: ImageSource, width: int, height: int) -> np.ndarray:
    """bool [height, width], True = repaint: any mode, converted to grey, thresholded at 128.

    A mask of another resolution but the same aspect ratio is resized with nearest; any other size is an
    error (it was most likely drawn for a different image).
    """
    image = load_image(source, "mask")
    mw, mh = image.size
    if (mw, mh) != (width, height):
        if mw * height != mh * width:
            raise EditError(
                f"the mask is {mw}x{mh} but the image is {width}x{height}; the mask must have the image's "
                "size (when the canvas is expanded for outpainting: the size of the original image)"
            )
        image = image.resize((width, height), Image.Resampling.NEAREST)
    grey = np.asarray(eight_bit(image).convert("L"))
    return grey >= MASK_THRESHOLD


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
