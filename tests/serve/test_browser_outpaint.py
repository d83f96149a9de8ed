"""The web page's outpainting and feather fields in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): "Expand (L,T,R,B)", "Fill"
and "Feather" are sent as the edit's `expand`, `fill` and `feather` only when filled, the records keep them,
a refused expand shows as the page's error, and "Reuse settings" puts them back (and clears them for a
generation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.serve import test_browser
from tests.serve.test_browser_edit_features import edit_a_new_image
from tests.serve.test_browser_edit_fields import _edit, _newest, _png, _reuse

browser = test_browser.browser  # the browser tests' Chromium (skipped where it is missing, as there)

OUTPAINT_FIELDS = ("Expand (L,T,R,B)", "Fill", "Feather")


def _fill_outpaint_fields(page: Any, values: dict[str, str]) -> None:
    for label, value in values.items():
        field = page.get_by_label(label, exact=True)
        if label == "Fill":
            field.select_option(value)
        else:
            field.fill(value)


def _reuse_outpaint(page: Any, thumb: Any, want: dict[str, str]) -> None:
    """Reuse settings of `thumb`'s image (the older edit fields checked by `_reuse`, all empty but the
    strength an edit's record holds), then the outpainting fields against `want` (left out: empty)."""
    from playwright.sync_api import expect

    _reuse(page, thumb, {label: value for label, value in want.items() if label == "Strength"})
    for label in OUTPAINT_FIELDS:
        expect(page.get_by_label(label, exact=True), label).to_have_value(want.get(label, ""))


def test_expand_fill_and_feather_are_sent_kept_and_put_back(
    browser: Any, live_server: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    live, page, problems = edit_a_new_image(browser, live_server, "a source to grow")
    source_thumb = page.get_by_role("img", name="a source to grow (seed 5)")
    source, _ = _png(_newest(live.url)["results"][0]["url"])
    height, width = source.shape[:2]

    # An expand the model cannot draw: the server's 400 shows as the page's error and nothing is queued.
    page.get_by_label("Prompt", exact=True).fill("a wider scene")
    _fill_outpaint_fields(page, {"Expand (L,T,R,B)": "0,0,6,0"})
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#error")).to_contain_text("expand right = 6 is not a multiple of 4")
    assert len(httpx.get(f"{live.url}/v1/jobs").json()["data"]) == 1
    assert problems == [f"400 {live.url}/v1/jobs/edits"], problems
    problems.clear()

    # Outpainting with a noise fill, typed with spaces: no feather is sent (no mask), the source is kept.
    outpaint = {"Expand (L,T,R,B)": "4,0,12,8", "Fill": "noise"}
    _fill_outpaint_fields(page, {**outpaint, "Expand (L,T,R,B)": " 4, 0, 12, 8 "})
    _edit(page)
    job = _newest(live.url)
    request = job["request"]
    assert (request["expand"], request["fill"], request.get("feather")) == ([4, 0, 12, 8], "noise", None)
    grown, record = _png(job["results"][0]["url"])
    assert (record["mode"], record["expand"], record["fill"]) == ("outpaint", [4, 0, 12, 8], "noise")
    assert grown.shape[:2] == (height + 8, width + 16)
    assert np.array_equal(grown[:height, 4 : 4 + width], source)

    # Inpainting with a hard edge, and a little outpainting on the right: the default fill is not sent.
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (4, 4, 20, 20))
    mask.save(tmp_path / "mask.png")
    source_thumb.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Mask", exact=True).set_input_files(str(tmp_path / "mask.png"))
    page.get_by_label("Prompt", exact=True).fill("a sharp star")
    feathered = {"Expand (L,T,R,B)": "0,0,8,0", "Fill": "", "Feather": "0"}
    _fill_outpaint_fields(page, feathered)
    _edit(page)
    request = _newest(live.url)["request"]
    assert (request["expand"], request.get("fill"), request["feather"]) == ([0, 0, 8, 0], None, 0), request
    _, record = _png(_newest(live.url)["results"][0]["url"])
    assert (record["expand"], record["fill"], record["feather"]) == ([0, 0, 8, 0], "edge", 0)
    assert "mask" in record

    # Reuse settings of the outpainting: its expand and fill back; its record's feather (the added area's
    # own mask) is not, as a feather without a mask is refused...
    wider = page.get_by_role("img", name="a wider scene (seed 5)")
    _reuse_outpaint(page, wider, {"Strength": "1", **outpaint})
    # ... and with the same source the page draws the same picture again.
    source_thumb.click()
    page.get_by_role("button", name="Edit this image").click()
    _edit(page)
    again = _newest(live.url)
    assert again["request"]["expand"] == [4, 0, 12, 8] and again["request"]["fill"] == "noise"
    assert np.array_equal(_png(again["results"][0]["url"])[0], grown)
    # Reuse settings of the masked edit: its feather back; of a generation: every field cleared.
    want = {"Strength": "1", "Expand (L,T,R,B)": "0,0,8,0", "Feather": "0"}
    _reuse_outpaint(page, page.get_by_role("img", name="a sharp star (seed 5)"), want)
    _reuse_outpaint(page, source_thumb, {})
    assert problems == [], problems
