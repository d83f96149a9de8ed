"""The guidance method on the web page in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): the Settings' "Guidance
method" select (CFG, APG, CFG-Zero*, Tangential CFG) shows the chosen method's own parameters beside the
rescale and the interval; APG with an interval is sent as `guidance_method` (the job and its image's record
keep it, and the pixels are Pipeline.generate's with it), plain CFG sends none, "Reuse settings" and
"Settings from an image" put a record's back, "Reproduce" sends it, and an edit from the page sends it (its
JSON text), as do variations. The API: tests/serve/test_guidance_methods_api.py and
tests/serve/test_variation_guidance_api.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pictor.guidance_methods import GuidanceMethod
from pictor.pipeline import GenerationRequest, Pipeline
from tests.serve.test_browser import (  # noqa: F401
    browser,
    fill_settings,
    generate_one,
    open_page_sending,
    reproduce_twice,
)
from tests.serve.test_browser_prompt_editing import _newest

PROMPT = "a red circle"
APG = GuidanceMethod("apg", eta=0.25, momentum=-0.5, start=0.0, stop=0.7)


def test_the_chosen_method_is_sent_kept_reused_reproduced_and_edited_with(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems, sent = open_page_sending(browser, live.url, height=1200)
    fill_settings(page, PROMPT, seed=7, steps=4)
    page.get_by_text(
        "Guidance method, rescale and interval", exact=True
    ).click()  # closed: settings stay short
    method = page.get_by_label("Guidance method", exact=True)
    options = method.locator("option").all()
    assert [o.text_content() for o in options] == ["CFG", "APG", "CFG-Zero*", "Tangential CFG"]
    assert method.input_value() == "cfg"
    eta, momentum = page.get_by_label("APG eta", exact=True), page.get_by_label("APG momentum", exact=True)
    zero_init = page.get_by_label("Zero init steps", exact=True)
    expect(eta).to_be_hidden()  # each method's own parameters only with it
    expect(zero_init).to_be_hidden()
    expect(page.get_by_label("Guidance rescale", exact=True)).to_be_visible()  # any method's
    method.select_option("cfg-zero-star")
    expect(zero_init).to_be_visible()
    expect(eta).to_be_hidden()
    zero_init.fill("3")  # then hidden, another method's: not sent

    # APG with an interval: sent, kept, and the library's pixels with it.
    method.select_option("apg")
    expect(eta).to_be_visible()
    expect(zero_init).to_be_hidden()
    eta.fill("0.25")
    momentum.fill("-0.5")
    page.get_by_label("Guidance stop", exact=True).fill("0.7")
    generate_one(page)
    assert sent[-1]["guidance_method"] == {"method": "apg", "eta": 0.25, "momentum": -0.5, "stop": 0.7}, sent[
        -1
    ]
    job, pixels, record = _newest(live.url)
    assert job["request"]["guidance_method"] == APG.record() == record["guidance_method"], (job, record)
    (alone,) = tiny.generate(GenerationRequest(PROMPT, steps=4, seed=7, guidance_method=APG))
    assert np.array_equal(pixels, np.asarray(alone.image.convert("RGB")))
    (plain,) = tiny.generate(GenerationRequest(PROMPT, steps=4, seed=7))
    assert not np.array_equal(pixels, np.asarray(plain.image.convert("RGB")))  # it changed the picture
    (tmp_path / "apg.png").write_bytes(httpx.get(job["results"][0]["url"]).content)

    # Reuse settings puts the record's method back; Reproduce sends it.
    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 7)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(method).to_have_value("apg")
    expect(eta).to_have_value("0.25")
    expect(momentum).to_have_value("-0.5")
    expect(page.get_by_label("APG norm threshold", exact=True)).to_have_value("15")
    expect(page.get_by_label("Guidance stop", exact=True)).to_have_value("0.7")
    jobs = reproduce_twice(page, live.url, thumb, f"{PROMPT} (seed 7)")
    assert jobs[0]["request"]["guidance_method"] == APG.record(), jobs[0]["request"]

    # An edit from the page sends the chosen method (its JSON text): its job and record keep it.
    method.select_option("tcfg")
    expect(eta).to_be_hidden()
    page.get_by_label("Guidance rescale", exact=True).fill("0.5")
    thumb.first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_label("Strength", exact=True).fill("0.8")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    tcfg = GuidanceMethod("tcfg", rescale=0.5, stop=0.7).record()
    assert job["request"]["kind"] == "edit" and job["request"]["guidance_method"] == tcfg, job["request"]
    assert record["guidance_method"] == tcfg and record["mode"] == "img2img", record

    # Variations send it too (its JSON text, as an edit's form): the variation's job and record keep it.
    thumb.first.click()
    page.get_by_role("button", name="Vary this image").click()
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job, _, record = _newest(live.url)
    assert job["request"]["kind"] == "edit" and job["request"]["variation"] is True, job["request"]
    assert job["request"]["guidance_method"] == tcfg, job["request"]
    assert record["guidance_method"] == tcfg and record["mode"] == "img2img", record
    page.get_by_label("Picture to vary").set_input_files([])
    page.get_by_role("button", name="Clear images").click()

    # Plain CFG with nothing typed sends none.
    method.select_option("cfg")
    for label in ("Guidance rescale", "Guidance start", "Guidance stop"):
        page.get_by_label(label, exact=True).fill("")
    page.get_by_label("Seed", exact=True).fill("8")
    generate_one(page)
    assert "guidance_method" not in sent[-1], sent[-1]

    # Settings from an image put its method back too (from plain CFG with nothing typed).
    page.locator("#settings-image").set_input_files(str(tmp_path / "apg.png"))
    expect(page.get_by_label("Seed", exact=True)).to_have_value("7")
    expect(method).to_have_value("apg")
    expect(eta).to_have_value("0.25")
    expect(page.get_by_label("Guidance stop", exact=True)).to_have_value("0.7")
    expect(page.get_by_label("Guidance rescale", exact=True)).to_have_value("0")
    assert problems == [], problems
