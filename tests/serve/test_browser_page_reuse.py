"""The page's preview and Reuse settings in corners found in review (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): the live preview is hidden
after a cancel and a failure and a new job shows no stale one; Reuse settings of a variation fills the
Variations section's strength, not the edit's; "Settings from an image" leaves the edit section alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from pictor.pipeline import Pipeline
from tests.serve.test_browser import browser, fill_settings, open_page  # noqa: F401
from tests.serve.test_browser_previews import SlowSteps


def test_the_preview_is_hidden_after_a_cancel_and_a_failure(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
) -> None:
    from playwright.sync_api import expect

    live = live_server(pipeline=SlowSteps(tiny, 0.3, fail_word="boom"))
    page, problems = open_page(browser, live.url, 900)
    shown = page.locator("#live-preview")
    fill_settings(page, "cancel me", seed=3, steps=30)
    page.get_by_role("button", name="Generate").click()
    expect(shown).to_be_visible(timeout=20_000)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#status")).to_contain_text("Cancelled", timeout=20_000)
    expect(shown).to_be_hidden()
    assert shown.get_attribute("src") is None
    page.get_by_label("Prompt", exact=True).fill("boom please")
    page.get_by_role("button", name="Generate").click()
    expect(shown).to_be_visible(timeout=20_000)
    expect(page.locator("#error")).to_contain_text("simulated fault", timeout=20_000)
    expect(shown).to_be_hidden()
    page.get_by_label("Prompt", exact=True).fill("a third")
    page.get_by_role("button", name="Generate").click()
    expect(shown).to_be_visible(timeout=20_000)
    expect(page.locator("#status")).to_contain_text("Done", timeout=30_000)
    expect(shown).to_be_hidden()
    # the failed job's answer is the only HTTP error the page met
    assert all("/v1/jobs" in p for p in problems), problems


def test_reuse_settings_of_a_variation_fills_the_variation_strength(
    browser: Any,  # noqa: F811
    live_server: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, 900)
    picture = np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    page.get_by_text("Variations", exact=True).click()
    page.get_by_label("Picture to vary").set_input_files(str(tmp_path / "picture.png"))
    fill_settings(page, "a variation", 3, 2)
    page.get_by_label("Variation strength", exact=True).fill("0.55")
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["request"]["variation"] is True
    page.get_by_label("Variation strength", exact=True).fill("0.2")  # typed meanwhile
    page.get_by_text("Edit an image", exact=True).click()
    page.get_by_label("Strength", exact=True).fill("0.9")
    page.get_by_role("img", name="a variation (seed 3)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("Variation strength", exact=True)).to_have_value("0.55")
    expect(page.get_by_label("Strength", exact=True)).to_have_value("")
    expect(page.locator("#variation-settings")).to_have_attribute("open", "")
    assert problems == []


def test_settings_from_an_image_leave_the_edit_section_alone(
    browser: Any,  # noqa: F811
    live_server: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    body = {"prompt": "a generation", "steps": 2, "seed": 1, "response_format": "url"}
    made = httpx.post(f"{live.url}/v1/images/generations", json=body).json()
    (tmp_path / "made.png").write_bytes(httpx.get(made["data"][0]["url"]).content)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "src.png")
    page, problems = open_page(browser, live.url, 900)
    page.get_by_text("Edit an image", exact=True).click()
    page.get_by_label("Source image", exact=True).set_input_files(str(tmp_path / "src.png"))
    edit = {"Strength": "0.4", "Mask padding": "8", "Inpaint size": "16x16"}
    for label, value in edit.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_label("Inpaint area", exact=True).select_option("masked")
    page.locator("#settings-image").set_input_files(str(tmp_path / "made.png"))
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a generation")
    for label, value in edit.items():
        expect(page.get_by_label(label, exact=True)).to_have_value(value)
    expect(page.get_by_label("Inpaint area", exact=True)).to_have_value("masked")
    assert problems == []
