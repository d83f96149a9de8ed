"""Regional prompts on the web page in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): the Regions editor's rows go
with a generation as `regions` (an incomplete or wrong region is named on the page, not sent), the job and
its images' records keep them, "Reuse settings" puts them back (and clears them for a record without them),
"Reproduce" sends them again, an edit from the page sends them, and the server's refusal of regions beside
the block cache is shown. The API: tests/serve/test_regions_api.py."""

from __future__ import annotations

from typing import Any

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

PROMPT = "two shapes"
EDGES = ("left", "top", "right", "bottom")
# What the page sends for the rows filled below (an empty strength is left out: the server's 1)...
SENT = [
    {"box": [0, 0.25, 0.5, 0.75], "prompt": "a red circle"},
    {"box": [0.6, 0.1, 0.9, 0.33], "prompt": "a blue square", "strength": 2},
]
# ...and what the job and the records keep: every strength spelled out.
KEPT = [
    {"box": [0.0, 0.25, 0.5, 0.75], "prompt": "a red circle", "strength": 1.0},
    {"box": [0.6, 0.1, 0.9, 0.33], "prompt": "a blue square", "strength": 2.0},
]


def _fill_region(page: Any, n: int, prompt: str, box: list[float], strength: str = "") -> None:
    page.get_by_label(f"Region {n} prompt").fill(prompt)
    for edge, value in zip(EDGES, box, strict=True):
        page.get_by_label(f"Region {n} {edge}").fill(str(value))
    page.get_by_label(f"Region {n} strength").fill(strength)


def test_regions_are_sent_kept_reused_and_reproduced(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems, sent = open_page_sending(browser, live.url, height=1000)
    error = page.locator("#error")
    rows = page.locator("#region-boxes li")

    fill_settings(page, PROMPT, seed=7, steps=3)
    page.get_by_text("Regions", exact=True).click()
    page.get_by_role("button", name="Add region").click()
    _fill_region(page, 1, "a red circle", SENT[0]["box"])
    page.get_by_role("button", name="Add region").click()
    # An incomplete or wrong region is named on the page, and nothing is sent.
    page.get_by_role("button", name="Generate").click()
    expect(error).to_contain_text("Region 2: write what to draw in it.")
    page.get_by_label("Region 2 prompt").fill("a blue square")
    page.get_by_label("Region 2 right").fill("1.5")
    page.get_by_role("button", name="Generate").click()
    expect(error).to_contain_text("Region 2: left must be less than right")
    _fill_region(page, 2, "a blue square", SENT[1]["box"], strength="0")
    page.get_by_role("button", name="Generate").click()
    expect(error).to_contain_text("Region 2: the strength must be above 0 and at most 10")
    assert sent == []
    page.get_by_label("Region 2 strength").fill("2")
    expect(page.locator("#region-preview rect")).to_have_count(2)
    expect(page.locator("#region-preview text").nth(1)).to_have_text("a blue square")
    # The server's refusal of regions beside a prompt with AND is shown, in its words.
    page.get_by_label("Prompt", exact=True).fill("a red circle AND a blue square")
    page.get_by_label("Composable (AND)").check()
    page.get_by_role("button", name="Generate").click()
    expect(error).to_contain_text("regional prompts and AND (composable diffusion) do not go together")
    assert sent[-1]["regions"] == SENT and problems == [f"400 {live.url}/v1/jobs"], (sent, problems)
    problems.clear()
    page.get_by_label("Composable (AND)").uncheck()
    page.get_by_label("Prompt", exact=True).fill(PROMPT)

    generate_one(page)
    expect(error).to_be_empty()
    assert sent[-1]["regions"] == SENT and "layout" not in sent[-1], sent[-1]
    job, pixels, record = _newest(live.url)
    assert job["request"]["regions"] == KEPT and record["regions"] == KEPT, (job["request"], record)
    (alone,) = tiny.generate(GenerationRequest(PROMPT, steps=3, seed=7, regions=KEPT))
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))

    # Reuse settings puts the rows back from the record; Reproduce sends them again: the same PNG.
    page.get_by_role("button", name="Remove region 2").click()
    expect(rows).to_have_count(1)
    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 7)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(rows).to_have_count(2)
    expect(page.get_by_label("Region 2 prompt")).to_have_value("a blue square")
    expect(page.get_by_label("Region 2 left")).to_have_value("0.6")
    expect(page.get_by_label("Region 2 bottom")).to_have_value("0.33")
    expect(page.get_by_label("Region 2 strength")).to_have_value("2")
    expect(page.get_by_label("Region 1 strength")).to_have_value("1")
    jobs = reproduce_twice(page, live.url, thumb, f"{PROMPT} (seed 7)")
    assert jobs[0]["request"]["regions"] == KEPT, jobs[0]["request"]

    # An edit from the page sends them too (as the form's JSON text).
    thumb.first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Strength", exact=True).fill("0.8")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    assert job["request"]["kind"] == "edit" and job["request"]["regions"] == KEPT, job["request"]
    assert record["regions"] == KEPT and record["mode"] == "img2img", record

    # Cleared, a generation sends none, and Reuse settings of its image clears rows added since.
    page.get_by_role("button", name="Clear images").click()
    page.get_by_role("button", name="Clear regions").click()
    expect(rows).to_have_count(0)
    expect(page.locator("#region-preview rect")).to_have_count(0)
    page.get_by_label("Prompt", exact=True).fill("a plain circle")
    generate_one(page)
    assert "regions" not in sent[-1], sent[-1]
    job, _, record = _newest(live.url)
    assert job["request"]["regions"] is None and "regions" not in record, (job["request"], record)
    page.get_by_role("button", name="Add region").click()
    page.get_by_role("img", name="a plain circle (seed 7)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(rows).to_have_count(0)

    # More regions than the server takes are refused on the page, naming the limit.
    for _ in range(9):
        page.get_by_role("button", name="Add region").click()
    count = len(sent)
    page.get_by_role("button", name="Generate").click()
    expect(error).to_contain_text("At most 8 regions")
    assert len(sent) == count
    assert problems == [], problems
