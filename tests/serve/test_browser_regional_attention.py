"""Regional attention (the regions as one masked pass) on the web page in a real browser (Chromium through
Playwright, as tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): the Regions
editor's "Regional attention (one pass)" checkbox is sent only when checked and there are regions, the job
and its image's record keep it, "Reuse settings" puts it back (and clears it for a record without it),
"Reproduce" sends it, an edit from the page sends it, and "Settings from an image" checks it for an image that
ran its regions as one pass. The API: tests/serve/test_regional_attention_api.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pictor.pipeline import GenerationRequest, Pipeline
from tests.serve.test_browser import (  # noqa: F401
    browser,
    fill_settings,
    generate_one,
    open_page_sending,
    reproduce_twice,
)
from tests.serve.test_browser_prompt_editing import _newest
from tests.serve.test_browser_regions import KEPT, SENT, _fill_region

PROMPT = "two shapes"


def test_regional_attention_is_sent_with_regions_kept_reused_and_reproduced(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems, sent = open_page_sending(browser, live.url, height=1000)
    attention = page.get_by_label("Regional attention (one pass)", exact=True)

    fill_settings(page, PROMPT, seed=7, steps=3)
    page.get_by_text("Regions", exact=True).click()
    assert "only its box" in (page.locator("label[for=regional_attention]").get_attribute("title") or "")
    attention.check()

    for n, region in enumerate(SENT, start=1):
        page.get_by_role("button", name="Add region").click()
        _fill_region(page, n, region["prompt"], region["box"], str(region.get("strength", "")))
    generate_one(page)
    assert sent[-1]["regional_attention"] is True and sent[-1]["regions"] == SENT, sent[-1]
    job, pixels, record = _newest(live.url)
    assert job["request"]["regional_attention"] is True, job["request"]
    assert record["regional_attention"] is True and record["regions"] == KEPT, record
    (alone,) = tiny.generate(
        GenerationRequest(PROMPT, steps=3, seed=7, regions=KEPT, regional_attention=True)
    )
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))
    (tmp_path / "one-pass.png").write_bytes(httpx.get(job["results"][0]["url"]).content)

    # Reuse settings puts the box back from the record; Reproduce sends it.
    attention.uncheck()
    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 7)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(attention).to_be_checked()
    jobs = reproduce_twice(page, live.url, thumb, f"{PROMPT} (seed 7)")
    assert jobs[0]["request"]["regional_attention"] is True, jobs[0]["request"]

    # An edit from the page sends it with the regions (as form fields): its job and record keep it.
    thumb.first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Strength", exact=True).fill("0.8")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    assert job["request"]["kind"] == "edit" and job["request"]["regional_attention"] is True, job["request"]
    assert record["regional_attention"] is True and record["mode"] == "img2img", record
    page.get_by_role("button", name="Clear images").click()  # the edit's source: back to generating

    # Unchecked, a generation does not send it and its record does not say it; reusing that record clears it.
    attention.uncheck()
    page.get_by_label("Seed", exact=True).fill("8")
    generate_one(page)
    assert "regional_attention" not in sent[-1] and len(sent[-1]["regions"]) == 2, sent[-1]
    job, _, record = _newest(live.url)
    assert job["request"]["regional_attention"] is False and "regional_attention" not in record, record
    attention.check()
    page.get_by_role("img", name=f"{PROMPT} (seed 8)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(attention).not_to_be_checked()

    # Checked without regions it is not sent: it is a way to run regions, which the server refuses alone.
    attention.check()
    page.get_by_role("button", name="Clear regions").click()
    page.get_by_label("Seed", exact=True).fill("9")
    generate_one(page)
    assert "regional_attention" not in sent[-1] and "regions" not in sent[-1], sent[-1]

    # Settings from an image that ran its regions as one pass check it again, with its regions.
    attention.uncheck()
    page.locator("#settings-image").set_input_files(str(tmp_path / "one-pass.png"))
    expect(page.get_by_label("Seed", exact=True)).to_have_value("7")
    expect(attention).to_be_checked()
    expect(page.get_by_label("Region 2 prompt")).to_have_value("a blue square")
    assert problems == [], problems
