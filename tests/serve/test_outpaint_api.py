"""The server's outpainting and mask feathering: the edit forms' `expand` (L,T,R,B pixels), `fill` (edge or
noise) and `feather` (pixels). An outpainting is `Pipeline.edit`'s pixels at the grown size, its record and
queued job keep the settings (across a restart too), the server's pixel limit applies to the grown canvas
(also while the model loads), misuse is a 400 naming the field in the API's words, and variations take
none of them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.editing import EditError, EditRequest, prepare_edit
from pictor.pipeline import Pipeline
from pictor.serve.pipeline_errors import api_message, field_of
from tests.serve.conftest import GatedPipeline, assert_refused, decode_images, new_tiny
from tests.serve.test_edit_upscale_api import JOBS, PROMPT, edit, no_flags, png, source, stored

# Pixels added on the left, top, right and bottom of the 32x16 source: 48x24, not square and not
# symmetric, so a side or width and height swapped would show. Multiples of the tiny model's 4.
EXPAND = (4, 0, 12, 8)
GROWN = (48, 24)  # (width, height)


def _mask() -> np.ndarray:
    """A mask for the 32x16 source (white = repaint) with an edge for a feather to blend."""
    mask = np.zeros((16, 32), np.uint8)
    mask[4:12, 8:24] = 255
    return mask


def _expand_text(expand: tuple[int, ...] = EXPAND) -> str:
    return ",".join(map(str, expand))


def _direct(pipe: Pipeline, pixels: np.ndarray, mask: np.ndarray | None = None, **fields: Any) -> np.ndarray:
    """`Pipeline.edit`'s first image for the edit the server's `edit` helper sends (seed 7, 2 steps)."""
    request = EditRequest(
        Image.fromarray(pixels),
        PROMPT,
        mask=None if mask is None else Image.fromarray(mask),
        seed=7,
        steps=2,
        **fields,
    )
    (image,) = pipe.edit(request)
    return np.asarray(image.image.convert("RGB"))


def test_an_outpainting_is_the_pipelines_and_its_record_and_job_keep_the_expand(
    client: TestClient, tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    pixels = source()
    ((answered, record),) = decode_images(edit(client, pixels, expand=_expand_text(), fill="noise"))
    assert answered.shape == (GROWN[1], GROWN[0], 3)
    assert np.array_equal(answered, _direct(tiny, pixels, expand=EXPAND, fill="noise"))
    # without a mask of its own only the added area is drawn: the source is kept, pixel for pixel
    assert np.array_equal(answered[0:16, 4:36], pixels)
    assert (record["mode"], record["expand"], record["fill"]) == ("outpaint", list(EXPAND), "noise")
    assert (record["width"], record["height"]) == GROWN and record["source_image"]["width"] == 32
    # the edge fill starts elsewhere, so it draws otherwise; a JSON list reads as L,T,R,B does
    ((edged, record),) = decode_images(edit(client, pixels, expand=f"[{_expand_text()}]"))
    assert record["fill"] == "edge" and not np.array_equal(edged, answered)
    assert np.array_equal(edged, _direct(tiny, pixels, expand=EXPAND))

    queued = edit(client, pixels, JOBS, expand=_expand_text(), fill="noise", size=f"{GROWN[0]}x{GROWN[1]}")
    assert queued.status_code == 202, queued.text
    sent = queued.json()["request"]
    assert (sent["expand"], sent["fill"], sent.get("feather")) == (list(EXPAND), "noise", None), sent
    assert (sent["width"], sent["height"]) == GROWN, sent  # the output's size, not the source's
    job = wait_job(client, queued.json()["id"])
    assert job["status"] == "succeeded", job
    kept, kept_record = stored(client, job)
    assert np.array_equal(kept, answered) and kept_record["expand"] == list(EXPAND)


def test_feather_shapes_an_inpaintings_edge_and_an_outpaintings_own_mask(
    client: TestClient, tiny: Pipeline
) -> None:
    pixels, mask = source(), _mask()
    ((feathered, record),) = decode_images(edit(client, pixels, mask=mask))
    assert record["feather"] == 2  # the default, said in the record
    ((hard, record),) = decode_images(edit(client, pixels, mask=mask, feather=0))
    assert record["feather"] == 0 and not np.array_equal(hard, feathered)
    assert np.array_equal(hard, _direct(tiny, pixels, mask, feather=0))
    assert np.array_equal(feathered, _direct(tiny, pixels, mask))
    # an outpainting with a mask of the source's size repaints the added area and the mask's
    fields = {"expand": EXPAND, "fill": "noise", "feather": 5}
    ((both, record),) = decode_images(edit(client, pixels, mask=mask, **{**fields, "expand": _expand_text()}))
    assert (record["mode"], record["expand"], record["feather"]) == ("outpaint", list(EXPAND), 5)
    assert "mask" in record and np.array_equal(both, _direct(tiny, pixels, mask, **fields))


def test_misused_outpainting_fields_are_refused_by_name(client: TestClient) -> None:
    pixels, mask = source(), _mask()
    for text in ("16,0,16", "a,b,c,d", "16;0;0;0", "1.5,0,0,0"):
        assert_refused(edit(client, pixels, expand=text), "expand", "four whole pixel counts LEFT,TOP,RIGHT")
    assert_refused(edit(client, pixels, expand="0,-4,0,0"), "expand", "expand top is -4")
    assert_refused(edit(client, pixels, expand="0,0,0,0"), "expand", "adds nothing")
    r = edit(client, pixels, expand="0,0,6,0")  # the model's pixel multiple: the pipeline's check
    assert_refused(r, "expand", "expand right = 6 is not a multiple of 4")
    assert "use 4 or 8" in r.json()["error"]["message"]
    no_flags(r.json()["error"]["message"])
    # the server's pixel limit (TEST_LIMITS: 64x64) applies to the grown canvas, not to the source
    assert_refused(edit(client, pixels, expand="0,0,64,64"), "expand", "expand makes 96x80")
    assert_refused(edit(client, pixels, expand=_expand_text(), size="32x16"), "size", "plus expand (48x24)")
    assert_refused(edit(client, pixels, expand=_expand_text(), upscale=2), "upscale", "not both")
    r = edit(client, pixels, mask=mask, expand=_expand_text(), inpaint_area="masked")
    assert_refused(r, "inpaint_area", "no expand; outpaint first")
    assert_refused(edit(client, pixels, expand=_expand_text(), strength=0), "strength", "raw fill")

    assert_refused(edit(client, pixels, fill="noise"), "fill", "send expand too")
    assert_refused(edit(client, pixels, expand=_expand_text(), fill="speckle"), "fill", "'edge' or 'noise'")
    assert_refused(edit(client, pixels, feather=3), "feather", "this edit has none; send a mask")
    # an added area is wholly new: a feather needs a mask even there
    assert_refused(edit(client, pixels, expand=_expand_text(), feather=3), "feather", "send a mask")
    assert_refused(edit(client, pixels, mask=mask, feather=-1), "feather", "greater than or equal to 0")
    assert_refused(edit(client, pixels, mask=mask, feather="soft"), "feather", "integer")

    # the queue's form is the same grammar: refused before a job exists
    assert_refused(edit(client, pixels, JOBS, expand="0,0,-8,0"), "expand", "expand right is -8")
    assert client.get("/v1/jobs").json()["data"] == []


@pytest.mark.parametrize("field", ["expand", "fill", "feather"])
def test_variations_take_no_outpainting_fields(client: TestClient, field: str) -> None:
    """A variation redraws its picture at its size; outpainting and feathering are edits."""
    value = {"expand": _expand_text(), "fill": "noise", "feather": "2"}[field]
    files = {"image": ("p.png", png(source()), "image/png")}
    r = client.post("/v1/images/variations", files=files, data={field: value})
    assert_refused(r, field, f"unknown field '{field}'")


def test_the_pipelines_outpainting_messages_name_their_field(tiny: Pipeline) -> None:
    picture = Image.fromarray(source())
    mask = Image.fromarray(_mask())
    cases = [
        ({"expand": (0, 0, 6, 0)}, "expand"),
        ({"expand": (0, -4, 0, 0)}, "expand"),
        ({"expand": EXPAND, "fill": "speckle"}, "fill"),
        ({"mask": mask, "feather": -1}, "feather"),
        ({"expand": EXPAND, "strength": 0.0}, "strength"),
        ({"expand": EXPAND, "upscale": 2}, "upscale"),
        ({"expand": EXPAND, "mask": mask, "inpaint_area": "masked"}, "inpaint_area"),
    ]
    for change, field in cases:
        with pytest.raises(EditError) as info:
            tiny.resolve_edit(EditRequest(picture, "x", steps=1, **change))
        assert field_of(str(info.value)) == field, (str(info.value), field)
        no_flags(api_message(str(info.value)))
    with pytest.raises(EditError) as info:  # the pipeline's own bound (the server's is lower)
        prepare_edit(EditRequest(picture, "x", expand=EXPAND), tiny.patch, max_pixels=32 * 16)
    assert field_of(str(info.value)) == "expand", str(info.value)


def test_while_the_model_loads_the_grown_canvas_is_checked_and_the_job_keeps_it(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, wait_job: Callable[..., Any]
) -> None:
    """Before the model is there the grown size is known (the source's plus expand): the limit applies at
    once and the queued job says the output's size; what only the model can check (its pixel multiple) fails
    the job when it runs, naming expand."""
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return new_tiny()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    pixels = source()
    try:
        assert client.get("/readyz").json()["status"] == "loading"
        assert_refused(edit(client, pixels, JOBS, expand="0,0,64,64"), "expand", "expand makes 96x80")
        assert_refused(edit(client, pixels, JOBS, expand=_expand_text(), upscale=2), "upscale", "not both")
        queued = edit(client, pixels, JOBS, expand=_expand_text())
        assert queued.status_code == 202, queued.text
        assert (queued.json()["request"]["width"], queued.json()["request"]["height"]) == GROWN
        odd = edit(client, pixels, JOBS, expand="0,0,6,0")
        assert odd.status_code == 202, odd.text
    finally:
        loading.set()
    job = wait_job(client, queued.json()["id"])
    assert job["status"] == "succeeded", job
    kept, record = stored(client, job)
    assert kept.shape == (GROWN[1], GROWN[0], 3) and record["expand"] == list(EXPAND)
    failed = wait_job(client, odd.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["param"] == "expand", failed
    no_flags(failed["error"]["message"])


def test_a_queued_outpainting_keeps_its_settings_across_a_restart(
    make_client: Callable[..., TestClient], tiny: Pipeline, wait_job: Callable[..., Any]
) -> None:
    """Queued behind a running job, the server restarts: the job's stored params (JSON) still make the same
    EditRequest, so the picture is the pipeline's."""
    gated = GatedPipeline(tiny)
    first = make_client(gated)
    first.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2})
    assert gated.gate.reached.wait(10)
    pixels, mask = source(), _mask()
    queued = edit(first, pixels, JOBS, mask=mask, expand=_expand_text(), fill="noise", feather=0)
    assert queued.status_code == 202, queued.text
    make_client.close(first)
    second = make_client(tiny)
    job = wait_job(second, queued.json()["id"])
    assert job["status"] == "succeeded", job
    kept, record = stored(second, job)
    assert (record["expand"], record["fill"], record["feather"]) == (list(EXPAND), "noise", 0)
    assert np.array_equal(kept, _direct(tiny, pixels, mask, expand=EXPAND, fill="noise", feather=0))
