"""The shapes world's vocabulary, scene objects and an exact rasterizer (benchmarks/SHAPES.md).

Geometry is kept in normalized canvas units so one scene renders at any size: x is a fraction of the
width, y a fraction of the height (y grows downward), and an object's `size` is a fraction of the
*shorter* canvas side, so circles stay round on non-square canvases.

Rendering samples pixel centres with no anti-aliasing by default: every pixel is either exactly the
background or exactly one palette colour, which makes ground truth unambiguous for the scorer.
`supersample > 1` gives box-filtered anti-aliased edges for nicer-looking training images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

COUNTS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
COUNT_WORDS: dict[int, str] = {v: k for k, v in COUNTS.items()}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Light, low-saturation tones: every one is > 150 RGB units from every palette colour (a test checks),
# so background and objects never blur into each other in the scorer's eyes.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (228, 228, 228),
    "cream": (250, 242, 222),
    "pale blue": (222, 234, 250),
    "pale green": (224, 242, 224),
    "pale pink": (250, 228, 234),
}

# Inner/outer radius of the five-pointed star; chunkier than the classic 0.382 so that arms survive
# rasterization at 64x64 and the shape stays clearly non-convex.
STAR_INNER = 0.45


@dataclass
class ShapeObject:
    """One solid shape. cx, cy: centroid as fractions of width/height; size: width of the unrotated
    shape as a fraction of the shorter canvas side; angle: rotation in degrees (clockwise on screen)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float
    angle: float = 0.0


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: tuple[int, int, int] = BACKGROUNDS["white"]


@cache
def _base_vertices(shape: str) -> tuple[tuple[float, float], ...]:
    """Unrotated polygon of unit width centred on its centroid; y grows down."""
    if shape == "square":
        return ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))
    if shape == "triangle":
        # Equilateral, apex up; the circumcentre is the centroid, so cx/cy is where the scorer measures.
        r = 1.0 / math.sqrt(3.0)
        return tuple((r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150))
    if shape == "star":
        r_out = 0.5 / math.sin(math.radians(72.0))  # tip-to-tip width = 1
        return tuple(
            (
                (r_out if k % 2 == 0 else r_out * STAR_INNER) * math.cos(math.radians(-90.0 + 36.0 * k)),
                (r_out if k % 2 == 0 else r_out * STAR_INNER) * math.sin(math.radians(-90.0 + 36.0 * k)),
            )
            for k in range(10)
        )
    if shape == "circle":
        return tuple(
            (0.5 * math.cos(a), 0.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 64, endpoint=False)
        )
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def unit_vertices(shape: str, angle: float = 0.0) -> np.ndarray:
    """Polygon vertices [N, 2] (x, y) of a unit-width shape rotated by `angle` degrees (a circle: 64-gon)."""
    v = np.asarray(_base_vertices(shape), dtype=np.float64)
    t = math.radians(angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return v @ rot.T


def half_extent(obj: ShapeObject) -> tuple[float, float]:
    """Half width and half height of the object's bounding box, in units of the shorter side."""
    if obj.shape == "circle":
        return obj.size / 2, obj.size / 2
    # Plain Python: scene sampling calls this in its rejection loop, where numpy overhead dominates.
    c, s = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    verts = _base_vertices(obj.shape)
    hx = max(abs(x * c - y * s) for x, y in verts)
    hy = max(abs(x * s + y * c) for x, y in verts)
    return hx * obj.size, hy * obj.size


def _canvas_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """-> (width, height). An int is a square canvas; a tuple is (width, height), as in PIL."""
    if isinstance(size, int):
        return size, size
    w, h = size
    return int(w), int(h)


def _inside_polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule over all polygon edges, vectorized over pixels (works for the concave star)."""
    inside = np.zeros(np.broadcast(px, py).shape, dtype=bool)
    x0, y0 = verts[:, 0], verts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
        if b == d:
            continue
        crosses = (b > py) != (d > py)
        x_at = a + (py - b) * (c - a) / (d - b)
        inside ^= crosses & (px < x_at)
    return inside


def render(scene: Scene, size: int | tuple[int, int], supersample: int = 1) -> np.ndarray:
    """Rasterize a scene -> uint8 [H, W, 3]. `size` is an int or (width, height)."""
    w, h = _canvas_size(size)
    s = max(1, int(supersample))
    W, H, unit = w * s, h * s, min(w, h) * s
    canvas = np.empty((H, W, 3), dtype=np.uint8)
    canvas[:] = scene.background
    for obj in scene.objects:
        cx, cy = obj.cx * W, obj.cy * H
        hx, hy = half_extent(obj)
        # Only the object's bounding box is tested, which keeps rendering at ~0.1 ms per object.
        x0, x1 = max(0, math.floor(cx - hx * unit)), min(W, math.ceil(cx + hx * unit) + 1)
        y0, y1 = max(0, math.floor(cy - hy * unit)), min(H, math.ceil(cy + hy * unit) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - cx
        py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - cy
        if obj.shape == "circle":
            r = obj.size * unit / 2
            mask = px * px + py * py <= r * r
        else:
            mask = _inside_polygon(px, py, unit_vertices(obj.shape, obj.angle) * obj.size * unit)
        canvas[y0:y1, x0:x1][mask] = PALETTE[obj.color]
    if s == 1:
        return canvas
    # Box filter down to the target size: edge pixels become exact blends of object and background.
    small = canvas.reshape(h, s, w, s, 3).astype(np.float32).mean(axis=(1, 3))
    return np.rint(small).astype(np.uint8)
