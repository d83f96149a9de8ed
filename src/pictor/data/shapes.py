"""The procedural shapes world (benchmarks/SHAPES.md): scene sampling, ground-truth scenes for benchmark
specs, captions, and an infinite, index-addressable dataset.

A *spec* is the benchmark's JSON record: {"tag", "objects": [{"shape", "color", "count"}], "relation":
null | {"a", "b", "rel"}}; specs drawn here also carry "background" (a BACKGROUNDS name). Every scene
drawn from a spec contains exactly the objects the spec lists, nothing else, so a caption of the spec
is a complete description of the image.
"""

from __future__ import annotations

import numpy as np

from pictor.data.shapes_captions import caption
from pictor.data.shapes_render import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    PALETTE,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    half_extent,
    render,
    unit_vertices,
)

__all__ = [
    "BACKGROUNDS",
    "COUNTS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "TAGS",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "caption",
    "render",
    "sample_scene",
    "scene_from_spec",
    "scene_layout",
]

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# How often each kind of content is drawn for training; relations and counts are the hard parts.
_TAG_WEIGHTS = {
    "single_object": 0.12,
    "colors": 0.12,
    "two_object": 0.16,
    "color_attr": 0.16,
    "counting": 0.20,
    "position": 0.24,
}

# Layout constants, in units of the shorter canvas side.
GAP = 0.04  # minimum empty space between two objects' bounding boxes (>= 2 px at 64x64)
BORDER = 0.03  # objects keep off the canvas edge, so the border is pure background
MAX_OBJECTS = 4  # objects in one scene (SHAPES.md)
MIN_SIZE = 0.2  # unrotated width; a triangle's height is 0.866 of it, so every bbox side >= 0.17 > 0.15
MAX_ANGLE = 20.0  # degrees; small tilts keep "square" and "triangle" reading as such
REL_MARGIN = 0.15  # centroid separation along a relation's axis (the scorer needs only 0.05)
_MAX_SIZE = {1: 0.6, 2: 0.42, 3: 0.34, 4: 0.3}


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _relation_holds(a: ShapeObject, b: ShapeObject, rel: str) -> bool:
    """True when a stands in `rel` to b clearly: REL_MARGIN along the axis, and that axis dominates."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # positive: b is right of / below a
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along >= REL_MARGIN and abs(across) <= 0.6 * along


def _separated(o: ShapeObject, ext: tuple[float, float], placed: list[tuple[ShapeObject, tuple]]) -> bool:
    """Bounding boxes at least GAP apart along x or y (so the shapes never touch)."""
    hx, hy = ext
    for p, (px, py) in placed:
        if abs(o.cx - p.cx) < hx + px + GAP and abs(o.cy - p.cy) < hy + py + GAP:
            return False
    return True


def _layout(
    items: list[tuple[str, str]], rng: np.random.Generator, relation: dict | None
) -> list[ShapeObject]:
    """Rejection-sample sizes and positions for (shape, color) items; shrink sizes when crowded."""
    n = len(items)
    hi = _MAX_SIZE[min(max(n, 1), 4)]
    for attempt in range(400):
        # Crowded layouts that keep failing get smaller objects, never below MIN_SIZE.
        top = max(MIN_SIZE, hi - (hi - MIN_SIZE) * min(1.0, attempt / 100))
        placed: list[tuple[ShapeObject, tuple[float, float]]] = []
        for shape, color in items:
            size = float(rng.uniform(MIN_SIZE, top))
            angle = 0.0 if shape == "circle" else float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
            obj = ShapeObject(shape, color, 0.5, 0.5, size, angle)
            hx, hy = half_extent(obj)
            for _ in range(30):
                obj.cx = float(rng.uniform(BORDER + hx, 1 - BORDER - hx))
                obj.cy = float(rng.uniform(BORDER + hy, 1 - BORDER - hy))
                if _separated(obj, (hx, hy), placed):
                    placed.append((obj, (hx, hy)))
                    break
            else:
                break
        if len(placed) < n:
            continue
        objs = [p for p, _ in placed]
        if relation and not _relation_holds(objs[relation["a"]], objs[relation["b"]], relation["rel"]):
            continue
        return objs
    raise RuntimeError(f"could not lay out {items} with relation {relation}")


def scene_from_spec(
    spec: dict, rng: np.random.Generator, background: tuple[int, int, int] | None = None
) -> Scene:
    """A scene that satisfies a benchmark spec: exact counts, and its relation with a clear margin.

    Background: `background` if given, else spec["background"] (a BACKGROUNDS name), else a random light tone.
    """
    items: list[tuple[str, str]] = []
    first: list[int] = []  # index in `items` of each spec object's first instance
    for o in spec["objects"]:
        if o["shape"] not in SHAPES or o["color"] not in PALETTE:
            raise ValueError(f"spec object {o} is outside the vocabulary")
        first.append(len(items))
        items.extend([(o["shape"], o["color"])] * int(o.get("count", 1)))
    if not 1 <= len(items) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, spec asks for {len(items)}")
    rel = spec.get("relation")
    relation = None
    if rel:
        if rel["rel"] not in RELATIONS:
            raise ValueError(f"unknown relation {rel['rel']!r}")
        relation = {"a": first[rel["a"]], "b": first[rel["b"]], "rel": rel["rel"]}
        # Place the related pair first so the others cannot crowd them out of a valid layout.
        lead = [relation["a"], relation["b"]]
        order = lead + [i for i in range(len(items)) if i not in lead]
        items = [items[i] for i in order]
        relation = {"a": 0, "b": 1, "rel": rel["rel"]}
    if background is None:
        name = spec.get("background") or _pick(rng, list(BACKGROUNDS))
        background = BACKGROUNDS[name]
    return Scene(_layout(items, rng, relation), tuple(background))


def _distinct_pair(rng: np.random.Generator, same_shape_ok: bool, same_color_ok: bool) -> list[dict]:
    while True:
        a = {"shape": _pick(rng, SHAPES), "color": _pick(rng, COLORS), "count": 1}
        b = {"shape": _pick(rng, SHAPES), "color": _pick(rng, COLORS), "count": 1}
        if (a["shape"], a["color"]) == (b["shape"], b["color"]):
            continue
        if (same_shape_ok or a["shape"] != b["shape"]) and (same_color_ok or a["color"] != b["color"]):
            return [a, b]


def sample_spec(rng: np.random.Generator, tag: str | None = None) -> dict:
    """A random training spec of one of the six benchmark kinds (`tag`, or drawn by _TAG_WEIGHTS)."""
    if tag is None:
        tags = list(_TAG_WEIGHTS)
        tag = tags[int(rng.choice(len(tags), p=np.array(list(_TAG_WEIGHTS.values()))))]
    relation = None
    if tag in ("single_object", "colors"):
        objects = [{"shape": _pick(rng, SHAPES), "color": _pick(rng, COLORS), "count": 1}]
    elif tag == "color_attr":
        objects = _distinct_pair(rng, same_shape_ok=False, same_color_ok=False)
    elif tag == "two_object":
        objects = _distinct_pair(rng, same_shape_ok=False, same_color_ok=True)
        if rng.random() < 0.25:  # sometimes three different objects
            while len(objects) < 3:
                o = {"shape": _pick(rng, SHAPES), "color": _pick(rng, COLORS), "count": 1}
                if all((o["shape"], o["color"]) != (p["shape"], p["color"]) for p in objects):
                    objects.append(o)
    elif tag == "counting":
        if rng.random() < 0.7:
            objects = [
                {"shape": _pick(rng, SHAPES), "color": _pick(rng, COLORS), "count": int(rng.integers(2, 5))}
            ]
        else:  # a group plus other objects: "three red stars and a blue circle"
            objects = _distinct_pair(rng, same_shape_ok=True, same_color_ok=True)
            objects[0]["count"] = int(rng.integers(2, 4))
            objects[1]["count"] = int(rng.integers(1, 5 - objects[0]["count"]))
    elif tag == "position":
        objects = _distinct_pair(rng, same_shape_ok=True, same_color_ok=True)
        relation = {"a": 0, "b": 1, "rel": _pick(rng, RELATIONS)}
    else:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    return {"tag": tag, "objects": objects, "relation": relation, "background": _pick(rng, list(BACKGROUNDS))}


def sample_scene(rng: np.random.Generator, tag: str | None = None) -> tuple[Scene, dict]:
    """A random scene and the spec it satisfies exactly (the spec lists every object in the scene)."""
    spec = sample_spec(rng, tag)
    return scene_from_spec(spec, rng), spec


def scene_layout(scene: Scene, size: int | tuple[int, int] = 64) -> list[dict]:
    """Each object's bounding box (fractions of the canvas, y down) with its phrase ("a red circle"): the
    exact layout of the scene, in the form layout conditioning takes (`pictor.layout_files`)."""
    width, height = (size, size) if isinstance(size, int) else size
    short = min(width, height)
    out = []
    for obj in scene.objects:
        if obj.shape == "circle":
            lo, hi = np.full(2, -obj.size / 2), np.full(2, obj.size / 2)
        else:  # a triangle or star is not centred on its centroid: the extent of its rotated vertices
            verts = unit_vertices(obj.shape, obj.angle) * obj.size
            lo, hi = verts.min(axis=0), verts.max(axis=0)
        sx, sy = short / width, short / height
        box = [obj.cx + lo[0] * sx, obj.cy + lo[1] * sy, obj.cx + hi[0] * sx, obj.cy + hi[1] * sy]
        box = [round(min(max(float(v), 0.0), 1.0), 6) for v in box]
        out.append({"box": box, "phrase": f"a {obj.color} {obj.shape}"})
    return out


class ShapesDataset:
    """Infinite (image, caption, spec) stream; item i depends only on (seed, i), so a trainer can resume
    at any data position and any worker can produce any item."""

    def __init__(self, seed: int, size: int | tuple[int, int] = 64, supersample: int = 1) -> None:
        self.seed = int(seed)
        self.size = size
        self.supersample = supersample

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, dict]:
        if index < 0:
            raise IndexError("ShapesDataset is infinite; negative indices have no meaning")
        rng = np.random.default_rng([self.seed, int(index)])
        scene, spec = sample_scene(rng)
        text = caption(spec, rng)
        spec["prompt"] = text
        spec["layout"] = scene_layout(scene, self.size)
        return render(scene, self.size, self.supersample), text, spec

    def batch(self, start: int, n: int) -> tuple[np.ndarray, list[str], list[dict]]:
        """Items start..start+n-1 -> (uint8 [n, H, W, 3], captions, specs)."""
        items = [self[i] for i in range(start, start + n)]
        return np.stack([it[0] for it in items]), [it[1] for it in items], [it[2] for it in items]
