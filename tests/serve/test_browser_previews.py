"""Live previews on the web page in a real browser (Chromium through Playwright, as
tests/serve/test_browser.py; skipped, and said so, without /usr/bin/chromium): while a job runs the page
shows its newest preview from the `preview` events, and hides it when the job ends."""

from __future__ import annotations

import time
from typing import Any

from pictor.pipeline import Pipeline
from tests.serve.test_browser import browser, fill_settings, open_page  # noqa: F401


class SlowSteps:
    """The tiny pipeline with a pause after each sampler step, so a job runs long enough to be watched, and,
    with `fail_word`, a fault at step 4 of a prompt holding that word."""

    def __init__(self, inner: Pipeline, pause: float, fail_word: str | None = None) -> None:
        self._inner = inner
        self.pause = pause
        self.fail_word = fail_word

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, request: Any, progress: Any = None, previews: Any = None) -> Any:
        def slow(step: int, total: int) -> None:
            if progress is not None:
                progress(step, total)
            if self.fail_word and self.fail_word in request.prompt and step == 4:
                raise RuntimeError("simulated fault")
            time.sleep(self.pause)

        return self._inner.generate(request, slow, previews)


def test_the_page_shows_live_previews_while_a_job_runs(
    browser: Any,  # noqa: F811
    live_server: Any,
    tiny: Pipeline,
) -> None:
    from playwright.sync_api import expect

    live = live_server(pipeline=SlowSteps(tiny, 0.4))
    page, problems = open_page(browser, live.url, 900)
    shown = page.locator("#live-preview")
    expect(shown).to_be_hidden()
    fill_settings(page, "a red circle watched", seed=3, steps=8)
    page.get_by_role("button", name="Generate").click()
    expect(shown).to_be_visible(timeout=20_000)
    src = shown.get_attribute("src") or ""
    assert src.startswith("data:image/jpeg;base64,"), src[:40]
    first_step = int(shown.get_attribute("data-step") or 0)
    assert 1 <= first_step <= 8
    # newer previews replace it while the job runs: a later step, and its picture loads
    deadline = time.monotonic() + 20
    while int(shown.get_attribute("data-step") or 0) <= first_step:  # the page's CSP forbids eval'd waits
        assert time.monotonic() < deadline, "no newer preview was shown"
        page.wait_for_timeout(50)
    assert shown.evaluate("img => img.naturalWidth") == 16  # the latent grid of the tiny model (f = 2)
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(shown).to_be_hidden()
    assert shown.get_attribute("src") is None
    assert problems == []
