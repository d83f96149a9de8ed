"""Loading and hashing the pictures and masks an edit (or a conditioning input) is given: any file or PIL
image as an 8-bit RGB array, a mask as a thresholded bool array, and hashes of pixel values that records
keep.

Separate from `pictor.editing`, which checks and prepares an edit, because much else reads pictures the
same way (context, control, Redux and IP-Adapter pictures, datasets, upscaling) without editing anything.
numpy and PIL only (no torch).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pictor.edit_common import MASK_THRESHOLD, EditError

ImageSource = Image.Image | str | os.PathLike[str]


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
