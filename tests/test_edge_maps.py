"""pictor.edge_maps must equal cv2.Canny exactly: FLUX.1 Canny was trained on OpenCV's edge maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pictor.edge_maps import canny_control_picture, canny_edges

# (low, high): BFL's recipe, zero, equal, swapped, fractional, above every reachable magnitude.
THRESHOLDS = [(50, 200), (0, 0), (0, 30), (100, 100), (200, 50), (12.7, 80.2), (2039.5, 2040), (3000, 5000)]


def _photo_like(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    """Smooth regions, soft and hard edges and a little sensor noise, like a resized photo."""
    small = rng.integers(0, 256, (max(2, h // 12), max(2, w // 12), channels), dtype=np.uint8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
    big = big.astype(np.int16)
    big[: h // 2, : w // 3] = 40  # a flat block with a hard border
    big += rng.integers(-6, 7, big.shape, dtype=np.int16)
    pixels = np.clip(big, 0, 255).astype(np.uint8)
    return pixels[:, :, 0] if channels == 1 else pixels


def _images() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    images = []
    for h, w in [(1, 1), (2, 3), (3, 2), (1, 7), (7, 1), (4, 4), (37, 53)]:
        images.append((f"noise-gray-{h}x{w}", rng.integers(0, 256, (h, w), dtype=np.uint8)))
        images.append((f"noise-rgb-{h}x{w}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    # Few levels make many equal magnitudes, which exercises the strict/non-strict comparisons.
    images.append(("levels-rgb", (rng.integers(0, 3, (41, 29, 3)) * 60).astype(np.uint8)))
    images.append(("levels-gray", (rng.integers(0, 2, (30, 31)) * 255).astype(np.uint8)))
    images.append(("photo-gray", _photo_like(rng, 97, 131, 1)))
    images.append(("photo-rgb", _photo_like(rng, 96, 128, 3)))
    images.append(("noise-rgba", rng.integers(0, 256, (23, 19, 4), dtype=np.uint8)))
    images.append(("one-channel-hw1", rng.integers(0, 256, (17, 15, 1), dtype=np.uint8)))
    images.append(("flat-rgb", np.full((16, 20, 3), 77, dtype=np.uint8)))
    images.append(("flat-gray", np.full((9, 5), 255, dtype=np.uint8)))
    return images


IMAGES = _images()


@pytest.mark.parametrize("name,pixels", IMAGES, ids=[name for name, _ in IMAGES])
def test_canny_edges_equal_opencv(name: str, pixels: np.ndarray) -> None:
    for low, high in THRESHOLDS:
        expected = cv2.Canny(pixels, low, high)
        got = canny_edges(pixels, low, high)
        assert got.dtype == np.uint8 and got.shape == pixels.shape[:2]
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} low={low} high={high}")


def test_comparisons_are_not_vacuous() -> None:
    # Equality with OpenCV means little if both give blank maps; the main cases must find edges.
    for name, pixels in IMAGES:
        if name.startswith(("photo", "levels", "noise-rgb-37")):
            assert cv2.Canny(pixels, 50, 200).any(), name
            assert not cv2.Canny(pixels, 50, 200).all(), name


def test_generation_size_rgb_equals_opencv() -> None:
    # The FLUX.1 Canny use: an RGB picture at generation size, thresholds 50 and 200.
    rng = np.random.default_rng(7)
    pixels = _photo_like(rng, 320, 448, 3)
    expected = cv2.Canny(pixels, 50, 200)
    assert 0.01 < (expected > 0).mean() < 0.5
    np.testing.assert_array_equal(canny_edges(pixels, 50, 200), expected)

    control = canny_control_picture(pixels)
    assert control.dtype == np.uint8 and control.shape == (320, 448, 3)
    np.testing.assert_array_equal(control, np.repeat(expected[:, :, None], 3, axis=2))


def test_long_winding_edges_equal_opencv() -> None:
    # Nested squares: edges thousands of pixels long, which a hysteresis with a fixed number of
    # dilation rounds would cut short.
    pixels = np.zeros((256, 256), dtype=np.uint8)
    for k in range(0, 128, 4):
        pixels[k : 256 - k, k : 256 - k] = 255 * ((k // 4) % 2 == 0)
    # A weak ramp joined to one strong step: only hysteresis keeps the weak part.
    pixels[200:, :] = np.clip(np.arange(256) * 3, 0, 255).astype(np.uint8)[None, :]
    for low, high in [(50, 200), (5, 1000), (1, 2000)]:
        np.testing.assert_array_equal(canny_edges(pixels, low, high), cv2.Canny(pixels, low, high))


def test_non_contiguous_view_equals_opencv() -> None:
    rng = np.random.default_rng(3)
    view = _photo_like(rng, 60, 80, 3)[::2, ::-1]
    expected = cv2.Canny(np.ascontiguousarray(view), 50, 200)
    np.testing.assert_array_equal(canny_edges(view, 50, 200), expected)


def test_numpy_scalar_thresholds() -> None:
    pixels = _photo_like(np.random.default_rng(5), 40, 40, 3)
    expected = cv2.Canny(pixels, 50, 200)
    np.testing.assert_array_equal(canny_edges(pixels, np.float32(50), np.int64(200)), expected)


@pytest.mark.parametrize(
    "pixels,match",
    [
        (np.zeros((8, 8), dtype=np.float32), "uint8"),
        (np.zeros((8, 8), dtype=np.int16), "uint8"),
        (np.zeros((8, 8), dtype=bool), "uint8"),
        (np.zeros(8, dtype=np.uint8), "shape"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "channels"),
        (np.zeros((8, 8, 0), dtype=np.uint8), "channels"),
        (np.zeros((0, 8), dtype=np.uint8), "empty"),
        (np.zeros((8, 0, 3), dtype=np.uint8), "empty"),
        ([[0, 1], [2, 3]], "numpy array"),
    ],
)
def test_bad_pixels_are_rejected(pixels: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        canny_edges(pixels, 50, 200)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "low,high,match",
    [
        (-1, 200, "low threshold must be >= 0"),
        (50, -0.5, "high threshold must be >= 0"),
        (float("nan"), 200, "low threshold must be finite"),
        (50, float("inf"), "high threshold must be finite"),
        (True, 200, "low threshold must be a real number"),
        (50, "200", "high threshold must be a real number"),
        (50, None, "high threshold must be a real number"),
    ],
)
def test_bad_thresholds_are_rejected(low: object, high: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        canny_edges(np.zeros((8, 8, 3), dtype=np.uint8), low, high)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 4), (3, 8, 8), (8, 8, 1)])
def test_control_picture_wants_rgb(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"RGB uint8 \[H, W, 3\]"):
        canny_control_picture(np.zeros(shape, dtype=np.uint8))
