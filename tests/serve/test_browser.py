"""The web page in a real browser: Debian's chromium driven by Playwright (no browser download).

CI installs chromium with `apt-get install -y chromium`. Without /usr/bin/chromium this test skips and says
so; every other failure (Playwright missing, the page broken) fails.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
KEY = "browser-key"
PROMPT = "a red circle in the browser"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve.png"


def save_small_screenshot(png: bytes, path: Path) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        small = im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    small.quantize(colors=96).save(path, optimize=True)


@pytest.fixture(scope="module")
def browser() -> Any:
    if not CHROMIUM.exists():
        # CI installs chromium (.ci/run), so there a missing browser is a failure, never a quiet skip.
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} not found, but CI must run the browser test (see .ci/run)")
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run this test"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: chromium refuses to start as root (CI containers) with its sandbox on
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser: Any, url: str, height: int) -> tuple[Any, list[str]]:
    """The page of a server whose model is loaded, and the list that collects its script errors and every
    HTTP error it meets (a test ends by asserting it is empty)."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1000, "height": height})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(url + "/")
    expect(page.locator("#model-info")).to_contain_text("Model tiny")
    return page, problems


def open_page_sending(browser: Any, url: str, height: int) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """`open_page`, and the list that collects the JSON bodies of the page's generations as it sends them."""
    page, problems = open_page(browser, url, height)
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: (
            sent.append(r.post_data_json) if r.method == "POST" and r.url.endswith("/v1/jobs") else None
        ),
    )
    return page, problems, sent


def fill_settings(page: Any, prompt: str | None, seed: int, steps: int) -> None:
    """The prompt (unless None: left as it is), and the seed and steps under Settings."""
    if prompt is not None:
        page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_text("Settings", exact=True).click()
    page.get_by_label("Seed", exact=True).fill(str(seed))
    page.get_by_label("Steps", exact=True).fill(str(steps))


def generate_one(page: Any) -> None:
    """Press Generate and wait until the page says its one image is done."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)


def reproduce_twice(page: Any, url: str, thumb: Any, name: str) -> list[dict[str, Any]]:
    """Reproduce the image `thumb` shows from the viewer; the two jobs (newest first), whose PNGs must be
    the same bytes."""
    from playwright.sync_api import expect

    thumb.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.get_by_role("img", name=name)).to_have_count(2, timeout=30_000)
    jobs: list[dict[str, Any]] = httpx.get(f"{url}/v1/jobs").json()["data"]
    a, b = (httpx.get(j["results"][0]["url"]).content for j in jobs)
    assert a == b
    return jobs


def test_generate_view_provenance_reuse_reproduce(browser: Any, live_server: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    live = live_server(api_key=KEY)
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(m.text) if m.type == "error" and "401" not in m.text else None
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response",
        lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 and r.status != 401 else None,
    )
    page.goto(live.url + "/")

    # The server has a key: the page asks for it once, keeps it in sessionStorage and sends it.
    expect(page.locator("#key-dialog")).to_be_visible()
    page.get_by_role("textbox", name="API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#model-info")).to_contain_text("Model tiny")
    assert page.evaluate("sessionStorage.getItem('pictor-api-key')") == KEY

    # Every form control has a label, and the progress region is announced.
    unlabeled = page.evaluate(
        """[...document.querySelectorAll('input, textarea, select')]
             .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
             .map(el => el.id)"""
    )
    assert unlabeled == []
    assert page.get_attribute("#status", "aria-live") == "polite"

    fill_settings(page, PROMPT, 42, 6)
    generate_one(page)

    thumb = page.get_by_role("img", name=f"{PROMPT} (seed 42)")
    expect(thumb).to_be_visible()
    # the <img> really loaded (a signed URL: no header needed)
    page.wait_for_function("img => img.complete && img.naturalWidth === 32", arg=thumb.element_handle())

    thumb.click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-parameters")).to_contain_text("Steps: 6")
    expect(page.locator("#viewer-parameters")).to_contain_text("Seed: 42")
    page.get_by_text("Full record (JSON)").click()
    expect(page.locator("#viewer-record")).to_contain_text(f'"prompt": "{PROMPT}"')
    assert page.get_attribute("#download-link", "download") == "pictor-42.png"
    if os.environ.get("PICTOR_UPDATE_SCREENSHOT"):  # refreshes the README's picture of the page
        save_small_screenshot(page.screenshot(), SCREENSHOT)

    page.get_by_role("button", name="Reuse settings").click()
    expect(viewer).to_be_hidden()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    expect(page.get_by_label("Seed", exact=True)).to_have_value("42")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("6")

    page.get_by_label("Prompt", exact=True).fill("something else")
    thumb.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.get_by_role("img", name=f"{PROMPT} (seed 42)")).to_have_count(2, timeout=30_000)
    jobs = httpx.get(f"{live.url}/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [j["request"]["seed"] for j in jobs] == [42, 42] and jobs[0]["request"]["steps"] == 6
    a, b = (httpx.get(j["results"][0]["url"]).content for j in jobs)
    assert a == b  # reproduce: the same image, provenance included

    page.get_by_label("Search prompts").fill("no such prompt")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#gallery-empty")).to_be_visible()
    page.get_by_label("Search prompts").fill("RED CIRCLE")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#gallery img")).to_have_count(2)
    assert problems == [], problems


def test_the_page_waits_for_a_loading_model(
    browser: Any, live_server: Any, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page opened while the server loads its model says so, then shows the model once it is ready."""
    from playwright.sync_api import expect

    loaded = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loaded.wait(60), "the test never let the model load"
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)  # the server's loader imports it when it runs
    live = live_server(lazy=True, model="tiny")
    page = browser.new_page()
    try:
        page.goto(live.url + "/")
        info = page.locator("#model-info")
        expect(info).to_contain_text("(loading…)")
        page.get_by_text("Settings", exact=True).click()
        page.get_by_label("Sampler", exact=True).select_option("heun")
        page.wait_for_timeout(1500)  # the page asks again meanwhile; still loading, the choice kept
        expect(info).to_contain_text("(loading…)")
        expect(page.get_by_label("Sampler", exact=True)).to_have_value("heun")
    finally:
        loaded.set()  # a failure above must not leave the server's loader blocked
    expect(info).to_contain_text("default 32x32", timeout=15_000)
    expect(page.get_by_label("Sampler", exact=True)).to_have_value("heun")
    expect(info).not_to_contain_text("loading")
    expect(page.locator("#error")).to_be_empty()


def test_the_page_says_why_the_model_failed_to_load(
    browser: Any, live_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import expect

    def broken_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        raise ValueError("weights.safetensors: not a readable safetensors file")

    monkeypatch.setattr("pictor.loading.load", broken_load)
    live = live_server(lazy=True, model="tiny")
    page = browser.new_page()
    page.goto(live.url + "/")
    expect(page.locator("#error")).to_contain_text(
        "the model failed to load: ValueError: weights.safetensors: not a readable safetensors file",
        timeout=15_000,
    )
    expect(page.locator("#model-info")).to_have_text("Model tiny (failed to load)")


def test_edit_an_image_from_the_viewer_with_a_mask(browser: Any, live_server: Any, tmp_path: Path) -> None:
    import json

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=700)

    fill_settings(page, "a source to edit", 5, 3)
    generate_one(page)

    # The viewer hands its PNG to the edit form; a mask file from disk says where to repaint.
    page.get_by_role("img", name="a source to edit (seed 5)").click()
    page.get_by_role("button", name="Edit this image").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.get_by_role("button", name="Edit image")).to_be_visible()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # white = repaint: the left half
    mask.save(tmp_path / "mask.png")
    page.get_by_label("Mask", exact=True).set_input_files(str(tmp_path / "mask.png"))
    page.get_by_label("Prompt", exact=True).fill("a blue square on the left")
    page.get_by_label("Seed", exact=True).fill("9")
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.get_by_role("img", name="a blue square on the left (seed 9)")).to_be_visible()

    edit_job, source_job = httpx.get(f"{live.url}/v1/jobs").json()["data"][:2]
    assert edit_job["request"]["kind"] == "edit" and edit_job["request"]["mask"]
    assert edit_job["status"] == "succeeded"

    def png(job: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
            return np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])

    (edited, record), (source, _) = png(edit_job), png(source_job)
    assert record["mode"] == "inpaint" and record["seed"] == 9
    assert np.array_equal(edited[:, 18:], source[:, 18:])  # the black half of the mask is kept
    assert not np.array_equal(edited[:, :14], source[:, :14])

    # Clearing the images goes back to plain generation.
    page.get_by_role("button", name="Clear images").click()
    expect(page.get_by_role("button", name="Generate")).to_be_visible()
    assert problems == [], problems


def test_make_variations_of_a_picture_from_disk(browser: Any, live_server: Any, tmp_path: Path) -> None:
    """Variations go to POST /v1/jobs/variations with an empty prompt and the chosen strength: an edit job of
    that picture, whose images show in the history. The server's 400 shows on the page as errors do."""
    import json

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from pictor.editing import pixel_sha256

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    picture = np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    Image.fromarray(picture[:30, :30]).save(tmp_path / "odd.png")  # the tiny model takes multiples of 4

    # Choosing a picture to vary puts an edit's source away: the button says which of the two it sends.
    page.get_by_text("Edit an image", exact=True).click()
    page.get_by_label("Source image", exact=True).set_input_files(str(tmp_path / "picture.png"))
    page.get_by_text("Variations", exact=True).click()
    expect(page.get_by_label("Variation strength")).to_have_attribute("placeholder", "0.7")
    page.get_by_label("Picture to vary").set_input_files(str(tmp_path / "odd.png"))
    expect(page.get_by_label("Source image", exact=True)).to_have_value("")
    fill_settings(page, None, 3, 2)  # the prompt stays empty: the picture alone says what to draw
    page.get_by_label("Images", exact=True).fill("2")
    page.get_by_label("Variation strength").fill("0.55")
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#error")).to_contain_text("multiples of 4")

    page.get_by_label("Picture to vary").set_input_files(str(tmp_path / "picture.png"))
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#status")).to_contain_text("Done: 2 images", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#gallery img")).to_have_count(2)
    for thumb in page.locator("#gallery img").element_handles():
        page.wait_for_function("img => img.complete && img.naturalWidth === 32", arg=thumb)

    (listed,) = httpx.get(f"{live.url}/v1/jobs").json()["data"]  # the refused picture queued nothing
    job = httpx.get(f"{live.url}/v1/jobs/{listed['id']}").json()
    request = job["request"]
    assert job["status"] == "succeeded" and request["kind"] == "edit" and request["mask"] is None
    assert (request["prompt"], request["strength"], request["seed"]) == ("", 0.55, 3)
    assert len(job["results"]) == 2
    for result in job["results"]:
        with Image.open(io.BytesIO(httpx.get(result["url"]).content)) as im:
            record = json.loads(im.text["pictor"])
        assert record["mode"] == "img2img" and record["strength"] == 0.55
        assert record["source_image"]["sha256"] == pixel_sha256(picture)  # drawn from the uploaded picture

    # The viewer hands its PNG to the Variations section, as "Edit this image" does to the edit form.
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Vary this image").click()
    expect(page.locator("#viewer")).to_be_hidden()
    page.get_by_label("Images", exact=True).fill("1")
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    newest, first = httpx.get(f"{live.url}/v1/jobs").json()["data"][:2]
    assert newest["request"]["kind"] == "edit" and newest["status"] == "succeeded"
    with Image.open(io.BytesIO(httpx.get(newest["results"][0]["url"]).content)) as im:
        source = json.loads(im.text["pictor"])["source_image"]["sha256"]
    hashes = []
    for result in first["results"]:
        with Image.open(io.BytesIO(httpx.get(result["url"]).content)) as im:
            hashes.append(pixel_sha256(np.asarray(im.convert("RGB"))))
    assert source in hashes  # drawn from one of the first variations, as viewed
    assert problems == [f"400 {live.url}/v1/jobs/variations"], problems


def test_generate_from_a_reference_picture(
    browser: Any, live_server: Any, referenced: Any, tmp_path: Path
) -> None:
    """The picture goes up with the JSON request (a data: URL); the prompt may stay empty with it, not
    without; the image's record names the picture's hash; Reproduce says why it cannot."""
    import json

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from pictor.reference_files import reference_pixels

    live = live_server(pipeline=referenced)
    page, problems = open_page(browser, live.url, height=700)

    page.get_by_role("button", name="Generate").click()  # nothing to go on: said on the page, not sent
    expect(page.locator("#error")).to_contain_text("Write a prompt")
    expect(page.locator("#context-settings")).to_be_hidden()  # not a Kontext model: nothing to offer
    expect(page.locator("#control-settings")).to_be_hidden()  # nor a Canny / Depth one
    expect(page.locator("#redux-settings")).to_be_hidden()  # nor a server with FLUX.1 Redux
    expect(page.locator("#ip-adapter-settings")).to_be_hidden()  # nor one with the IP-Adapter
    picture = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    page.get_by_text("Reference picture", exact=True).first.click()
    page.get_by_label("Reference picture", exact=True).set_input_files(str(tmp_path / "picture.png"))
    fill_settings(page, None, 5, 3)
    generate_one(page)
    expect(page.locator("#error")).to_be_empty()

    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["status"] == "succeeded" and job["request"]["prompt"] == "" and job["request"]["reference"]
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        record = json.loads(im.text["pictor"])
    want = reference_pixels(picture, 32, 32)
    from pictor.editing import pixel_sha256

    assert record["reference_image"]["sha256"] == pixel_sha256(want)

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.locator("#error")).to_contain_text("does not keep")

    # The picture goes with an edit too (a third file in the multipart form), the prompt still empty.
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    edit_job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert edit_job["request"]["kind"] == "edit" and edit_job["request"]["reference"]
    with Image.open(io.BytesIO(httpx.get(edit_job["results"][0]["url"]).content)) as im:
        assert json.loads(im.text["pictor"])["reference_image"]["sha256"] == pixel_sha256(want)
    assert problems == [], problems


def test_a_kontext_model_offers_a_context_picture(browser: Any, live_server: Any, tmp_path: Path) -> None:
    """On a FLUX.1 Kontext model the page shows its context picture, which goes up with a generation (a
    data: URL) and with an edit (a file in the multipart form); Reproduce says why it cannot."""
    from playwright.sync_api import expect

    from tests.test_kontext import _picture, _pipe

    live = live_server(pipeline=_pipe(kontext=True))
    page, problems = open_page(browser, live.url, height=900)
    _picture(5).save(tmp_path / "context.png")
    page.get_by_text("Context picture (FLUX.1 Kontext)", exact=True).click()
    page.get_by_label("Context picture", exact=True).set_input_files(str(tmp_path / "context.png"))
    fill_settings(page, "make the circle blue", 5, 2)
    generate_one(page)
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["status"] == "succeeded" and job["request"]["context_image"]
    assert (job["request"]["width"], job["request"]["height"]) == (40, 24)  # the fitted context's size

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.locator("#error")).to_contain_text("Context picture")
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    edit_job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert edit_job["request"]["kind"] == "edit" and edit_job["request"]["context_image"]
    assert problems == [], problems


def test_a_fill_model_says_what_it_needs_and_paints_a_mask(
    browser: Any, live_server: Any, tmp_path: Path
) -> None:
    """On a FLUX.1 Fill model the page says it repaints masked pictures, refuses a plain generation itself
    (no job is made), and an edit with a mask paints."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from tests.serve.test_edits import source_image
    from tests.serve.test_fill_api import fill_pipeline

    live = live_server(pipeline=fill_pipeline())
    page, problems = open_page(browser, live.url, height=900)
    expect(page.locator("#model-info")).to_contain_text("FLUX.1 Fill")
    fill_settings(page, "a red circle", 5, 2)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("Choose a source image and a mask")
    assert httpx.get(f"{live.url}/v1/jobs").json()["data"] == []
    source_image().save(tmp_path / "source.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # white = repaint: the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    page.get_by_label("Source image", exact=True).set_input_files(str(tmp_path / "source.png"))
    page.get_by_label("Mask", exact=True).set_input_files(str(tmp_path / "mask.png"))
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    (job,) = httpx.get(f"{live.url}/v1/jobs").json()["data"]
    assert job["status"] == "succeeded" and job["request"]["kind"] == "edit" and job["request"]["mask"]
    assert problems == [], problems


def test_a_control_model_asks_for_a_control_picture_and_sends_it(
    browser: Any, live_server: Any, tmp_path: Path
) -> None:
    """On a FLUX.1 Canny model the page shows its control picture and "Draw Canny edges"; a Generate without
    a picture is answered on the page (no job is made); with one, the generation (a data: URL) and an edit
    (a file in the multipart form) send it and the thresholds; Reuse settings puts the thresholds back, and
    Reproduce says why it cannot."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from pictor.control_images import DEFAULT_CANNY
    from pictor.pipeline import GenerationRequest
    from tests.serve.test_control_api import control_picture, control_pipeline

    pipe = control_pipeline("canny")
    live = live_server(pipeline=pipe)
    page, problems = open_page(browser, live.url, height=1100)
    expect(page.locator("#model-info")).to_contain_text("FLUX.1 Canny")
    expect(page.locator("#control-settings")).to_be_visible()  # open from the start: every image needs it
    expect(page.locator("#context-settings")).to_be_hidden()
    fill_settings(page, "a robot in a library", 5, 2)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("Choose one under Control picture")
    assert httpx.get(f"{live.url}/v1/jobs").json()["data"] == []

    picture = control_picture()
    picture.save(tmp_path / "control.png")
    page.get_by_label("Control picture", exact=True).set_input_files(str(tmp_path / "control.png"))
    page.get_by_label("Draw Canny edges").check()
    generate_one(page)
    expect(page.locator("#error")).to_be_empty()
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["status"] == "succeeded" and job["request"]["control_image"]
    assert job["request"]["control_canny"] == [50.0, 200.0]
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        served = np.asarray(im.convert("RGB"))
    (direct,) = pipe.generate(
        GenerationRequest(
            "a robot in a library", seed=5, steps=2, control_image=picture, control_canny=DEFAULT_CANNY
        )
    )
    assert np.array_equal(served, np.asarray(direct.image))

    page.get_by_label("Draw Canny edges").uncheck()
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("Draw Canny edges")).to_be_checked()
    expect(page.get_by_label("Canny low threshold")).to_have_value("50")
    expect(page.get_by_label("Canny high threshold")).to_have_value("200")
    page.get_by_label("Canny low threshold").fill("30")  # the high one left at its value
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.locator("#error")).to_contain_text("Control picture")

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    edit_job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert edit_job["request"]["kind"] == "edit" and edit_job["request"]["control_image"]
    assert edit_job["request"]["control_canny"] == [30.0, 200.0]
    # variations take no control picture: with one chosen, the page still answers them itself
    jobs = len(httpx.get(f"{live.url}/v1/jobs").json()["data"])
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Vary this image").click()
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#error")).to_contain_text("which variations do not take")
    assert len(httpx.get(f"{live.url}/v1/jobs").json()["data"]) == jobs
    assert problems == [], problems


def test_a_depth_control_model_offers_no_canny_edges(browser: Any, live_server: Any, tmp_path: Path) -> None:
    """A FLUX.1 Depth model takes a control picture (a depth map) but refuses Canny edges: the page does not
    offer them, and a generation with a picture sends none."""
    from playwright.sync_api import expect

    from tests.serve.test_control_api import control_picture, control_pipeline

    live = live_server(pipeline=control_pipeline("depth"))
    page, problems = open_page(browser, live.url, height=900)
    expect(page.locator("#model-info")).to_contain_text("FLUX.1 Depth")
    expect(page.locator("#control-summary")).to_have_text("Control picture (FLUX.1 Depth)")
    expect(page.locator("#canny-options")).to_be_hidden()
    control_picture(2).save(tmp_path / "depth.png")
    page.get_by_label("Control picture", exact=True).set_input_files(str(tmp_path / "depth.png"))
    fill_settings(page, "a castle at dusk", 5, 2)
    generate_one(page)
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["request"]["control_image"] and job["request"]["control_canny"] is None
    assert problems == [], problems


def test_a_controlnet_server_asks_for_its_pictures_and_sends_them(
    browser: Any, live_server: Any, tmp_path: Path
) -> None:
    """With two ControlNets (an InstantX-like and a Union one) the page shows a picture and scale each, and
    the Union one's mode; a Generate without a picture, or without the Union one's mode, is answered on the
    page (no job is made); with them, a generation (data: URLs) and an edit (the controlnet_image field
    repeated) send the pictures, scales, modes and window; Reuse settings puts those back; Reproduce and
    variations say why they cannot."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from pictor.pipeline import GenerationRequest
    from tests.serve.test_controlnet_api import DEPTH, EDGES, controlnet_file, with_controlnets

    nets = (
        controlnet_file(tmp_path / "edges.safetensors", 1),
        controlnet_file(tmp_path / "union.safetensors", 2, 3),
    )
    pipe = with_controlnets(*nets)
    live = live_server(pipeline=pipe)
    page, problems = open_page(browser, live.url, height=1300)
    expect(page.locator("#model-info")).to_contain_text("FLUX.1 ControlNets: edges, union")
    expect(page.locator("#controlnet-settings")).to_be_visible()  # open from the start: every image needs it
    expect(page.locator("#controlnet-summary")).to_have_text("ControlNet pictures (edges, union)")
    expect(page.get_by_label("ControlNet 1 mode")).to_have_count(0)  # not a Union ControlNet
    fill_settings(page, "a robot in a library", 5, 2)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("Choose ControlNet 1's picture (edges)")
    EDGES.save(tmp_path / "edges.png")
    DEPTH.save(tmp_path / "depth.png")
    page.get_by_label("ControlNet 1 picture", exact=True).set_input_files(str(tmp_path / "edges.png"))
    page.get_by_label("ControlNet 2 picture", exact=True).set_input_files(str(tmp_path / "depth.png"))
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("is a Union ControlNet: choose what its picture is")
    assert httpx.get(f"{live.url}/v1/jobs").json()["data"] == []

    page.get_by_label("ControlNet 2 mode").select_option("depth")
    page.get_by_label("ControlNet 1 scale").fill("0.6")
    page.get_by_label("ControlNet end").fill("0.5")
    generate_one(page)
    expect(page.locator("#error")).to_be_empty()
    request = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]["request"]
    assert len(request["controlnet_images"]) == 2 and request["controlnet_scales"] == [0.6, 1.0]
    assert request["controlnet_modes"] == [None, 2] and request["controlnet_end"] == 0.5
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        served = np.asarray(im.convert("RGB"))
    settings = {"controlnet_scales": [0.6, 1.0], "controlnet_modes": [None, "depth"], "controlnet_end": 0.5}
    (direct,) = pipe.generate(
        GenerationRequest(
            "a robot in a library", seed=5, steps=2, controlnet_images=[EDGES, DEPTH], **settings
        )
    )
    assert np.array_equal(served, np.asarray(direct.image))

    page.get_by_label("ControlNet 1 scale").fill("")
    page.get_by_label("ControlNet 2 mode").select_option("")
    page.get_by_label("ControlNet end").fill("")
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("ControlNet 1 scale")).to_have_value("0.6")
    expect(page.get_by_label("ControlNet 2 mode")).to_have_value("depth")
    expect(page.get_by_label("ControlNet end")).to_have_value("0.5")
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.locator("#error")).to_contain_text("under ControlNet pictures")

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    edit = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]["request"]
    assert edit["kind"] == "edit" and len(edit["controlnet_images"]) == 2
    assert edit["controlnet_scales"] == [0.6, 1.0] and edit["controlnet_modes"] == [None, 2]
    assert edit["controlnet_end"] == 0.5
    # variations take no ControlNet pictures: the page answers them itself
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Vary this image").click()
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#error")).to_contain_text("which variations do not take")
    assert len(httpx.get(f"{live.url}/v1/jobs").json()["data"]) == 2
    assert problems == [], problems


def test_a_redux_server_offers_a_redux_picture_and_varies_through_it(
    browser: Any, live_server: Any, tmp_path: Path
) -> None:
    """With FLUX.1 Redux loaded the page shows a Redux picture and its strength: a generation (a data: URL,
    the prompt may then be empty) and an edit (a file) send them; Reuse settings puts the strength back and
    Reproduce says why it cannot; a variation has no img2img strength and draws from its picture through
    Redux, and is not sent beside another Redux picture."""
    import json

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from pictor.pipeline import GenerationRequest
    from tests.serve.test_redux_api import dev_pipeline, redux_files, redux_picture

    pipe = dev_pipeline()
    pipe.set_redux(*redux_files(tmp_path))
    live = live_server(pipeline=pipe)
    page, problems = open_page(browser, live.url, height=1300)
    expect(page.locator("#model-info")).to_contain_text("FLUX.1 Redux")
    page.get_by_text("Redux picture (FLUX.1 Redux)", exact=True).click()
    page.get_by_role("button", name="Generate").click()  # nothing to go on: said on the page, not sent
    expect(page.locator("#error")).to_contain_text("choose a reference or Redux picture")

    picture = redux_picture()
    picture.save(tmp_path / "redux.png")
    page.get_by_label("Redux picture", exact=True).set_input_files(str(tmp_path / "redux.png"))
    page.get_by_label("Redux strength", exact=True).fill("0.5")
    fill_settings(page, None, 5, 2)
    generate_one(page)
    expect(page.locator("#error")).to_be_empty()
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["request"]["prompt"] == "" and job["request"]["redux_image"]
    assert job["request"]["redux_strength"] == 0.5
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        served, record = np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])
    (direct,) = pipe.generate(GenerationRequest("", seed=5, steps=2, redux_image=picture, redux_strength=0.5))
    assert np.array_equal(served, np.asarray(direct.image)) and record["redux"]["strength"] == 0.5

    page.get_by_label("Redux strength", exact=True).fill("")
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("Redux strength", exact=True)).to_have_value("0.5")
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.locator("#error")).to_contain_text("under Redux picture")

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    edit_job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert edit_job["request"]["kind"] == "edit" and edit_job["request"]["redux_image"]
    assert edit_job["request"]["redux_strength"] == 0.5

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Vary this image").click()
    expect(page.get_by_label("Variation strength")).to_be_disabled()
    expect(page.locator("#variation-redux-help")).to_be_visible()
    page.get_by_role("button", name="Make variations").click()  # beside a Redux picture: said, not sent
    expect(page.locator("#error")).to_contain_text("A variation's picture is its Redux picture")
    assert len(httpx.get(f"{live.url}/v1/jobs").json()["data"]) == 2
    page.get_by_role("button", name="Clear Redux picture").click()
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    variation = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert "kind" not in variation["request"] and variation["request"]["redux_image"]
    assert variation["request"]["redux_strength"] == 0.5
    assert problems == [], problems


def test_an_ip_adapter_server_offers_an_ip_adapter_picture(
    browser: Any, live_server: Any, tmp_path: Path
) -> None:
    """With XLabs' FLUX.1 IP-Adapter loaded the page shows an IP-Adapter picture and its scale: a generation
    (a data: URL, the prompt may then be empty) and an edit (a file) send them; Reuse settings puts the scale
    back and Reproduce says why it cannot; a variation, which takes no IP-Adapter picture, is not sent beside
    one."""
    import json

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from pictor.pipeline import GenerationRequest
    from tests.serve.test_ip_adapter_api import ip_adapter_files, ip_picture
    from tests.serve.test_redux_api import dev_pipeline

    pipe = dev_pipeline()
    pipe.set_ip_adapter(*ip_adapter_files(tmp_path))
    live = live_server(pipeline=pipe)
    page, problems = open_page(browser, live.url, height=1300)
    expect(page.locator("#model-info")).to_contain_text("IP-Adapter")
    expect(page.locator("#redux-settings")).to_be_hidden()  # no FLUX.1 Redux here
    page.get_by_text("IP-Adapter picture (XLabs' FLUX.1 IP-Adapter)", exact=True).click()
    page.get_by_role("button", name="Generate").click()  # nothing to go on: said on the page, not sent
    expect(page.locator("#error")).to_contain_text("choose a reference or IP-Adapter picture")

    picture = ip_picture()
    picture.save(tmp_path / "ip.png")
    page.get_by_label("IP-Adapter picture", exact=True).set_input_files(str(tmp_path / "ip.png"))
    page.get_by_label("IP-Adapter scale", exact=True).fill("0.5")
    fill_settings(page, None, 5, 2)
    generate_one(page)
    expect(page.locator("#error")).to_be_empty()
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["request"]["prompt"] == "" and job["request"]["ip_adapter_image"]
    assert job["request"]["ip_adapter_scale"] == 0.5
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        served, record = np.asarray(im.convert("RGB")), json.loads(im.text["pictor"])
    request = GenerationRequest("", seed=5, steps=2, ip_adapter_image=picture, ip_adapter_scale=0.5)
    (direct,) = pipe.generate(request)
    assert np.array_equal(served, np.asarray(direct.image)) and record["ip_adapter"]["scale"] == 0.5

    page.get_by_label("IP-Adapter scale", exact=True).fill("")
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("IP-Adapter scale", exact=True)).to_have_value("0.5")
    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.locator("#error")).to_contain_text("under IP-Adapter picture")

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Edit this image").click()
    page.get_by_role("button", name="Edit image").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    edit_job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert edit_job["request"]["kind"] == "edit" and edit_job["request"]["ip_adapter_image"]
    assert edit_job["request"]["ip_adapter_scale"] == 0.5

    page.locator("#gallery img").first.click()
    page.get_by_role("button", name="Vary this image").click()
    page.get_by_role("button", name="Make variations").click()  # beside an IP-Adapter picture: said, not sent
    expect(page.locator("#error")).to_contain_text("Variations do not take an IP-Adapter picture")
    assert len(httpx.get(f"{live.url}/v1/jobs").json()["data"]) == 2
    page.get_by_role("button", name="Clear IP-Adapter picture").click()
    page.get_by_role("button", name="Make variations").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#error")).to_be_empty()
    variation = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert variation["request"]["kind"] == "edit" and not variation["request"].get("ip_adapter_image")
    assert problems == [], problems


def test_generate_with_a_layout(browser: Any, live_server: Any, laid_out: Any) -> None:
    """Boxes from the layout editor go with the request (refused on the page when a box is incomplete),
    the record keeps them, Reuse settings puts them back and Reproduce makes the same image."""
    import json

    from PIL import Image
    from playwright.sync_api import expect

    live = live_server(pipeline=laid_out)
    page, problems = open_page(browser, live.url, height=900)

    fill_settings(page, "two shapes", 7, 3)
    page.get_by_text("Layout", exact=True).click()
    page.get_by_role("button", name="Add box").click()
    page.get_by_label("Box 1 phrase").fill("a red circle")
    for edge, value in zip(("left", "top", "right", "bottom"), ("0", "0.25", "0.5", "0.75"), strict=True):
        page.get_by_label(f"Box 1 {edge}").fill(value)
    page.get_by_role("button", name="Add box").click()
    page.get_by_role("button", name="Generate").click()  # box 2 has no phrase: said, not sent
    expect(page.locator("#error")).to_contain_text("Box 2: write what to draw")
    page.get_by_label("Box 2 phrase").fill("a blue square")
    page.get_by_label("Box 2 right").fill("0.05")  # left of the box's left edge (0.1)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("Box 2: left must be less than right")
    page.get_by_label("Box 2 right").fill("1.5")  # outside the image: the page says so, not the browser
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("Box 2: left must be less than right")
    page.get_by_label("Box 2 right").fill("0.9")
    page.get_by_label("Box 2 left").fill("0.6")
    page.get_by_label("Box 2 bottom").fill("0.33")  # any fraction, not only the arrows' steps
    expect(page.locator("#layout-preview rect")).to_have_count(2)
    generate_one(page)
    expect(page.locator("#error")).to_be_empty()

    want = [
        {"box": [0.0, 0.25, 0.5, 0.75], "phrase": "a red circle"},
        {"box": [0.6, 0.1, 0.9, 0.33], "phrase": "a blue square"},
    ]
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["status"] == "succeeded" and job["request"]["layout"] == want
    first = httpx.get(job["results"][0]["url"]).content
    with Image.open(io.BytesIO(first)) as im:
        assert json.loads(im.text["pictor"])["layout"] == want

    # Reuse settings puts the boxes back (and only those); Reproduce sends them again: the same PNG.
    page.get_by_role("button", name="Remove box 2").click()
    expect(page.locator("#layout-boxes li")).to_have_count(1)
    page.get_by_role("img", name="two shapes (seed 7)").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#layout-boxes li")).to_have_count(2)
    expect(page.get_by_label("Box 2 phrase")).to_have_value("a blue square")
    expect(page.get_by_label("Box 2 left")).to_have_value("0.6")
    page.get_by_role("img", name="two shapes (seed 7)").click()
    page.get_by_role("button", name="Reproduce").click()
    expect(page.get_by_role("img", name="two shapes (seed 7)")).to_have_count(2, timeout=30_000)
    again = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert again["request"]["layout"] == want
    assert httpx.get(again["results"][0]["url"]).content == first
    page.get_by_role("button", name="Clear boxes").click()
    expect(page.locator("#layout-preview rect")).to_have_count(0)
    assert problems == [], problems


def test_generate_with_the_hires_fix(browser: Any, live_server: Any) -> None:
    """The hires fields go with the request, the picture comes at the larger size, Reuse settings puts the
    fields back and Reproduce sends them again (the same PNG)."""
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)

    fill_settings(page, "a sharp star", 9, 3)
    page.get_by_text("Hires fix", exact=True).click()
    page.get_by_label("Upscale by").fill("2")
    page.get_by_label("Hires strength").fill("0.45")
    page.get_by_label("Hires steps").fill("2")
    generate_one(page)

    thumb = page.get_by_role("img", name="a sharp star (seed 9)")
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=thumb.element_handle())
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert (
        job["request"]["hires_scale"],
        job["request"]["hires_strength"],
        job["request"]["hires_steps"],
    ) == (
        2,
        0.45,
        2,
    )
    thumb.click()
    expect(page.locator("#viewer-parameters")).to_contain_text("Hires upscale: 2")

    # Reuse settings on a cleared form puts the hires fields back; Reproduce makes the same PNG.
    page.get_by_role("button", name="Close").click()
    for field in ("Upscale by", "Hires strength", "Hires steps"):
        page.get_by_label(field).fill("")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("Upscale by")).to_have_value("2")
    expect(page.get_by_label("Hires strength")).to_have_value("0.45")
    expect(page.get_by_label("Hires steps")).to_have_value("2")
    jobs = reproduce_twice(page, live.url, thumb, "a sharp star (seed 9)")
    assert jobs[0]["request"]["hires_scale"] == 2
    assert problems == [], problems


def test_generate_with_a_lora_of_the_server(
    browser: Any, live_server: Any, lora_dir: Path, fresh_tiny: Any
) -> None:
    """The page lists the server's LoRAs; a scale sends one with the request, the record names it, Reuse
    settings puts the scale back and Reproduce sends it again (the same PNG)."""
    import json

    from PIL import Image
    from playwright.sync_api import expect

    live = live_server(pipeline=fresh_tiny(), lora_dir=lora_dir)
    page, problems = open_page(browser, live.url, height=900)

    page.get_by_text("LoRAs", exact=True).click()
    expect(page.get_by_label("LoRA detail")).to_be_visible()
    fill_settings(page, "a styled circle", 5, 3)
    page.get_by_label("LoRA style").fill("0.8")
    generate_one(page)
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    with Image.open(io.BytesIO(httpx.get(job["results"][0]["url"]).content)) as im:
        record = json.loads(im.text["pictor"])
    assert [(e["name"], e["scale"]) for e in record["loras"]] == [("style", 0.8)]

    page.get_by_label("LoRA style").fill("")
    thumb = page.get_by_role("img", name="a styled circle (seed 5)")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("LoRA style")).to_have_value("0.8")
    expect(page.get_by_label("LoRA detail")).to_have_value("")
    reproduce_twice(page, live.url, thumb, "a styled circle (seed 5)")

    # A file added to the folder is offered after "Reread LoRA folder"; scales typed in stay.
    (lora_dir / "extra.safetensors").write_bytes((lora_dir / "style.safetensors").read_bytes())
    page.get_by_label("LoRA detail").fill("0.5")
    expect(page.get_by_label("LoRA extra")).to_have_count(0)
    page.get_by_role("button", name="Reread LoRA folder").click()
    expect(page.get_by_label("LoRA extra")).to_be_visible()
    expect(page.get_by_label("LoRA detail")).to_have_value("0.5")
    assert problems == [], problems


def test_generate_with_the_block_cache(browser: Any, live_server: Any) -> None:
    """The Block cache field goes with the request into the record; Reuse settings puts it back and Reproduce
    sends it again (the same PNG). 0.12 is off any 0.05 grid: the page's number fields take any value."""
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    fill_settings(page, "a cached star", 5, 4)
    page.get_by_label("Block cache").fill("0.12")
    generate_one(page)
    assert httpx.get(f"{live.url}/v1/jobs").json()["data"][0]["request"]["cache_threshold"] == 0.12

    thumb = page.get_by_role("img", name="a cached star (seed 5)")
    thumb.click()
    expect(page.locator("#viewer-parameters")).to_contain_text("First block cache: 0.12")
    page.get_by_role("button", name="Close").click()
    page.get_by_label("Block cache").fill("")
    thumb.click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.get_by_label("Block cache")).to_have_value("0.12")
    jobs = reproduce_twice(page, live.url, thumb, "a cached star (seed 5)")
    assert jobs[0]["request"]["cache_threshold"] == 0.12
    assert problems == [], problems


@pytest.mark.filterwarnings("ignore::pictor.notices.PictorWarning")  # the server log's copy of the notice
def test_the_page_says_which_end_of_a_long_prompt_was_not_read(
    browser: Any, live_server: Any, tiny: Any
) -> None:
    """The job's warnings show under the status and in the viewer (as text, set by textContent)."""
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    prompt = " ".join(["a red circle"] * tiny.text_encoder.max_length) + " and a green star"
    fill_settings(page, prompt, 3, 1)
    generate_one(page)
    (warning,) = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]["warnings"]
    assert warning.endswith("and a green star'")
    expect(page.locator("#warnings li")).to_have_text([warning])

    page.locator("#gallery img").first.click()
    expect(page.locator("#viewer-warnings li")).to_have_text([warning])
    page.get_by_role("button", name="Close").click()

    page.get_by_label("Prompt", exact=True).fill("a short prompt")  # Settings is still open
    page.get_by_label("Seed", exact=True).fill("4")
    generate_one(page)
    expect(page.locator("#warnings")).to_be_hidden()
    page.get_by_role("img", name="a short prompt (seed 4)").click()
    expect(page.locator("#viewer-warnings")).to_be_hidden()
    assert problems == [], problems


def test_delete_a_history_entry_from_the_page(browser: Any, live_server: Any, gated: Any) -> None:
    """Each finished entry has a Delete button that asks first (dismissed: nothing is sent), then deletes the
    job (DELETE /v1/history/{id}): its thumbnail leaves the page, the API's history and its image URL. The
    server's refusals show on the page: a cancelled job whose run has not stopped yet (409) stays listed and
    can be deleted once it has; an entry deleted meanwhile elsewhere (404) leaves the list."""
    from playwright.sync_api import expect

    from tests.serve.conftest import wait_for

    gated.gate.armed = False  # the page's own images run through
    live = live_server(pipeline=gated)
    page, problems = open_page(browser, live.url, height=900)
    fill_settings(page, "a doomed square", 3, 2)
    generate_one(page)
    page.get_by_label("Prompt", exact=True).fill("a kept circle")
    generate_one(page)
    kept, doomed = httpx.get(f"{live.url}/v1/jobs").json()["data"]  # newest first
    image_url = doomed["results"][0]["url"]
    assert httpx.get(image_url).status_code == 200

    thumb = page.get_by_role("img", name="a doomed square (seed 3)")
    delete = page.get_by_role("button", name="Delete a doomed square (seed 3) from the history")
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    delete.click()  # dismissed: nothing is sent
    expect(thumb).to_be_visible()
    assert asked == ['Delete "a doomed square" from the history, with its image? This cannot be undone.']
    assert len(httpx.get(f"{live.url}/v1/jobs").json()["data"]) == 2

    page.once("dialog", lambda d: d.accept())
    delete.focus()
    page.keyboard.press("Enter")  # the keyboard works as the mouse does
    expect(thumb).to_have_count(0)
    expect(page.locator("#status")).to_have_text('Deleted "a doomed square" from the history.')
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#gallery li").first.locator("button.thumb")).to_be_focused()  # not lost to <body>
    assert [j["id"] for j in httpx.get(f"{live.url}/v1/jobs").json()["data"]] == [kept["id"]]
    assert httpx.get(f"{live.url}/v1/jobs/{doomed['id']}").status_code == 404
    assert httpx.get(image_url).status_code == 404

    # A cancelled job whose run is still stopping: listed as cancelled, with a Delete button the server
    # refuses (409) until the run has stopped.
    gated.gate.armed = True
    stuck = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "a stuck star", "steps": 3, "seed": 1}).json()
    assert gated.gate.reached.wait(20)
    assert httpx.delete(f"{live.url}/v1/jobs/{stuck['id']}").json()["status"] == "cancelled"
    page.get_by_role("button", name="Search").click()
    stuck_delete = page.get_by_role("button", name="Delete cancelled: a stuck star from the history")
    page.on("dialog", lambda d: d.accept())
    stuck_delete.click()
    expect(page.locator("#error")).to_contain_text("its cancelled run has not stopped yet")
    expect(stuck_delete).to_be_enabled()
    expect(stuck_delete).to_be_focused()
    expect(page.locator("#gallery li")).to_have_count(2)
    gated.gate.armed = False
    gated.gate.release.set()
    manager = live.server.config.app.state.service.manager
    wait_for(lambda: not manager.busy(stuck["id"]), what="the cancelled run to stop")
    stuck_delete.click()
    expect(page.locator("#gallery li")).to_have_count(1)
    expect(page.locator("#error")).to_be_empty()

    # Deleted elsewhere meanwhile: the server's 404 is said, and the entry leaves the list.
    assert httpx.delete(f"{live.url}/v1/history/{kept['id']}").status_code == 200
    page.get_by_role("button", name="Delete a kept circle (seed 3) from the history").click()
    expect(page.locator("#error")).to_have_text(f"no job with id '{kept['id']}'")
    expect(page.locator("#gallery-empty")).to_be_visible()
    expect(page.get_by_label("Search prompts")).to_be_focused()
    assert httpx.get(f"{live.url}/v1/jobs").json()["data"] == []
    assert problems == [
        f"409 {live.url}/v1/history/{stuck['id']}",
        f"404 {live.url}/v1/history/{kept['id']}",
    ], problems
