"""Composable diffusion (A1111's AND) on the web page in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): Settings' "Composable (AND)"
checkbox is sent only when checked, the job and its image's record keep it, "Reuse settings" puts it back
(and clears it for a record without it), "Reproduce" sends it, and "Settings from an image" checks it for
A1111 text whose prompt has AND. The API: tests/serve/test_composable_api.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pictor.pipeline import GenerationRequest, Pipeline
from tests.serve.test_browser import (  # noqa: F401
    browser,
    fill_settings,
    generate_one,
    open_page,
    reproduce_twice,
)
from tests.serve.test_browser_prompt_editing import _newest
from tests.serve.test_settings_from_api import png_with

PROMPT = "a red circle AND a blue square:0.8"


def _generate(page: Any) -> dict[str, Any]:
    """Generate one image from the page; the JSON body it sent to POST /v1/jobs."""
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")) as request:
        generate_one(page)
    body: dict[str, Any] = request.value.post_data_json
    return body


def test_composable_is_sent_kept_reused_and_reproduced(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    composable = page.get_by_label("Composable (AND)", exact=True)
    fill_settings(page, PROMPT, seed=5, steps=3)
    assert ":weight" in (page.locator("label[for=composable]").get_attribute("title") or "")  # its tooltip
    composable.check()
    assert _generate(page).get("composable") is True
    job, pixels, record = _newest(live.url)
    assert job["request"]["composable"] is True and record["composable"] is True, (job["request"], record)
    (alone,) = tiny.generate(GenerationRequest(PROMPT, steps=3, seed=5, composable=True))
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))

    # Reuse settings puts the box back from the record; Reproduce sends it.
    composable.uncheck()
    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 5)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(composable).to_be_checked()
    jobs = reproduce_twice(page, live.url, thumb, f"{PROMPT} (seed 5)")
    assert jobs[0]["request"]["composable"] is True, jobs[0]["request"]

    # Unchecked, a generation does not send it and its record does not say it; reusing that record clears it.
    composable.uncheck()
    page.get_by_label("Seed", exact=True).fill("6")
    assert "composable" not in _generate(page)
    job, _, record = _newest(live.url)
    assert job["request"]["composable"] is False and "composable" not in record, (job["request"], record)
    composable.check()
    page.get_by_role("img", name=f"{PROMPT} (seed 6)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(composable).not_to_be_checked()

    # A1111 text whose prompt has AND checks it (A1111 always reads AND); text without AND unchecks it.
    # The seeds differ from every one before, so the page has filled the form once Seed shows them.
    for seed, text, checked in ((7, PROMPT, True), (8, "a red circle", False)):
        (tmp_path / f"{seed}.png").write_bytes(png_with(f"{text}\nSteps: 2, Seed: {seed}, Size: 32x32"))
        page.locator("#settings-image").set_input_files(str(tmp_path / f"{seed}.png"))
        expect(page.get_by_label("Seed", exact=True)).to_have_value(str(seed))
        assert composable.is_checked() is checked, text
    assert problems == [], problems
