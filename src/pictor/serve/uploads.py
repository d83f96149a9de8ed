"""Uploaded images: untrusted bytes made into a loaded PIL image, or a 4xx that says what is wrong.

Size-capped (413), opened only as PNG, JPEG or WebP, with Pillow's decompression-bomb guard on (its
warning is an error here too), and checked against the pixel limit before any pixel is decoded. Used for
the edit endpoints' multipart files and the generation endpoints' base64 ``reference_image``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from pictor.serve.errors import APIError
from pictor.serve.settings import Limits

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_upload(data: bytes, what: str, limits: Limits, fitted: bool = False) -> Image.Image:
    """Bytes -> a loaded PIL image, or a 4xx that says what is wrong with them. `fitted`: a picture the
    pipeline resizes before use (a reference or context image), held to `max_picture_pixels` rather than to
    the output limit `max_pixels`."""
    cap = limits.max_picture_pixels if fitted else limits.max_pixels
    if len(data) > limits.max_upload_bytes:
        raise APIError(
            413,
            f"{what} is too large: the upload limit is {limits.max_upload_bytes} bytes",
            param=what,
            code="upload_too_large",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                width, height = im.size  # from the header: nothing decoded yet
                if width * height > cap:
                    raise APIError(
                        400,
                        f"{what} is {width}x{height} = {width * height} pixels; the limit is {cap}",
                        param=what,
                        code="image_too_large",
                    )
                im.load()
                return ImageOps.exif_transpose(im)  # as viewers show it; a loaded copy
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise APIError(
                400,
                f"{what} declares too many pixels (decompression bomb guard: {exc})",
                param=what,
                code="image_too_large",
            ) from None
        except UnidentifiedImageError:  # its message names an in-memory file object, of no use to a client
            raise APIError(
                400,
                f"{what} is not a readable PNG, JPEG or WebP image (its format was not recognised)",
                param=what,
                code="invalid_image",
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise APIError(
                400,
                f"{what} is not a readable PNG, JPEG or WebP image ({exc})",
                param=what,
                code="invalid_image",
            ) from None


def decode_base64_image(text: str, what: str, limits: Limits, fitted: bool = False) -> Image.Image:
    """A base64 image (plain, or a ``data:image/...;base64,`` URL) -> a loaded PIL image, or a 4xx."""
    return decode_upload(base64_bytes(text, what, limits), what, limits, fitted)


def base64_bytes(text: str, what: str, limits: Limits) -> bytes:
    """The bytes of a base64 upload (plain, or a ``data:image/...;base64,`` URL), held to the upload limit
    before decoding; a 413 or 400 naming `what` otherwise."""
    # Whitespace is dropped: `base64` and many encoders wrap lines at 76 characters.
    body = "".join(_DATA_URL.sub("", text.strip(), count=1).split())
    if len(body) > 4 * (limits.max_upload_bytes // 3 + 1):
        raise APIError(
            413,
            f"{what} is too large: the upload limit is {limits.max_upload_bytes} bytes",
            param=what,
            code="upload_too_large",
        )
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400,
            f"{what} is not base64: send the PNG, JPEG or WebP file's bytes base64-encoded "
            "(optionally as a data:image/png;base64,... URL)",
            param=what,
            code="invalid_image",
        ) from None
    return data
