"""Inpainting only the masked area (A1111's "Only masked"): the box around the mask, grown by the padding and
to the aspect ratio it is drawn at; drawn at the model's size; stitched back with every pixel outside the
mask kept; recorded and reproduced; refused where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pictor
from pictor import picture_runs
from pictor.cli import main
from pictor.edit_blending import composite, feather_weights
from pictor.editing import EditError, EditRequest
from pictor.inpaint_area import back_to_box, cut_out, cut_out_mask, plan_masked_area
from pictor.pipeline import Pipeline
from pictor.provenance import read_record, read_text_chunks, save_png
from pictor.reproduce import reproduce


def _mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_the_box_is_the_mask_grown_by_the_padding_then_to_the_work_aspect() -> None:
    mask = _mask((256, 256), (60, 100, 90, 140))  # 30 x 40
    area = plan_masked_area(mask, 32, 8, 64 * 64)
    # 94 x 104 with the padding; drawn at 56x64 (at most 4,096 pixels: each side rounded down), so the box
    # grows to 94 x 107 around it, one row up and two down
    assert (area.width, area.height) == (56, 64) and area.box == (28, 67, 122, 174)
    # a thin mask is drawn no more than 4 times as tall as wide (or wide as tall), the box grown to that
    pole = plan_masked_area(_mask((1024, 1024), (500, 300, 520, 875)), 32, 16, 1024 * 1024)
    assert (pole.width, pole.height) == (512, 2048) and pole.box == (430, 268, 590, 907)
    strip = plan_masked_area(_mask((1024, 1024), (0, 600, 1024, 610)), 32, 16, 1024 * 1024)
    assert (strip.width, strip.height) == (2048, 512) and strip.box == (0, 477, 1024, 733)
    assert plan_masked_area(mask, 0, 8, 64 * 64, size=(48, 64)).box == (60, 100, 90, 140)  # 30:40 is 48:64
    tall = plan_masked_area(mask, 0, 8, 64 * 64, size=(32, 64))
    assert tall.box == (60, 90, 90, 150)  # 30 wide: 60 tall for 1:2
    # at the picture's edge the box shifts inward instead of leaving the picture
    corner = plan_masked_area(_mask((100, 200), (0, 0, 10, 10)), 4, 8, 64 * 64, size=(64, 32))
    assert corner.box == (0, 0, 28, 14)
    assert plan_masked_area(_mask((40, 40), (0, 0, 40, 10)), 0, 8, 64 * 64, size=(16, 64)).box == (
        0,
        0,
        40,
        40,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": -1}, "mask padding must be a whole number of pixels >= 0, got -1"),
        ({"padding": 2.5}, "mask padding must be a whole number"),
        ({"size": (60, 64)}, "the inpaint size 60x64 must have both sides multiples of 8"),
        ({"size": (4096, 8192)}, "the most pictor makes is"),
        ({"size": (8, 64)}, "more than 4 times as wide as tall \\(or tall as wide\\)"),
        ({"size": (64,)}, "the inpaint size must be two whole numbers"),
    ],
)
def test_bad_area_settings_are_clear_errors(kwargs: dict, message: str) -> None:
    settings = {"padding": 32, "size": None, **kwargs}
    with pytest.raises(EditError, match=message):
        plan_masked_area(_mask((64, 64), (8, 8, 16, 16)), settings["padding"], 8, 4096, settings["size"])


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pictor.load("default", device="cpu")


def _picture(size: int = 160) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 128)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("padding", [32, 0])  # 0: the mask touches the box, and feathers from outside it
def test_the_area_is_drawn_at_the_model_size_and_stitched_back(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, padding: int
) -> None:
    picture, mask = _picture(), _mask((160, 160), (70, 40, 100, 80))
    drawn: list[np.ndarray] = []
    stitch = picture_runs._stitch

    def spy(generated: list[Image.Image], inputs):  # type: ignore[no-untyped-def]
        drawn.extend(np.asarray(g) for g in generated)
        return stitch(generated, inputs)

    monkeypatch.setattr(picture_runs, "_stitch", spy)
    request = EditRequest(
        picture, "a red circle", mask=Image.fromarray(mask), inpaint_area="masked", mask_padding=padding,
        feather=3, seed=3, steps=4,
    )  # fmt: skip
    (image,) = pipe.edit(request)
    out, src = np.asarray(image.image), np.asarray(picture)
    assert image.image.size == (160, 160)
    np.testing.assert_array_equal(out[~mask], src[~mask])  # outside the mask: the picture, exactly
    assert np.abs(out[mask].astype(int) - src[mask]).mean() > 10
    record = image.record
    assert record["inpaint_area"] == "masked" and record["mask_padding"] == padding
    area = plan_masked_area(mask, padding, pipe.patch, 64 * 64)
    # at most 4,096 pixels in the box's aspect ratio: 56x64 for the padded box, 48x72 for the bare 30 x 40
    assert (area.width, area.height) == ((56, 64) if padding else (48, 72))
    assert (record["width"], record["height"]) == (area.width, area.height)  # A1111's Size is it too
    assert record["crop"] == list(area.box) and drawn[0].shape == (area.height, area.width, 3)

    # what was drawn is the inpainting of the cut-out area at that size (with the same seed) ...
    x0, y0, x1, y1 = area.box
    cut_mask = cut_out_mask(area)
    whole = EditRequest(Image.fromarray(cut_out(src, area)), "a red circle", mask=Image.fromarray(cut_mask),
                        feather=0, seed=3, steps=4)  # fmt: skip
    (plain,) = pipe.edit(whole)
    np.testing.assert_array_equal(np.asarray(plain.image)[cut_mask], drawn[0][cut_mask])
    # ... and the result is it resized back and blended in with the mask feathered at the picture's size
    weights = feather_weights(mask, 3)[y0:y1, x0:x1]
    want = composite(back_to_box(drawn[0], area), src[y0:y1, x0:x1], weights)
    np.testing.assert_array_equal(out[y0:y1, x0:x1], want)


def test_strength_0_keeps_the_picture_and_records_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    picture, mask = _picture(), Image.fromarray(_mask((160, 160), (20, 30, 60, 50)).astype(np.uint8) * 255)
    settings = {"mask": mask, "inpaint_area": "masked", "seed": 5, "steps": 3}
    (kept,) = pipe.edit(EditRequest(picture, "a blue square", strength=0, **settings))
    np.testing.assert_array_equal(np.asarray(kept.image), np.asarray(picture))

    (image,) = pipe.edit(EditRequest(picture, "a blue square", mask_padding=8, **settings))
    path = save_png(image.image, image.record, tmp_path / "area.png")
    text = read_text_chunks(path)["parameters"]  # 56 x 36 with the padding: drawn at 72x48 (3,456 pixels)
    assert "Size: 72x48" in text and "Inpaint area: Only masked, Masked area padding: 8" in text
    defaults = dict(pipe.defaults)
    try:  # the size it was drawn at comes from the record, not from the model's defaults of today
        pipe.defaults.update(width=128, height=128)
        again = reproduce(pipe, read_record(path), source=picture, mask=mask)
    finally:
        pipe.defaults.clear()
        pipe.defaults.update(defaults)
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(image.image))
    assert image.record["mask_padding"] == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask": None}, "inpaint area 'masked' inpaints around a mask: give a mask"),
        ({"expand": (0, 0, 8, 0)}, "give a mask \\(and no expand; outpaint first\\)"),
        ({"upscale": 2}, "either enlarges its source \\(upscale\\) or inpaints only the masked area"),
        ({"layout": [{"box": [0, 0, 1, 1], "phrase": "x"}]}, "layout boxes cover the whole image"),
        ({"inpaint_area": "box"}, "unknown inpaint area 'box'; choose one of whole, masked"),
        ({"inpaint_area": "whole", "mask_padding": 8}, "^mask padding shapes .* add inpaint area 'masked'"),
        ({"inpaint_area": "whole", "inpaint_size": (64, 64)}, "^inpaint size shapes .* or drop it"),
        ({"context_image": np.zeros((8, 8, 3), np.uint8)}, "a context image cover the whole image"),
    ],
)
def test_what_it_cannot_take_is_refused(pipe: Pipeline, change: dict, message: str) -> None:
    mask = Image.fromarray(_mask((64, 64), (8, 8, 24, 24)).astype(np.uint8) * 255)
    request = EditRequest(_picture(64), "x", **{"mask": mask, "inpaint_area": "masked", "steps": 2, **change})
    with pytest.raises(EditError, match=message):
        pipe.edit(request)


def test_inpaint_area_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _picture(96).save(tmp_path / "src.png")
    Image.fromarray(_mask((96, 96), (10, 60, 30, 90)).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    source, mask = str(tmp_path / "src.png"), str(tmp_path / "mask.png")
    edit = ["edit", source, "a red circle", "--model", "tiny", "--steps", "2", "--seed", "3", "--mask", mask]
    assert main([*edit, "--mask-padding", "8", "-o", str(tmp_path / "e")]) == 2
    assert "add it or drop them" in capsys.readouterr().err
    args = ["--inpaint-area", "masked", "--mask-padding", "8", "--inpaint-size", "32x32"]
    assert main([*edit, *args, "-o", str(tmp_path / "e")]) == 0
    out = Path(capsys.readouterr().out.split()[0])
    record = read_record(out)
    assert Image.open(out).size == (96, 96) and (record["width"], record["height"]) == (32, 32)
    # 20 x 30, 8 more each side but not past the bottom: 36 x 44; grown to 44 x 44 for 32x32, kept inside
    assert record["crop"] == [0, 52, 44, 96]
    again = ["reproduce", str(out), "--model", "tiny", "--source", str(tmp_path / "src.png")]
    assert main([*again, "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "r")]) == 0
    assert "the pixels are identical" in capsys.readouterr().err


def test_a_thin_stroke_on_a_large_picture_is_kept_when_the_area_shrinks(pipe: Pipeline) -> None:
    """The box is larger than the size it is drawn at: a masked pixel there is one where any pixel under it
    is, so a one-pixel line is drawn (nearest would skip it and repaint nothing)."""
    mask = np.zeros((256, 256), bool)
    mask[128, 40:220] = True
    mask[40:220, 128] = True
    area = plan_masked_area(mask, 0, 8, 64 * 64)
    drawn = cut_out_mask(area)
    assert area.width < area.box[2] - area.box[0] and drawn.any(axis=0).all() and drawn.any(axis=1).all()
    picture = Image.fromarray(np.asarray(_picture(256)))
    settings = {"mask": Image.fromarray(mask.astype(np.uint8) * 255), "inpaint_area": "masked", "steps": 2}
    (a,) = pipe.edit(EditRequest(picture, "a red circle", seed=1, mask_padding=0, **settings))
    (b,) = pipe.edit(EditRequest(picture, "a blue square", seed=2, mask_padding=0, **settings))
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))  # the line was drawn, differently


def test_any_picture_size_takes_a_masked_area(pipe: Pipeline) -> None:
    """Only the cut-out reaches the model, at a size it takes: the picture need not fit its multiple."""
    picture = Image.fromarray(np.asarray(_picture(150))[:100])  # 150 x 100: not a multiple of 8
    mask = Image.fromarray(_mask((100, 150), (40, 30, 70, 60)).astype(np.uint8) * 255)
    (image,) = pipe.edit(EditRequest(picture, "x", mask=mask, inpaint_area="masked", steps=2, seed=1))
    assert image.image.size == (150, 100)
    with pytest.raises(EditError, match="multiples of 8"):
        pipe.edit(EditRequest(picture, "x", mask=mask, steps=2, seed=1))
