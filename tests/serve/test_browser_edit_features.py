"""The web page's prompt weights, upscaling edits and masked-area inpainting, in a real browser (Chromium
through Playwright, as tests/serve/test_browser.py): what the page sends, what the records keep, and what
Reuse settings puts back."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.serve import test_browser
from tests.serve.test_browser import fill_settings, generate_one, open_page, reproduce_twice

browser = test_browser.browser  # the browser tests' Chromium (skipped where it is missing, as there)


def _png(job: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])


def test_prompt_weights_are_sent_kept_and_put_back(browser: Any, live_server: Any) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    fill_settings(page, "a (red:1.5) circle", 5, 3)
    page.get_by_label("Prompt weights").check()
    generate_one(page)
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["request"]["prompt_weights"] is True
    assert _png(job)[1]["prompt_weights"] is True

    thumb = page.get_by_role("img", name="a (red:1.5) circle (seed 5)")
    page.get_by_label("Prompt weights").uncheck()
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("Prompt weights")).to_be_checked()
    jobs = reproduce_twice(page, live.url, thumb, "a (red:1.5) circle (seed 5)")
    assert jobs[0]["request"]["prompt_weights"] is True
    assert problems == [], problems


def edit_a_new_image(browser: Any, live_server: Any, prompt: str) -> tuple[Any, Any, list[str]]:
    """A live server, its page and the page's problems, with one image generated from `prompt` (seed 5, 3
    steps) open in the edit section."""
    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    fill_settings(page, prompt, 5, 3)
    generate_one(page)
    page.get_by_role("img", name=f"{prompt} (seed 5)").click()
    page.get_by_role("button", name="Edit this image").click()
    return live, page, problems


def test_an_upscaling_edit_and_an_only_masked_inpaint_from_the_page(
    browser: Any, live_server: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    live, page, problems = edit_a_new_image(browser, live_server, "a source to enlarge")
    page.get_by_label("Upscale source by").fill("2")
    page.get_by_label("Prompt", exact=True).fill("an enlarged source")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    edit_job, source_job = httpx.get(f"{live.url}/v1/jobs").json()["data"][:2]
    assert edit_job["request"]["upscale"] == 2, edit_job["request"]
    (enlarged, record), (source, _) = _png(edit_job), _png(source_job)
    assert enlarged.shape[0] == 2 * source.shape[0] and record["source_upscale"]["upscaler"] == "lanczos"

    # the same source, inpainted only around a mask: outside it the pixels stay the source's
    page.get_by_label("Upscale source by").fill("")
    size = source.shape[0]
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (2, 2, 10, 10))
    mask.save(tmp_path / "mask.png")
    page.get_by_label("Mask", exact=True).set_input_files(str(tmp_path / "mask.png"))
    page.get_by_label("Inpaint area").select_option("masked")
    page.get_by_label("Mask padding").fill("4")
    page.get_by_label("Prompt", exact=True).fill("a small star")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["request"]["inpaint_area"] == "masked" and job["request"]["mask_padding"] == 4
    pixels, record = _png(job)
    keep = np.asarray(mask) == 0
    assert record["inpaint_area"] == "masked" and np.array_equal(pixels[keep], source[keep])
    assert problems == [], problems
