"""Prompt editing on the web page in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): Settings' "Prompt editing"
checkbox checks "Prompt weights" too (as --prompt-editing implies --prompt-weights; unchecking the weights
unchecks it), is sent only when checked, the images' records keep it, "Reuse settings" puts it back (and
clears it for a record without it), "Reproduce" sends it, and an edit from the page sends it. The API:
tests/serve/test_prompt_editing_api.py."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import numpy as np
from PIL import Image

from pictor.pipeline import GenerationRequest, Pipeline
from tests.serve.test_browser import (  # noqa: F401
    browser,
    fill_settings,
    generate_one,
    open_page_sending,
    reproduce_twice,
)

PROMPT = "a [red|blue] circle"
KEYS = ("prompt_weights", "prompt_editing")


def _newest(url: str) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """The newest job, its first image's pixels and that image's pictor record."""
    job: dict[str, Any] = httpx.get(f"{url}/v1/jobs").json()["data"][0]
    assert job["status"] == "succeeded", job
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        return job, np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])


def _boxes(page: Any) -> tuple[bool, bool]:
    """Whether "Prompt weights" and "Prompt editing" are checked."""
    weights, editing = (
        page.get_by_label(label, exact=True) for label in ("Prompt weights", "Prompt editing")
    )
    return weights.is_checked(), editing.is_checked()


def test_prompt_editing_is_sent_kept_reused_and_reproduced(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems, sent = open_page_sending(browser, live.url, height=900)
    weights = page.get_by_label("Prompt weights", exact=True)
    editing = page.get_by_label("Prompt editing", exact=True)

    # Checking Prompt editing checks Prompt weights; unchecking the weights unchecks editing.
    fill_settings(page, PROMPT, seed=5, steps=3)
    assert _boxes(page) == (False, False)
    editing.check()
    expect(weights).to_be_checked()
    weights.uncheck()
    expect(editing).not_to_be_checked()
    editing.check()
    assert _boxes(page) == (True, True)
    generate_one(page)
    assert {k: sent[-1].get(k) for k in KEYS} == {"prompt_weights": True, "prompt_editing": True}, sent[-1]
    job, pixels, record = _newest(live.url)
    assert job["request"]["prompt_editing"] is True and job["request"]["prompt_weights"] is True
    assert record["prompt_editing"] is True and record["prompt_weights"] is True
    (alone,) = tiny.generate(
        GenerationRequest(PROMPT, steps=3, seed=5, prompt_weights=True, prompt_editing=True)
    )
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))

    # Reuse settings puts both boxes back from the record; Reproduce sends them.
    weights.uncheck()
    assert _boxes(page) == (False, False)
    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 5)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(editing).to_be_checked()
    expect(weights).to_be_checked()
    jobs = reproduce_twice(page, live.url, thumb, f"{PROMPT} (seed 5)")
    assert jobs[0]["request"]["prompt_editing"] is True, jobs[0]["request"]

    # An edit from the page sends it too.
    thumb.first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Strength", exact=True).fill("0.8")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    assert job["request"]["kind"] == "edit" and job["request"]["prompt_editing"] is True, job["request"]
    assert record["prompt_editing"] is True

    # Unchecked, a generation sends neither, and its record has neither.
    page.get_by_role("button", name="Clear images").click()
    weights.uncheck()
    page.get_by_label("Prompt", exact=True).fill("a plain circle")
    generate_one(page)
    assert not set(KEYS) & set(sent[-1]), sent[-1]
    job, _, record = _newest(live.url)
    assert not job["request"]["prompt_editing"] and not set(KEYS) & set(record), (job["request"], record)

    # Reuse settings of that plain image clears the boxes checked before.
    editing.check()
    page.get_by_role("img", name="a plain circle (seed 5)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(editing).not_to_be_checked()
    expect(weights).not_to_be_checked()
    assert problems == [], problems
