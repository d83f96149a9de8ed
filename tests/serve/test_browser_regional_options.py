"""Regional attention's Regional-Prompting-FLUX options on the web page in a real browser (Chromium through
Playwright, as tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): the four numbers
under Regions' "Regional attention options" are sent only with "Regional attention (one pass)" checked and
regions, the job and its image's record keep them, "Reuse settings" puts them back (and clears them for a
record without them), "Reproduce" sends them, an edit from the page sends them, and "Settings from an image"
fills them. The API: tests/serve/test_regional_options_api.py."""

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
LABELS = {
    "regional_steps": "Mask steps",
    "regional_double_interval": "Double block interval",
    "regional_single_interval": "Single block interval",
    "regional_base_ratio": "Base ratio",
}
CHOSEN = {"regional_steps": 2, "regional_single_interval": 2, "regional_base_ratio": 0.3}


def test_the_regional_options_are_sent_kept_reused_and_reproduced(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems, sent = open_page_sending(browser, live.url, height=1200)
    attention = page.get_by_label("Regional attention (one pass)", exact=True)
    inputs = {name: page.get_by_label(label, exact=True) for name, label in LABELS.items()}

    fill_settings(page, PROMPT, seed=7, steps=3)
    page.get_by_text("Regions", exact=True).click()
    expect(inputs["regional_steps"]).to_be_hidden()  # collapsed: an advanced setting
    page.get_by_text("Regional attention options", exact=True).click()
    assert "mask_inject_steps" in (page.locator("label[for=regional_steps]").get_attribute("title") or "")
    for name, value in CHOSEN.items():
        inputs[name].fill(str(value))
    for n, region in enumerate(SENT, start=1):
        page.get_by_role("button", name="Add region").click()
        _fill_region(page, n, region["prompt"], region["box"], str(region.get("strength", "")))

    attention.check()
    generate_one(page)
    assert {k: sent[-1].get(k) for k in CHOSEN} == CHOSEN, sent[-1]
    assert "regional_double_interval" not in sent[-1], sent[-1]  # empty: not sent (the default)
    job, pixels, record = _newest(live.url)
    assert {k: job["request"][k] for k in CHOSEN} == CHOSEN, job["request"]
    assert {k: record.get(k) for k in CHOSEN} == CHOSEN and record["regional_attention"] is True, record
    (alone,) = tiny.generate(
        GenerationRequest(PROMPT, steps=3, seed=7, regions=KEPT, regional_attention=True, **CHOSEN)
    )
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))
    (tmp_path / "rpf.png").write_bytes(httpx.get(job["results"][0]["url"]).content)

    # Reuse settings puts them back from the record; Reproduce sends them.
    for field in inputs.values():
        field.fill("")
    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 7)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    for name, value in CHOSEN.items():
        expect(inputs[name]).to_have_value(str(value))
    expect(inputs["regional_double_interval"]).to_have_value("")
    jobs = reproduce_twice(page, live.url, thumb, f"{PROMPT} (seed 7)")
    assert {k: jobs[0]["request"][k] for k in CHOSEN} == CHOSEN, jobs[0]["request"]

    # An edit from the page sends them with the regions (as form fields): its job and record keep them.
    thumb.first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Strength", exact=True).fill("0.8")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    assert job["request"]["kind"] == "edit" and {k: job["request"][k] for k in CHOSEN} == CHOSEN, job[
        "request"
    ]
    assert {k: record.get(k) for k in CHOSEN} == CHOSEN and record["mode"] == "img2img", record
    page.get_by_role("button", name="Clear images").click()  # the edit's source: back to generating

    # Without Regional attention they are not sent: they shape it, and the server refuses them alone.
    attention.uncheck()
    page.get_by_label("Seed", exact=True).fill("6")
    generate_one(page)
    assert not any(name in sent[-1] for name in LABELS) and "regional_attention" not in sent[-1], sent[-1]
    attention.check()

    # A bad one is the server's 400, named on the page (the inputs' bounds stop a base ratio past 1 there).
    inputs["regional_steps"].fill("1.5")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("regional_steps must be a share of the steps")
    problems[:] = [p for p in problems if not p.startswith("400 ")]  # that refusal was the point

    # Reusing a record without them (regional attention off) clears them.
    page.get_by_role("img", name=f"{PROMPT} (seed 6)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(attention).not_to_be_checked()
    for field in inputs.values():
        expect(field).to_have_value("")

    # Settings from an image that ran with them fill them again, with the regions and the checkbox.
    page.locator("#settings-image").set_input_files(str(tmp_path / "rpf.png"))
    expect(page.get_by_label("Seed", exact=True)).to_have_value("7")
    expect(attention).to_be_checked()
    for name, value in CHOSEN.items():
        expect(inputs[name]).to_have_value(str(value))
    expect(page.get_by_label("Region 2 prompt")).to_have_value("a blue square")
    assert problems == [], problems
