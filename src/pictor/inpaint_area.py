"""Inpainting only the masked area (A1111's "Inpaint area: Only masked", ComfyUI's Inpaint Crop and Stitch).

The mask's bounding box, grown by a padding and then to the aspect ratio it is inpainted at, is cut out of
the picture and resized to the size the model works best at (its default number of pixels, in the box's
aspect ratio, or a size given), inpainted there, resized back and blended into the whole picture inside the
mask. So a small area of a large picture is drawn at the model's full resolution, and every pixel outside
the mask stays the picture's, exactly. Numpy and PIL only: `pictor.picture_runs` does the stitching.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pictor.edit_common import EditError, nearest_mask

INPAINT_AREAS = ("whole", "masked")
DEFAULT_MASK_PADDING = 32  # A1111's "Only masked padding, pixels"
MAX_ASPECT = 4.0  # the widest (or tallest) an area is drawn at: models do badly far from their trained shapes


@dataclass(frozen=True)
class MaskedArea:
    """Where on the picture the masked area is cut out, and the size it is inpainted at."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive) on the picture
    width: int
    height: int
    padding: int
    picture_mask: np.ndarray  # bool [H, W], the whole picture's mask: what is blended back

    def record(self) -> dict[str, Any]:
        """What an edit's record keeps of it (the size it was inpainted at is the record's width, height)."""
        return {"inpaint_area": "masked", "mask_padding": self.padding, "crop": list(self.box)}


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown on both sides to `want` long (at most `limit`), shifted to stay inside [0, limit)."""
    want = min(want, limit)
    extra = want - (hi - lo)
    if extra <= 0:
        return lo, hi
    lo -= extra // 2
    hi += extra - extra // 2
    if lo < 0:
        lo, hi = 0, hi - lo
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return lo, hi


def plan_masked_area(
    mask: np.ndarray,
    padding: int,
    multiple: int,
    work_pixels: int,
    size: tuple[int, int] | None = None,
    max_pixels: int = 4096 * 4096,
) -> MaskedArea:
    """The box around `mask`'s white pixels grown by `padding`, then to the aspect ratio of the size it is
    inpainted at: `size` if given, else the box's aspect ratio (kept within 1:MAX_ASPECT) at no more than
    `work_pixels` pixels, each side rounded down to `multiple` (A1111 grows the box likewise, so nothing is
    stretched where the picture has room)."""
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
        raise EditError(f"mask padding must be a whole number of pixels >= 0, got {padding!r}")
    padding = int(padding)
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1 = max(0, int(xs.min()) - padding), min(width, int(xs.max()) + 1 + padding)
    y0, y1 = max(0, int(ys.min()) - padding), min(height, int(ys.max()) + 1 + padding)
    if size is not None:
        if len(size) != 2 or not all(isinstance(v, numbers.Integral) for v in size):
            raise EditError(f"the inpaint size must be two whole numbers (width, height), got {size!r}")
        work_w, work_h = (int(v) for v in size)
        bad = [v for v in (work_w, work_h) if v < multiple or v % multiple]
        if bad:
            raise EditError(
                f"the inpaint size {work_w}x{work_h} must have both sides multiples of {multiple} (this "
                "model's pixel multiple)"
            )
        if work_w * work_h > max_pixels:
            raise EditError(
                f"the inpaint size {work_w}x{work_h} is {work_w * work_h:,} pixels; the most pictor makes is "
                f"{max_pixels:,}"
            )
        if max(work_w / work_h, work_h / work_w) > MAX_ASPECT:
            raise EditError(
                f"the inpaint size {work_w}x{work_h} is more than {MAX_ASPECT:g} times as wide as tall (or "
                "tall as wide); give a squarer size (the box grows to it)"
            )
    else:
        aspect = min(max((x1 - x0) / (y1 - y0), 1 / MAX_ASPECT), MAX_ASPECT)
        work_w, work_h = (
            max(multiple, math.floor(math.sqrt(work_pixels * a) / multiple) * multiple)
            for a in (aspect, 1 / aspect)
        )
    aspect = work_w / work_h
    box_w, box_h = x1 - x0, y1 - y0
    if box_w / box_h < aspect:  # too narrow for the work size: wider, where the picture has room
        x0, x1 = _grow(x0, x1, round(box_h * aspect), width)
    else:
        y0, y1 = _grow(y0, y1, round(box_w / aspect), height)
    return MaskedArea((x0, y0, x1, y1), work_w, work_h, padding, mask)


def cut_out(picture: np.ndarray, area: MaskedArea) -> np.ndarray:
    """uint8 [height, width, 3]: the area of the picture at the size it is inpainted at (Lanczos)."""
    x0, y0, x1, y1 = area.box
    region = Image.fromarray(np.ascontiguousarray(picture[y0:y1, x0:x1]))
    return np.asarray(region.resize((area.width, area.height), Image.Resampling.LANCZOS))


def cut_out_mask(area: MaskedArea) -> np.ndarray:
    """bool [height, width]: the area's mask at the size it is inpainted at. Enlarged with nearest (it stays
    hard); shrunk, a pixel is masked where any pixel under it is, so thin strokes are not lost."""
    x0, y0, x1, y1 = area.box
    mask = area.picture_mask[y0:y1, x0:x1]
    if area.width < x1 - x0 or area.height < y1 - y0:
        grey = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        return np.asarray(grey.resize((area.width, area.height), Image.Resampling.BOX)) > 0
    return nearest_mask(mask, area.width, area.height)


def back_to_box(generated: np.ndarray, area: MaskedArea) -> np.ndarray:
    """uint8 [box height, box width, 3]: an inpainted area resized back to its box on the picture."""
    x0, y0, x1, y1 = area.box
    return np.asarray(Image.fromarray(generated).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
