"""Variation seeds on the web page in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): Settings' "Variation seed
strength", "Variation seed" and "Seed resize from" are sent only when filled, the images' records keep them,
"Reuse settings" puts them back (and clears them for a record without them), an edit sends the variation seed
and strength, and the server's refusal of Seed resize from on an edit shows as the page's error. (The label
says "Variation seed strength", A1111's name in its parameters text: the Variations section's img2img
strength is "Variation strength".)"""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import numpy as np
from PIL import Image

from pictor.pipeline import GenerationRequest, Pipeline
from tests.serve.test_browser import browser, fill_settings, generate_one, open_page_sending  # noqa: F401

FIELDS = ("Variation seed strength", "Variation seed", "Seed resize from")
KEYS = ("variation_strength", "variation_seed", "seed_resize_from")


def _newest(url: str) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """The newest job, its first image's pixels and that image's pictor record."""
    job: dict[str, Any] = httpx.get(f"{url}/v1/jobs").json()["data"][0]
    assert job["status"] == "succeeded", job
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        return job, np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])


def _fields(page: Any, values: tuple[str, str, str]) -> None:
    for label, value in zip(FIELDS, values, strict=True):
        page.get_by_label(label, exact=True).fill(value)


def _expect_fields(page: Any, values: tuple[str, str, str]) -> None:
    from playwright.sync_api import expect

    for label, value in zip(FIELDS, values, strict=True):
        expect(page.get_by_label(label, exact=True), label).to_have_value(value)


def test_variation_seeds_are_sent_kept_reused_and_left_out_when_empty(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems, sent = open_page_sending(browser, live.url, height=900)

    # A generation with variation seeds: seed 5 blended with variation seed 9 by 0.3, noise drawn at 24x32.
    fill_settings(page, "a varied circle", seed=5, steps=3)
    for label in FIELDS:
        expect(page.get_by_label(label, exact=True), label).to_have_value("")
    expect(page.get_by_label("Variation seed", exact=True)).to_have_attribute("placeholder", "random")
    _fields(page, ("0.3", "9", "24x32"))
    generate_one(page)
    assert {k: sent[-1].get(k) for k in KEYS} == {
        "variation_strength": 0.3,
        "variation_seed": 9,
        "seed_resize_from": "24x32",
    }
    job, pixels, record = _newest(live.url)
    assert (job["request"]["variation_seed"], job["request"]["variation_strength"]) == (9, 0.3)
    assert record["seed"] == 5 and record["variation_seed"] == 9 and record["variation_strength"] == 0.3
    assert record["seed_resize_from"] == [24, 32]
    (alone,) = tiny.generate(
        GenerationRequest(
            "a varied circle",
            steps=3,
            seed=5,
            variation_seed=9,
            variation_strength=0.3,
            seed_resize_from=(24, 32),
        )
    )
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))

    # Reuse settings puts them back from the record.
    _fields(page, ("", "", ""))
    thumb = page.get_by_role("img", name="a varied circle (seed 5)")
    thumb.click()
    expect(page.locator("#viewer-parameters")).to_contain_text("Variation seed: 9")
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    _expect_fields(page, ("0.3", "9", "24x32"))
    expect(page.get_by_label("Seed", exact=True)).to_have_value("5")

    # An edit of it sends the variation seed and strength; Seed resize from is refused there (an edit's
    # composition is its picture's), and the server's words show on the page.
    thumb.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Strength", exact=True).fill("0.8")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#error")).to_contain_text("seed_resize_from")
    expect(page.locator("#error")).to_contain_text("an edit's composition is its picture's")
    assert problems == [f"400 {live.url}/v1/jobs/edits"], problems
    problems.clear()
    page.get_by_label("Seed resize from", exact=True).fill("")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    assert job["request"]["kind"] == "edit", job["request"]
    assert (job["request"]["variation_seed"], job["request"]["variation_strength"]) == (9, 0.3)
    assert (record["variation_seed"], record["variation_strength"], record["seed"]) == (9, 0.3, 5)
    assert "seed_resize_from" not in record

    # Emptied, a plain generation sends none of them, and its record has none.
    page.get_by_role("button", name="Clear images").click()
    _fields(page, ("", "", ""))
    page.get_by_label("Prompt", exact=True).fill("a plain circle")
    generate_one(page)
    assert not set(KEYS) & set(sent[-1]), sent[-1]
    job, _, record = _newest(live.url)
    assert all(job["request"].get(k) is None for k in KEYS), job["request"]
    assert not set(KEYS) & set(record)

    # Reuse settings of that plain image clears fields filled before.
    _fields(page, ("0.5", "3", "16x16"))
    page.get_by_role("img", name="a plain circle (seed 5)").click()
    page.get_by_role("button", name="Reuse settings").click()
    _expect_fields(page, ("", "", ""))
    assert problems == [], problems
