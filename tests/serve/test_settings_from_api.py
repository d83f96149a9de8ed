"""`POST /v1/images/settings` (A1111's PNG Info on the server) and the web page's "Settings from an image":
an image's pictor record or A1111 text as a generation body, which gives the same picture again."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from tests.serve import test_browser
from tests.serve.conftest import assert_refused, decode_images
from tests.serve.test_browser import open_page

browser = test_browser.browser  # the browser tests' Chromium (skipped where it is missing, as there)

FORGE = (
    "a (red:1.3) circle <lora:style:0.7>\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M Karras, "
    "CFG scale: 4, Seed: 11, Size: 32x32, Clip skip: 2, Model: flux1-dev, VAE tile: 64, Version: f2.0.1"
)


def png_with(text: str | None = None, pixels: np.ndarray | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_itxt("parameters", text)
    out = io.BytesIO()
    Image.fromarray(pixels if pixels is not None else np.zeros((8, 8, 3), np.uint8)).save(
        out, "PNG", pnginfo=info
    )
    return out.getvalue()


def settings_of(client: TestClient, data: bytes) -> Any:
    return client.post("/v1/images/settings", files={"image": ("x.png", data, "image/png")})


def test_a1111_text_becomes_a_generation_body(client: TestClient) -> None:
    r = settings_of(client, png_with(FORGE))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["source"] == "a1111"
    assert answer["settings"] == {
        "prompt": "a (red:1.3) circle",
        "negative_prompt": "blurry",
        "prompt_weights": True,
        "steps": 3,
        "seed": 11,
        "guidance": 4.0,
        "size": "32x32",
        "sampler": "dpmpp_2m",
        "schedule": "karras",
    }
    notices = " ".join(answer["notices"])
    assert (
        "LoRA tags (style)" in notices and "Clip skip" in notices and "vae_tile: the server's own" in notices
    )
    made = client.post("/v1/images/generations", json={**answer["settings"], "response_format": "b64_json"})
    ((_, record),) = decode_images(made)
    assert record["prompt_weights"] is True and record["sampler"] == "dpmpp_2m" and record["seed"] == 11


def test_a_servers_own_image_gives_its_picture_again(client: TestClient) -> None:
    body = {
        "prompt": "a (blue) square",
        "size": "32x32",
        "steps": 2,
        "seed": 3,
        "response_format": "b64_json",
    }
    ((pixels, _),) = decode_images(client.post("/v1/images/generations", json=body))
    job = client.get("/v1/jobs").json()["data"][0]
    png = client.get(f"/v1/images/{job['results'][0]['image_id']}").content
    answer = settings_of(client, png).json()
    assert answer["source"] == "pictor" and answer["settings"]["prompt_weights"] is False
    ((again, _),) = decode_images(
        client.post("/v1/images/generations", json={**answer["settings"], "response_format": "b64_json"})
    )
    assert np.array_equal(again, pixels)
    # its A1111 text alone (brackets escaped, read back with weights) gives the same picture too
    with Image.open(io.BytesIO(png)) as im:
        text = im.text["parameters"]
    assert text.startswith("a \\(blue\\) square")
    alone = settings_of(client, png_with(text, pixels)).json()
    ((from_text, _),) = decode_images(
        client.post("/v1/images/generations", json={**alone["settings"], "response_format": "b64_json"})
    )
    assert np.array_equal(from_text, pixels)


def test_images_without_settings_and_other_methods_are_refused(client: TestClient) -> None:
    assert_refused(settings_of(client, png_with()), "image", "no A1111 parameters and no pictor record")
    assert_refused(settings_of(client, b"not a picture"), "image", "image")
    assert client.get("/v1/images/settings").status_code == 405


def test_the_page_fills_its_form_from_an_image(browser: Any, live_server: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    live = live_server()
    page, problems = open_page(browser, live.url, height=900)
    (tmp_path / "forge.png").write_bytes(png_with(FORGE))
    page.locator("#settings").evaluate("d => d.open = true")
    page.get_by_label("Settings from an image").set_input_files(str(tmp_path / "forge.png"))
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a (red:1.3) circle")
    expect(page.get_by_label("Negative prompt")).to_have_value("blurry")
    expect(page.get_by_label("Prompt weights")).to_be_checked()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("11")
    expect(page.get_by_label("Width")).to_have_value("32")
    expect(page.locator("#settings-notices")).to_contain_text("Clip skip")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image", timeout=30_000)
    job = httpx.get(f"{live.url}/v1/jobs").json()["data"][0]
    assert job["request"]["prompt_weights"] is True and job["request"]["seed"] == 11
    assert job["request"]["sampler"] == "dpmpp_2m"
    assert problems == [], problems


def test_a_comfyui_graph_becomes_a_generation_body(client: TestClient) -> None:
    """ComfyUI's own PNGs carry their API graph (`prompt` chunk), read as `generate --settings-from` is."""
    import json

    from tests.test_comfy_workflow_import import flux_ksampler_graph

    graph = flux_ksampler_graph()
    graph["27"]["inputs"] |= {"width": 32, "height": 32}
    graph["3"]["inputs"] |= {"steps": 2, "seed": 4, "sampler_name": "euler"}
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    data = io.BytesIO()
    Image.new("RGB", (8, 8)).save(data, "PNG", pnginfo=info)
    r = settings_of(client, data.getvalue())
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["source"] == "comfyui"
    assert answer["settings"] == {
        "prompt": "a (red:1.2) circle \\[left\\] of a blue square",
        "prompt_weights": True,
        "steps": 2,
        "seed": 4,
        "guidance": 3.5,
        "size": "32x32",
        "sampler": "euler",
        "schedule": "karras",
    }
    assert any("model 'flux1-dev-fp8.safetensors'" in n for n in answer["notices"])
    made = client.post("/v1/images/generations", json={**answer["settings"], "response_format": "b64_json"})
    ((_, record),) = decode_images(made)
    assert record["seed"] == 4 and record["guidance"] == 3.5 and record["schedule"] == "karras"


def comfy_png(text: str) -> bytes:
    """A PNG with `text` as its ComfyUI `prompt` chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", text)
    data = io.BytesIO()
    Image.new("RGB", (8, 8)).save(data, "PNG", pnginfo=info)
    return data.getvalue()


def test_a_comfyui_graph_nested_too_deep_or_with_an_infinite_number_is_a_400(client: TestClient) -> None:
    """json.loads' RecursionError and JSON's Infinity were a 500 (or taken as guidance inf)."""
    import json

    from tests.test_comfy_workflow_import import flux_ksampler_graph

    assert_refused(settings_of(client, comfy_png("[" * 5000 + "]" * 5000)), "image", "nests too deep")
    text = json.dumps(flux_ksampler_graph()).replace('"guidance": 3.5', '"guidance": Infinity')
    assert_refused(settings_of(client, comfy_png(text)), "image", "guidance is inf, not a finite number")


def test_the_settings_are_read_off_the_event_loop(client: TestClient, monkeypatch: Any) -> None:
    """A large graph takes a while to read: it is read in the thread pool, as the picture is decoded, so
    one upload does not hold up every other request."""
    import asyncio
    import json

    from pictor.serve import settings_from
    from pictor.settings_import import settings_from_chunks
    from tests.test_comfy_workflow_import import flux_ksampler_graph

    loops: list[bool] = []

    def reading(chunks: dict[str, str], path: str) -> Any:
        try:
            asyncio.get_running_loop()
            loops.append(True)
        except RuntimeError:  # no event loop runs in this thread
            loops.append(False)
        return settings_from_chunks(chunks, path)

    monkeypatch.setattr(settings_from, "settings_from_chunks", reading)
    r = settings_of(client, comfy_png(json.dumps(flux_ksampler_graph())))
    assert r.status_code == 200, r.text
    assert loops == [False]


def test_prompt_editing_and_variation_seeds_become_body_fields(client: TestClient) -> None:
    text = (
        "a [red:blue:0.5] circle\nSteps: 2, Seed: 5, Size: 32x32, Variation seed: 9, "
        "Variation seed strength: 0.3, Seed resize from: 16x32"
    )
    answer = settings_of(client, png_with(text)).json()
    settings = answer["settings"]
    assert settings["prompt_editing"] is True and settings["prompt_weights"] is True
    assert (settings["variation_seed"], settings["variation_strength"]) == (9, 0.3)
    assert settings["seed_resize_from"] == "16x32"
    made = client.post("/v1/images/generations", json={**settings, "response_format": "b64_json"})
    ((_, record),) = decode_images(made)
    assert record["prompt_editing"] is True and record["variation_seed"] == 9
    plain = settings_of(client, png_with("a red circle\nSteps: 2, Seed: 5")).json()["settings"]
    assert "prompt_editing" not in plain


def test_a_servers_image_with_regions_gives_them_back(client: TestClient) -> None:
    regions = [{"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a red circle", "strength": 2.0}]
    body = {"prompt": "two shapes", "size": "32x32", "steps": 2, "seed": 3, "response_format": "b64_json"}
    ((pixels, _),) = decode_images(client.post("/v1/images/generations", json={**body, "regions": regions}))
    job = client.get("/v1/jobs").json()["data"][0]
    png = client.get(f"/v1/images/{job['results'][0]['image_id']}").content
    answer = settings_of(client, png).json()
    assert answer["settings"]["regions"] == regions and not answer["notices"], answer
    made = client.post("/v1/images/generations", json={**answer["settings"], "response_format": "b64_json"})
    ((again, _),) = decode_images(made)
    assert np.array_equal(again, pixels)
