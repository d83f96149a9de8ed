"""Layouts as data: parse_layout's checks, crop_layout following resize_to_bucket and flips, layouts from
an image folder's metadata.jsonl, and the exact layouts of shapes scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictor.data.buckets import cover_crop, resize_to_bucket
from pictor.data.folder import DatasetWarning, ImageFolderDataset
from pictor.data.layouts import MAX_BOXES, LayoutError, crop_layout, parse_layout
from pictor.data.shapes import ShapesDataset, scene_layout
from pictor.eval.shapes_detect import detect_objects


def test_parse_layout_normalises_good_layouts() -> None:
    text = '[{"box": [0, 0.25, 0.5, 1], "phrase": "  a red circle "}]'
    assert parse_layout(text) == [{"box": [0.0, 0.25, 0.5, 1.0], "phrase": "a red circle"}]
    assert parse_layout([{"box": (0.1, 0.1, 0.2, 0.2), "phrase": "x"}])[0]["box"] == [0.1, 0.1, 0.2, 0.2]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{]", "not valid JSON"),
        ([], "non-empty list"),
        ({"box": [0, 0, 1, 1]}, "non-empty list"),
        ([{"box": [0, 0, 1, 1], "phrase": "a", "x": 1}], "'box' and 'phrase'"),
        ([{"phrase": "a"}], "'box' and 'phrase'"),
        ([{"box": [0, 0, 1, 1]}], "'phrase' must be a non-empty string"),
        ([{"box": [0, 0, 1, 1], "phrase": "  "}], "'phrase' must be a non-empty string"),
        ([{"box": [0, 0, 1], "phrase": "a"}], "four numbers"),
        ([{"box": [0, 0, True, 1], "phrase": "a"}], "four numbers"),
        ([{"box": [0, 0, float("nan"), 1], "phrase": "a"}], "four numbers"),
        ([{"box": [0.5, 0, 0.5, 1], "phrase": "a"}], "0 <= x0 < x1 <= 1"),
        ([{"box": [0, 0, 64, 64], "phrase": "a"}], "divide pixel coordinates"),
        ([{"box": [0, 0.9, 1, 0.1], "phrase": "a"}], "y grows downward"),
        ([{"box": [0, 0, 1, 1], "phrase": "a"}] * (MAX_BOXES + 1), f"at most {MAX_BOXES}"),
    ],
)
def test_parse_layout_names_the_problem(value: object, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        parse_layout(value)


def _box_image(size: tuple[int, int], box: list[float]) -> Image.Image:
    """A black image with the box filled white (box in fractions of the image)."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[round(box[1] * h) : round(box[3] * h), round(box[0] * w) : round(box[2] * w)] = 255
    return Image.fromarray(arr)


def _white_extent(img: Image.Image) -> list[float]:
    ys, xs = np.nonzero(np.asarray(img.convert("L")) > 127)
    w, h = img.size
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


@pytest.mark.parametrize("flip", [False, True])
def test_crop_layout_follows_the_pixels(flip: bool) -> None:
    # A 200x100 image into a 64x64 bucket: resized to 128x64, the centre 64 columns kept.
    box = [0.3, 0.2, 0.6, 0.9]
    img = _box_image((200, 100), box)
    bucket = (64, 64)
    out = resize_to_bucket(img, bucket)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    resized, crop = cover_crop(img.size, bucket)
    moved = crop_layout([{"box": box, "phrase": "p"}], resized, crop, flip)
    assert moved[0]["phrase"] == "p"
    np.testing.assert_allclose(moved[0]["box"], _white_extent(out), atol=1.5 / 64)


def test_crop_layout_clips_and_drops_boxes_outside_the_crop() -> None:
    resized, crop = cover_crop((200, 100), (64, 64))  # keeps x from 0.25 to 0.75 of the image
    layout = [{"box": [0.0, 0.0, 0.2, 1.0], "phrase": "gone"}, {"box": [0.0, 0.0, 0.5, 0.5], "phrase": "cut"}]
    moved = crop_layout(layout, resized, crop)
    assert [m["phrase"] for m in moved] == ["cut"]
    assert moved[0]["box"] == pytest.approx([0.0, 0.0, 0.5, 0.5])


def test_folder_items_carry_their_layouts_moved_and_bad_layouts_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    box = [0.1, 0.2, 0.4, 0.7]
    _box_image((96, 48), box).save(root / "wide.png")
    _box_image((32, 32), box).save(root / "plain.png")
    _box_image((32, 32), box).save(root / "bad.png")
    lines = [
        {"file_name": "wide.png", "text": "a box", "layout": [{"box": box, "phrase": "a white box"}]},
        {"file_name": "bad.png", "text": "junk", "layout": [{"box": [0, 0, 2, 1], "phrase": "x"}]},
        {"file_name": "plain.png", "text": "no layout"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.warns(DatasetWarning, match="layout ignored"):
        ds = ImageFolderDataset(root, size=32, buckets=False)
    by_name = {Path(p).name: i for i, p in enumerate(ds.paths)}
    assert ds.layouts[by_name["plain.png"]] is None and ds.layouts[by_name["bad.png"]] is None
    assert ds.captions[by_name["bad.png"]] == "junk"  # the caption stays, only the layout is dropped
    item = ds[by_name["wide.png"]]
    pixels = Image.fromarray(((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    np.testing.assert_allclose(item["layout"][0]["box"], _white_extent(pixels), atol=1.5 / 32)
    assert "layout" not in ds[by_name["plain.png"]]


@pytest.mark.parametrize("size", [64, (96, 64)])
def test_shapes_layouts_are_the_objects_bounding_boxes(size: int | tuple[int, int]) -> None:
    ds = ShapesDataset(seed=3, size=size)
    for i in range(20):
        image, _, spec = ds[i]
        h, w = image.shape[:2]
        found = sorted(
            (f"a {d.color} {d.shape}", [d.bbox[0] / w, d.bbox[1] / h, d.bbox[2] / w, d.bbox[3] / h])
            for d in detect_objects(image)
        )
        want = sorted((b["phrase"], b["box"]) for b in spec["layout"])
        assert [f[0] for f in found] == [b[0] for b in want], i
        for (_, got), (_, box) in zip(found, want, strict=True):
            # The rendered pixels fill the box to within a pixel (anti-aliased edges).
            np.testing.assert_allclose(got, box, atol=1.5 / min(w, h))


def test_scene_layout_is_clipped_to_the_canvas() -> None:
    from pictor.data.shapes import Scene, ShapeObject

    scene = Scene([ShapeObject("square", "red", 0.05, 0.5, 0.3)])
    (item,) = scene_layout(scene, 64)
    assert item["box"][0] == 0.0 and item["box"][2] == pytest.approx(0.2)
