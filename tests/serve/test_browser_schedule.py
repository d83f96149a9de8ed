"""The timestep schedule on the web page in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): the Settings' "Schedule" select
lists the model card's schedules after "model default", a chosen one is sent as `schedule` (the job and its
image's record keep it, and the pixels are Pipeline.generate's with it), "model default" sends none, "Reuse
settings" and "Settings from an image" put a record's back, "Reproduce" sends it, and an edit from the page
sends the chosen one. The API: tests/serve/test_api.py (the card lists every schedule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pictor.pipeline import GenerationRequest, Pipeline
from pictor.sampling import SCHEDULES
from tests.serve.test_browser import (  # noqa: F401
    browser,
    fill_settings,
    generate_one,
    open_page_sending,
    reproduce_twice,
)
from tests.serve.test_browser_prompt_editing import _newest

PROMPT = "a red circle"


def test_the_chosen_schedule_is_sent_kept_reused_reproduced_and_edited_with(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems, sent = open_page_sending(browser, live.url, height=1000)
    fill_settings(page, PROMPT, seed=7, steps=3)
    schedule = page.get_by_label("Schedule", exact=True)
    expect(schedule.locator("option")).to_have_count(1 + len(SCHEDULES))  # filled from the model card
    options = schedule.locator("option").all()
    assert [o.text_content() for o in options] == ["model default", *SCHEDULES]
    assert schedule.input_value() == ""  # the model's own unless chosen

    # A chosen schedule is sent; the job and the record keep it; the pixels are the library's with it.
    schedule.select_option("karras")
    generate_one(page)
    assert sent[-1]["schedule"] == "karras", sent[-1]
    job, pixels, record = _newest(live.url)
    assert job["request"]["schedule"] == "karras" and record["schedule"] == "karras", (job["request"], record)
    (alone,) = tiny.generate(GenerationRequest(PROMPT, steps=3, seed=7, schedule="karras"))
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))
    (default,) = tiny.generate(GenerationRequest(PROMPT, steps=3, seed=7))
    assert not np.array_equal(pixels, np.asarray(default.image.convert("RGB")))  # it changed the picture
    (tmp_path / "karras.png").write_bytes(httpx.get(job["results"][0]["url"]).content)

    # Reuse settings puts the record's schedule back; Reproduce sends it.
    schedule.select_option("")
    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 7)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(schedule).to_have_value("karras")
    jobs = reproduce_twice(page, live.url, thumb, f"{PROMPT} (seed 7)")
    assert jobs[0]["request"]["schedule"] == "karras", jobs[0]["request"]

    # An edit from the page sends the chosen schedule (as a form field): its job and record keep it.
    schedule.select_option("beta")
    thumb.first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Strength", exact=True).fill("0.8")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    assert job["request"]["kind"] == "edit" and job["request"]["schedule"] == "beta", job["request"]
    assert record["schedule"] == "beta" and record["mode"] == "img2img", record
    page.get_by_role("button", name="Clear images").click()  # the edit's source: back to generating

    # "model default" sends none: the model's own runs, which the record names; reusing it selects that.
    schedule.select_option("")
    page.get_by_label("Seed", exact=True).fill("8")
    generate_one(page)
    assert "schedule" not in sent[-1], sent[-1]
    job, pixels, record = _newest(live.url)
    own = tiny.defaults["schedule"]  # the server fills in the model's own, as the library does
    assert own in SCHEDULES and own != "karras", tiny.defaults
    assert job["request"]["schedule"] == own and record["schedule"] == own, (job["request"], record)
    (alone,) = tiny.generate(GenerationRequest(PROMPT, steps=3, seed=8))
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))
    schedule.select_option("karras")
    page.get_by_role("img", name=f"{PROMPT} (seed 8)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(schedule).to_have_value(own)

    # Settings from an image put its schedule back too.
    page.locator("#settings-image").set_input_files(str(tmp_path / "karras.png"))
    expect(page.get_by_label("Seed", exact=True)).to_have_value("7")
    expect(schedule).to_have_value("karras")
    assert problems == [], problems
