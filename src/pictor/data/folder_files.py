"""One file of an image folder at a time: which files are images, whether one decodes (the scan's cheap
check), its displayed size, its pixels as RGB and as a tensor; and how the problems found are reported
(DatasetWarning, with a few paths quoted in each summary).

Separate from `pictor.data.folder` because none of this needs the folder: these are the file-level pieces
that the dataset, its scan (`pictor.data.folder_scan`) and its metadata reading
(`pictor.data.folder_metadata`) share.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pictor.editing import eight_bit
from pictor.notices import PictorWarning

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
_EXIF_ORIENTATION = 0x0112
_SHOWN = 5  # paths quoted in a summary warning


class DatasetWarning(PictorWarning):
    """Problems found while scanning a dataset folder (skipped images, missing captions)."""


class UnreadableImageError(ValueError):
    """An image that passed the scan but does not decode (the fast scan reads headers, not every pixel)."""


def _summary(what: str, entries: Sequence[tuple[str, str]]) -> str:
    lines = [f"  {p}: {r}" if r else f"  {p}" for p, r in entries[:_SHOWN]]
    more = f"\n  ... and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
    return f"{len(entries)} {what}:\n" + "\n".join(lines) + more


def _check_image(path: Path, check: str) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation. Raises on a file that will not decode.

    "fast" never decodes a whole PNG or JPEG: PNG verify() walks every chunk's CRC (catches truncation
    and corruption), and a JPEG is fully decoded only when it lacks the end-of-image marker, the usual
    sign of truncation. Other formats are small in practice and have no cheap check, so they are decoded.
    """
    with Image.open(path) as im:
        w, h = im.size
        fmt = im.format
        if check == "decode" or (check == "fast" and fmt not in ("PNG", "JPEG")):
            im.load()
        if fmt == "PNG" and check != "decode":
            # PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after the pixels;
            # walking the chunk headers finds one there without decoding anything.
            exif = Image.Exif()
            raw = im.info.get("exif") or _png_exif_chunk(path)
            if raw:
                exif.load(raw)
        else:
            exif = im.getexif()
        if exif.get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # 90-degree turns swap the sides
            w, h = h, w
    if check == "fast" and fmt == "PNG":
        with Image.open(path) as im:  # verify() leaves the image unusable, hence a second open
            im.verify()
    elif check == "fast" and fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            tail = f.read().rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            with Image.open(path) as im:
                im.load()
    return w, h


def _png_exif_chunk(path: Path) -> bytes | None:
    """The data of a PNG's eXIf chunk wherever it sits (the standard allows it after the image data),
    reading only chunk headers; None when there is none."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "unreadable: not an image Pillow can identify"
    text = str(exc) or type(exc).__name__
    return f"truncated: {text}" if "truncated" in text.lower() else f"unreadable: {text}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white (not dropped to black)."""
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # a palette entry or a colour key that means "transparent"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I"):  # 16-bit greyscale, the only "I" images of the formats read here
        return eight_bit(image).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # [H, W, 3]
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()
