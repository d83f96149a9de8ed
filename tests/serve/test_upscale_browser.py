"""The web page with an upscale model on the server, in a real browser (as tests/serve/test_browser.py:
Debian's chromium driven by Playwright; skipped, and said so, without /usr/bin/chromium): finished history
images get an Upscale button that queues an upscale job of that image (POST /v1/jobs/upscales) whose picture
joins the history, and the hires fix offers the upscale model; a server without one shows neither."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
from PIL import Image

from pictor.pipeline import Pipeline
from pictor.upscaling import upscale_image
from tests.serve.test_browser import browser, fill_settings, generate_one, open_page  # noqa: F401
from tests.serve.test_upscale_api import NAME, upscaler_file, upscaling  # noqa: F401


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_upscale_a_history_image_from_the_page(browser: Any, live_server: Any, upscaling: Pipeline) -> None:  # noqa: F811
    from playwright.sync_api import expect

    live = live_server(pipeline=upscaling)
    page, problems = open_page(browser, live.url, height=900)
    expect(page.locator("#model-info")).to_contain_text(f"Upscale model {NAME} (x2)")
    fill_settings(page, "a small circle", 3, 2)
    generate_one(page)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()  # the page's job is over

    page.get_by_role("button", name="Upscale a small circle (seed 3)").click()
    upscaled = page.get_by_role("img", name="Upscaled x2: a small circle (seed 3)")
    expect(upscaled).to_be_visible(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=upscaled.element_handle())
    expect(page.locator("#status")).to_have_text("Done: 1 image.")
    expect(page.locator("#error")).to_be_empty()
    # The job is an upscale of that image's file, through the queue, and its picture is upscale_image's
    job, source = httpx.get(f"{live.url}/v1/jobs").json()["data"]
    assert job["request"]["kind"] == "upscale" and job["status"] == "succeeded", job
    assert job["request"]["prompt"] == "a small circle" and job["results"][0]["seed"] == 3
    original = png_pixels(httpx.get(source["results"][0]["url"]).content)
    assert upscaling.upscaler is not None
    want = np.asarray(upscale_image(upscaling.upscaler, Image.fromarray(original)))
    assert np.array_equal(png_pixels(httpx.get(job["results"][0]["url"]).content), want)
    # An upscale has a button of its own too; the viewer offers no Reproduce for it (the CLI does that)
    expect(page.get_by_role("button", name="Upscale Upscaled x2: a small circle (seed 3)")).to_be_visible()
    upscaled.click()
    expect(page.locator("#viewer-parameters")).to_contain_text(f"Postprocess upscaler: {NAME}")
    expect(page.get_by_role("button", name="Reproduce")).to_be_hidden()
    page.get_by_role("button", name="Close").click()

    # The hires fix may enlarge its first pass with the upscale model
    page.get_by_text("Hires fix", exact=True).click()
    page.get_by_label("Upscale by").fill("2")
    page.get_by_label("Hires steps").fill("1")
    page.get_by_label("Hires upscaler").select_option(NAME)
    page.get_by_label("Prompt", exact=True).fill("a sharp star")
    page.get_by_role("button", name="Generate").click()
    star = page.get_by_role("img", name="a sharp star (seed 3)")
    expect(star).to_be_visible(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=star.element_handle())
    hires = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert hires["request"]["hires_upscaler"] == NAME, hires["request"]
    meta = httpx.get(f"{live.url}/v1/images/{hires['results'][0]['image_id']}/metadata").json()
    assert meta["record"]["hires"]["upscaler"] == NAME
    assert problems == [], problems


def test_a_server_without_an_upscaler_offers_no_upscale(browser: Any, live_server: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    fill_settings(page, "a plain square", 4, 2)
    generate_one(page)
    expect(page.get_by_role("button", name="Delete a plain square (seed 4) from the history")).to_be_visible()
    expect(page.locator("#gallery button.upscale")).to_have_count(0)
    page.get_by_text("Hires fix", exact=True).click()
    expect(page.get_by_label("Hires upscaler")).to_be_hidden()
    assert problems == [], problems
