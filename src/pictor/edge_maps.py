"""Canny edge maps that equal OpenCV's ``cv2.Canny`` bit for bit, for FLUX.1 Canny control pictures.

FLUX.1 Canny [dev] was trained on control pictures made by BFL's reference code (the flux repo's
``CannyImageEncoder``): the RGB uint8 picture, resized to the generation size, goes through
``cv2.Canny(pixels, 50, 200)`` and the 0/255 edge map is fed as a 3-channel image. A control
picture that differs from OpenCV's in a few pixels is a different condition, so this module
reproduces OpenCV's algorithm exactly (aperture 3, L1 gradient) with numpy alone, keeping OpenCV
out of pictor's run-time dependencies:

1. 3x3 Sobel ``dx``, ``dy`` per channel with ``BORDER_REPLICATE`` (what ``cv2.Canny`` passes).
2. L1 magnitude ``|dx| + |dy|``; for multi-channel pictures each pixel takes ``dx``, ``dy`` and the
   magnitude of its first channel with the largest magnitude.
3. Non-maximum suppression with OpenCV's integer tangent test (``TG22`` in 15-bit fixed point)
   and its mix of strict and non-strict comparisons; outside the picture the magnitude is 0.
4. Double threshold on ``floor(threshold)`` with strict ``>``, then hysteresis: a weak pixel is
   an edge when it is 8-connected, through weak pixels, to a strong one.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

__all__ = ["canny_control_picture", "canny_edges"]

# OpenCV's canny.cpp: tan(22.5 deg) in Q15 fixed point, so the sector test is exact integer math.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)

# The reference recipe (flux repo, CannyImageEncoder) calls cv2.Canny(img, 50, 200).
FLUX_CANNY_LOW = 50
FLUX_CANNY_HIGH = 200
# What ControlNets' edges are drawn with: diffusers' ControlNet examples' cv2.Canny(image, 100, 200) on the
# picture as it is (`pictor preprocess canny`'s default, and what `pictor train controlnet` draws).
CONTROLNET_CANNY = (100.0, 200.0)


def _check_threshold(name: str, value: float) -> float:
    # bool is an int subclass; a True threshold is surely a mistake, not the number 1.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"canny_edges: {name} threshold must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"canny_edges: {name} threshold must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"canny_edges: {name} threshold must be >= 0, got {value!r}")
    return value


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"canny_edges: pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"canny_edges: pixels must be uint8 (as cv2.Canny requires), got {pixels.dtype}")
    if pixels.ndim not in (2, 3):
        raise ValueError(f"canny_edges: pixels must be [H, W] or [H, W, C], got shape {pixels.shape}")
    # OpenCV would take any channel count, but more than 4 is almost surely a [C, H, W] tensor.
    if pixels.ndim == 3 and not 1 <= pixels.shape[2] <= 4:
        raise ValueError(f"canny_edges: pixels must have 1 to 4 channels, got shape {pixels.shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"canny_edges: pixels must not be empty, got shape {pixels.shape}")
    return pixels if pixels.ndim == 3 else pixels[:, :, None]


def _sobel3(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of [H, W, C] uint8 with replicated borders -> int32 [H, W, C] each."""
    p = np.pad(pixels.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")  # [H+2, W+2, C]
    # Separable: a [1, 2, 1] smoothing across the derivative direction, [-1, 0, 1] along it.
    cols = p[:, 2:] - p[:, :-2]  # [H+2, W, C] horizontal difference
    dx = cols[:-2] + 2 * cols[1:-1] + cols[2:]
    rows = p[2:] - p[:-2]  # [H, W+2, C] vertical difference
    dy = rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]
    return dx, dy


def _strongest_channel(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the gradient of the channel with the largest L1 magnitude -> [H, W] each."""
    mag = np.abs(dx) + np.abs(dy)  # [H, W, C]
    if mag.shape[2] == 1:
        return dx[:, :, 0], dy[:, :, 0], mag[:, :, 0]
    # OpenCV scans channels with a strict ">", so ties go to the first channel, as argmax does.
    best = np.argmax(mag, axis=2)[:, :, None]  # [H, W, 1]

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, best, axis=2)[:, :, 0]

    return take(dx), take(dy), take(mag)


def _non_max_suppression(dx: np.ndarray, dy: np.ndarray, mag: np.ndarray, low: int) -> np.ndarray:
    """Pixels above ``low`` that are a local maximum across the edge, by OpenCV's exact tests."""
    m = np.pad(mag, 1)  # outside the picture the magnitude is 0, as in OpenCV's ring buffer
    centre = m[1:-1, 1:-1]
    up, down = m[:-2, 1:-1], m[2:, 1:-1]
    left, right = m[1:-1, :-2], m[1:-1, 2:]

    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << _CANNY_SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_CANNY_SHIFT + 1))
    horizontal = y < tg22x  # gradient within 22.5 deg of the x axis: compare left/right
    vertical = ~horizontal & (y > tg67x)  # within 22.5 deg of the y axis: compare up/down
    diagonal = ~horizontal & ~vertical

    # The asymmetric ">" then ">=" keeps exactly one pixel of a two-pixel plateau, as OpenCV does.
    keep = horizontal & (centre > left) & (centre >= right)
    keep |= vertical & (centre > up) & (centre >= down)
    # Same signs (s = +1, zero counts as positive): the gradient runs along the main diagonal, so
    # compare up-left and down-right; opposite signs: up-right and down-left. Both strict here.
    same_sign = (dx ^ dy) >= 0
    up_left, down_right = m[:-2, :-2], m[2:, 2:]
    up_right, down_left = m[:-2, 2:], m[2:, :-2]
    main = (centre > up_left) & (centre > down_right)
    anti = (centre > up_right) & (centre > down_left)
    keep |= diagonal & np.where(same_sign, main, anti)
    keep &= centre > low
    return keep


def _components_with_seed(candidate: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Candidate pixels 8-connected (through candidates) to a seed pixel: the hysteresis step.

    OpenCV floods from each strong pixel with a stack; the set it reaches is exactly the union of
    the 8-connected components of candidates that hold a strong pixel. We label those components
    with a vectorised union-find (hook larger roots onto smaller ones, then pointer-jump), which
    takes O(log n) rounds however long and winding the edges are.
    """
    h, w = candidate.shape
    flat = np.flatnonzero(candidate)
    if flat.size == 0:
        return candidate
    index = np.full(h * w, -1, dtype=np.int64)  # pixel -> compact candidate id
    index[flat] = np.arange(flat.size)
    grid = index.reshape(h, w)

    # Each undirected 8-neighbour link once: right, down, down-right, down-left.
    pairs = []
    for a, b in (
        (grid[:, :-1], grid[:, 1:]),
        (grid[:-1, :], grid[1:, :]),
        (grid[:-1, :-1], grid[1:, 1:]),
        (grid[:-1, 1:], grid[1:, :-1]),
    ):
        both = (a >= 0) & (b >= 0)
        pairs.append((a[both], b[both]))
    src = np.concatenate([p[0] for p in pairs])
    dst = np.concatenate([p[1] for p in pairs])

    parent = np.arange(flat.size, dtype=np.int64)
    while src.size:
        ra, rb = parent[src], parent[dst]
        open_link = ra != rb  # a link whose ends share a root stays inside one component for good
        src, dst, ra, rb = src[open_link], dst[open_link], ra[open_link], rb[open_link]
        if not src.size:
            break
        # Every parent is a root here, so hooking the larger root under the smaller never loops.
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # pointer jumping until every pixel points straight at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand

    seeded = np.zeros(flat.size, dtype=bool)
    seeded[parent[seed.ravel()[flat]]] = True
    out = np.zeros(h * w, dtype=bool)
    out[flat] = seeded[parent]
    return out.reshape(h, w)


def canny_edges(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges equal to ``cv2.Canny(pixels, low, high)`` (aperture 3, L1 gradient).

    ``pixels`` is uint8 [H, W] or [H, W, C] with 1 to 4 channels (for several channels the
    per-pixel strongest channel decides, as in OpenCV). Thresholds are in L1-magnitude units;
    as in OpenCV, they are swapped when ``low > high``, and a magnitude must be strictly above
    one to pass it. Returns uint8 [H, W] with 0 (no edge) and 255 (edge).
    """
    pixels = _check_pixels(pixels)
    low = _check_threshold("low", low)
    high = _check_threshold("high", high)
    if low > high:
        low, high = high, low  # OpenCV swaps too, so the order of the two numbers never matters
    # OpenCV compares integer magnitudes against cvFloor(threshold); above any reachable
    # magnitude (max 2040) a threshold just means "nothing passes", and the cap keeps the int
    # conversion sane where OpenCV's own would overflow.
    low_i = math.floor(min(low, 1 << 20))
    high_i = math.floor(min(high, 1 << 20))

    dx, dy = _sobel3(pixels)
    dx, dy, mag = _strongest_channel(dx, dy)
    candidate = _non_max_suppression(dx, dy, mag, low_i)
    strong = candidate & (mag > high_i)
    edges = _components_with_seed(candidate, strong)
    return edges.astype(np.uint8) * np.uint8(255)


def canny_control_picture(
    pixels_rgb_uint8: np.ndarray, low: float = FLUX_CANNY_LOW, high: float = FLUX_CANNY_HIGH
) -> np.ndarray:
    """The control picture FLUX.1 Canny [dev] reads: the 0/255 edge map as uint8 [H, W, 3].

    Resize the picture to the generation size first, as BFL's ``CannyImageEncoder`` does;
    edges found at another size and then resized are not what the model was trained on.
    """
    if (
        not isinstance(pixels_rgb_uint8, np.ndarray)
        or pixels_rgb_uint8.ndim != 3
        or pixels_rgb_uint8.shape[2] != 3
    ):
        shape = getattr(pixels_rgb_uint8, "shape", None)
        raise ValueError(
            f"canny_control_picture: pixels must be an RGB uint8 [H, W, 3] array, got shape {shape}"
        )
    edges = canny_edges(pixels_rgb_uint8, low, high)  # [H, W]
    return np.repeat(edges[:, :, None], 3, axis=2)  # [H, W, 3]
