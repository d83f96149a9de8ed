"""Loss masks: which part of each training picture the loss counts (kohya's --masked_loss, --alpha_mask).

A mask is a grey picture, white where the loss counts and black where it does not (grey in between weighs
in between): the picture's own alpha channel (``alpha``: opaque counts; a picture without transparency
counts whole), or a picture of its own in a mask folder at the image's relative folder and stem
(``folder``, as kohya pairs its conditioning pictures: ``masks/a/b.png`` for ``images/a/b.jpg``). It is
resized to its image's size where it was drawn at another, then cropped to the bucket and mirrored exactly as
the image, and reaches the trainer as uint8 ``[1, H, W]``; the trainer averages it over each latent pixel
and weighs the flow loss by it, as kohya does (`pictor.train.t2i`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from pictor.data.buckets import Bucket, resize_to_bucket
from pictor.editing import eight_bit

MaskKind = Literal["alpha", "folder"]
MASK_KINDS: tuple[str, ...] = ("alpha", "folder")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def alpha_band(image: Image.Image) -> Image.Image | None:
    """The picture's transparency as an "L" picture (255 opaque), or None when it has none."""
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # a palette entry or a colour key that means "transparent"
    if image.mode not in _ALPHA_MODES:
        return None
    return image.convert("RGBA").getchannel("A")


def has_transparency(path: Path) -> bool:
    """Whether the picture at `path` has transparency, from its header (nothing decoded)."""
    try:
        with Image.open(path) as im:
            return im.mode in _ALPHA_MODES or "transparency" in im.info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False  # the scan reports a picture that does not open


def read_mask(path: Path, kind: MaskKind) -> Image.Image:
    """The mask of the picture at `path` ("alpha") or the mask picture at `path` ("folder"), as "L", upright
    (EXIF orientation applied, as the picture itself is read)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if kind == "alpha":
            band = alpha_band(im)
            return band if band is not None else Image.new("L", im.size, 255)
        return eight_bit(im).convert("L")  # a colour mask counts by its brightness


def fitted_mask(mask: Image.Image, size: tuple[int, int], bucket: Bucket, flip: bool) -> torch.Tensor:
    """`mask` on its image's bucket: resized to the image's `size` (w, h) if drawn at another, cropped as
    the image is, mirrored with it; uint8 [1, H, W]."""
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    mask = resize_to_bucket(mask, bucket)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))[None]
