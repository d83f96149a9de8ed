"""The web page's edit-only fields in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): "Inpaint size" is sent as the
edit's `inpaint_size` only when filled, the server's refusal of it shows as the page's error, and "Reuse
settings" puts back every edit setting an image's record holds (strength, the upscaling, the masked area with
the size it was drawn at) and clears those it does not."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from pictor.pipeline import Pipeline
from tests.serve.test_browser import browser, fill_settings, generate_one, open_page  # noqa: F401
from tests.serve.test_upscale_api import NAME, upscaler_file, upscaling  # noqa: F401

# Each edit field of the form by its label, and the value Reuse settings must leave in it.
EDIT_FIELDS = ("Strength", "Upscale source by", "Upscaler", "Inpaint area", "Mask padding", "Inpaint size")


def _png(url: str) -> tuple[np.ndarray, dict[str, Any]]:
    with Image.open(io.BytesIO(httpx.get(url).content)) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])


def _newest(url: str) -> dict[str, Any]:
    job: dict[str, Any] = httpx.get(f"{url}/v1/jobs").json()["data"][0]
    assert job["status"] == "succeeded", job
    return job


def _edit(page: Any) -> None:
    from playwright.sync_api import expect

    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()


def _fill_edit_fields(page: Any, values: dict[str, str]) -> None:
    for label, value in values.items():
        field = page.get_by_label(label, exact=True)
        if label in ("Upscaler", "Inpaint area"):
            field.select_option(value)
        else:
            field.fill(value)


def _reuse(page: Any, thumb: Any, want: dict[str, str]) -> None:
    """Open `thumb`'s image, press Reuse settings, and check every edit field against `want` (the fields
    left out must be empty: the record does not have them)."""
    from playwright.sync_api import expect

    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    for label in EDIT_FIELDS:
        expect(page.get_by_label(label, exact=True), label).to_have_value(want.get(label, ""))


def test_inpaint_size_is_sent_and_reuse_settings_puts_the_edit_settings_back(
    browser: Any,  # noqa: F811
    live_server: Any,
    upscaling: Pipeline,  # noqa: F811
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server(pipeline=upscaling)  # a server with an upscale model: the Upscaler choice is offered
    page, problems = open_page(browser, live.url, height=900)
    fill_settings(page, "a source to inpaint", 5, 3)
    generate_one(page)
    source_thumb = page.get_by_role("img", name="a source to inpaint (seed 5)")
    source, _ = _png(_newest(live.url)["results"][0]["url"])

    # Only the masked area, drawn at a size given as WxH: first one the model cannot draw (the server's 400
    # shows as the page's error and nothing is queued), then one it can.
    source_thumb.click()
    page.get_by_role("button", name="Edit this image").click()
    expect(page.get_by_label("Inpaint size")).to_have_attribute("placeholder", "auto (WxH)")
    mask = Image.new("L", (source.shape[1], source.shape[0]), 0)
    mask.paste(255, (2, 2, 10, 10))
    mask.save(tmp_path / "mask.png")
    page.get_by_label("Mask", exact=True).set_input_files(str(tmp_path / "mask.png"))
    page.get_by_label("Prompt", exact=True).fill("a small star")
    page.get_by_label("Seed", exact=True).fill("9")
    masked = {"Strength": "0.9", "Inpaint area": "masked", "Mask padding": "4", "Inpaint size": "30x32"}
    _fill_edit_fields(page, masked)
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#error")).to_contain_text("inpaint size 30x32 must have both sides multiples of")
    assert len(httpx.get(f"{live.url}/v1/jobs").json()["data"]) == 1
    assert problems == [f"400 {live.url}/v1/jobs/edits"], problems
    problems.clear()

    masked["Inpaint size"] = "16x24"  # not square: a width and height swapped would show
    page.get_by_label("Inpaint size").fill(" 16x24 ")  # as typed, trimmed
    _edit(page)
    job = _newest(live.url)
    request = job["request"]
    assert request["kind"] == "edit" and request["inpaint_size"] == [16, 24], request
    assert (request["inpaint_area"], request["mask_padding"], request["strength"]) == ("masked", 4, 0.9)
    assert request.get("upscale") is None and request.get("upscaler") is None
    inpainted, record = _png(job["results"][0]["url"])
    assert (record["inpaint_area"], record["mask_padding"]) == ("masked", 4)
    assert (record["width"], record["height"]) == (16, 24)  # the size the area was drawn at
    assert record["strength"] == 0.9 and "source_upscale" not in record
    keep = np.asarray(mask) == 0
    assert np.array_equal(inpainted[keep], source[keep]) and not np.array_equal(inpainted, source)

    # An upscaling edit of the same source with the upscale model: no masked-area settings are sent.
    source_thumb.click()
    page.get_by_role("button", name="Edit this image").click()  # the mask goes
    expect(page.get_by_label("Mask", exact=True)).to_have_value("")
    upscaled = {"Strength": "0.4", "Upscale source by": "2", "Upscaler": NAME}
    _fill_edit_fields(page, {**upscaled, "Inpaint area": "", "Mask padding": "", "Inpaint size": ""})
    page.get_by_label("Prompt", exact=True).fill("an enlarged source")
    _edit(page)
    job = _newest(live.url)
    request = job["request"]
    assert (request["upscale"], request["upscaler"], request["strength"]) == (2, NAME, 0.4), request
    for name in ("inpaint_area", "mask_padding", "inpaint_size"):
        assert request.get(name) is None, (name, request)
    enlarged, record = _png(job["results"][0]["url"])
    assert record["source_upscale"]["upscaler"] == NAME and record["source_upscale"]["scale"] == 2
    assert enlarged.shape[:2] == (2 * source.shape[0], 2 * source.shape[1])
    assert "inpaint_area" not in record

    # Reuse settings of the masked edit: its fields back, the inpaint size from the record's drawn size, and
    # the upscaling (which the record does not have) cleared.
    _fill_edit_fields(page, {"Strength": "0.1", "Inpaint size": "8x8", "Mask padding": "7"})
    _reuse(page, page.get_by_role("img", name="a small star (seed 9)"), masked)
    expect(page.locator("#edit-settings")).to_have_attribute("open", "")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a small star")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("9")
    # ... and with the same source and mask they draw the same picture again.
    source_thumb.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Mask", exact=True).set_input_files(str(tmp_path / "mask.png"))
    _edit(page)
    job = _newest(live.url)
    assert job["request"]["inpaint_size"] == [16, 24] and job["request"]["strength"] == 0.9
    assert np.array_equal(_png(job["results"][0]["url"])[0], inpainted)

    # Reuse settings of the upscaling edit: its strength, factor and upscaler back, the masked area cleared.
    _reuse(page, page.get_by_role("img", name="an enlarged source (seed 9)"), upscaled)
    # ... and of a generation: every edit field cleared.
    _reuse(page, source_thumb, {})
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a source to inpaint")
    assert problems == [], problems
