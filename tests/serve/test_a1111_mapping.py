"""/sdapi/v1, field by field: each A1111 field's mapping onto pictor's has a test that a wrong mapping fails
(a swapped pair, a wrong divisor, a threshold off by one...), and the review's findings stay fixed: sizes
checked before a picture is resized, Basic headers read by the guard alone, A1111's defaults and lax
numbers, requests that wait for a loading model, messages that say what to send, nothing echoed that A1111
does not echo."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pictor.pipeline import Pipeline
from tests.serve.conftest import TEST_LIMITS, new_tiny, wait_for
from tests.serve.test_a1111_api import (
    BASE,
    KEY,
    a1111,
    b64_png,
    chunks,
    gradient,
    openai,
    openai_edit,
    pixels,
    refused,
    square_mask,
)
from tests.serve.test_previews_api import PreviewGated

SAME = {"prompt": "a red circle", "size": "32x32", "steps": 3, "seed": 7, "prompt_weights": True}


def record(b64: str) -> dict[str, Any]:
    return json.loads(chunks(b64)["pictor"])


def rgb(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(
        np.stack([x * 255 // width, y * 255 // height, (x + y) * 60 % 256], axis=-1).astype(np.uint8)
    )


def basic(credentials: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


# -- the review's findings ---------------------------------------------------------------------------------


def test_img2img_sizes_over_the_limit_are_refused_before_anything_is_resized(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 181-byte request asking a tiny picture to be stretched to 20000x20000 allocated 1.5 GB (and
    65535x65535 could take the server down) before the pixel limit was checked."""
    resize = Image.Image.resize

    def watched(self: Image.Image, size: Any, *args: Any, **kwargs: Any) -> Image.Image:
        assert size[0] * size[1] <= TEST_LIMITS.max_pixels, f"resized to {size} before the limit was checked"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", watched)
    picture = b64_png(Image.new("RGB", (8, 8), "red"))
    mask = b64_png(Image.new("L", (8, 8), 255))
    before = client.get("/v1/jobs").json()["total"]
    for side in (20000, 65535):
        body = {"prompt": "x", "init_images": [picture], "width": side, "height": side}
        refused(client.post("/sdapi/v1/img2img", json=body), 422, "width", f"size {side}x{side}")
        whole = {**body, "mask": mask, "inpaint_full_res": False}  # the picture and its mask resized
        refused(client.post("/sdapi/v1/img2img", json=whole), 422, "width", "the limit is 4096")
        only_masked = {**body, "mask": mask}  # drawn at width x height
        refused(client.post("/sdapi/v1/img2img", json=only_masked), 422, "width", "the limit is 4096")
    one_side = {"prompt": "x", "init_images": [picture], "width": 20000}  # x the picture's 8
    refused(client.post("/sdapi/v1/img2img", json=one_side), 422, "width", "20000x8")
    assert client.get("/v1/jobs").json()["total"] == before
    ok = a1111(client, "img2img", **BASE, init_images=[picture], denoising_strength=0.5)  # 8x8 -> 32x32
    assert pixels(ok["images"][0]).shape == (32, 32, 3)


def test_basic_headers_are_the_guards_to_read(
    make_client: Callable[..., TestClient], tiny: Pipeline, tmp_path: Path
) -> None:
    """No route dependency parses the Basic header (FastAPI's answered 401 for one it could not parse, even
    on a server without a key, and refused user names and keys that are not ASCII)."""
    odd = [
        {"Authorization": "Basic %%%"},
        {"Authorization": "Basic"},
        basic(b"no colon"),
        basic("jösé:x".encode()),
        basic(b"\xff\xfe:\xff"),
    ]
    keyless = make_client(tiny)
    for headers in odd:
        assert keyless.get("/sdapi/v1/options", headers=headers).status_code == 200, headers
    assert keyless.post("/sdapi/v1/txt2img", json=BASE, headers=odd[3]).status_code == 200
    keyed = make_client(tiny, api_key=KEY, data_dir=tmp_path / "keyed")
    assert keyed.get("/sdapi/v1/options", auth=("jösé", KEY)).status_code == 200
    assert keyed.post("/sdapi/v1/txt2img", json=BASE, auth=("jösé", KEY)).status_code == 200
    assert keyed.get("/sdapi/v1/options", auth=("jösé", "wrong")).status_code == 401
    for headers in odd:
        assert keyed.get("/sdapi/v1/options", headers=headers).status_code == 401, headers
    # a key that is not ASCII: its UTF-8 bytes (httpx, Open WebUI) or its Latin-1 ones (requests, webuiapi)
    umlaut = make_client(tiny, api_key="schlüssel", data_dir=tmp_path / "umlaut")
    assert umlaut.get("/sdapi/v1/options", auth=("webui", "schlüssel")).status_code == 200
    assert (
        umlaut.get("/sdapi/v1/options", headers=basic("webui:schlüssel".encode("latin-1"))).status_code == 200
    )
    assert umlaut.get("/sdapi/v1/options", auth=("webui", "schlussel")).status_code == 401
    # the scheme is still in the document, beside the Bearer key
    document = keyless.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["HTTPBasic"]["scheme"] == "basic"
    security = document["paths"]["/sdapi/v1/txt2img"]["post"]["security"]
    assert {"HTTPBasic": []} in security and {"HTTPBearer": []} in security
    assert keyless.get("/openapi.json").json() == document  # added once, not on every read


def test_webuiapis_img2img_defaults_inpaint(client: TestClient) -> None:
    """webuiapi's img2img payload as it sends it (denoising_strength 0.75, mask_blur 4, inpainting_fill 0,
    A1111's defaults): fill 0 is taken as 1, pictor's inpainting, and the answer says so."""
    source, mask = gradient(), square_mask()
    payload = {
        "init_images": ["data:image/png;base64," + b64_png(source)],
        "resize_mode": 0,
        "denoising_strength": 0.75,
        "mask_blur": 4,
        "inpainting_fill": 0,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0,
        "initial_noise_multiplier": 1,
        "prompt": "a red circle",
        "styles": [],
        "seed": 7,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 3,  # webuiapi's default 20, and 512x512 below: kept small for the tests' limits
        "cfg_scale": 7.0,
        "image_cfg_scale": 1.5,
        "width": 32,
        "height": 32,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "sampler_index": "Euler a",
        "include_init_images": False,
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
        "mask": "data:image/png;base64," + b64_png(mask),
    }
    out = a1111(client, "img2img", **payload)
    assert "inpainting_fill" in out["info"]["ignored_fields"]
    want = openai_edit(client, source, mask, prompt="a red circle", strength=0.75, feather=4, steps=3, seed=7,
                       guidance=7, sampler="euler_ancestral", inpaint_area="masked", mask_padding=0,
                       inpaint_size="32x32")  # fmt: skip
    assert np.array_equal(pixels(out["images"][0]), pixels(want[0]))
    # 1 is not listed; 2 and 3 (noise) are still refused below strength 1
    taken = a1111(client, "img2img", **{**payload, "inpainting_fill": 1})
    assert "inpainting_fill" not in taken["info"]["ignored_fields"]
    refused(
        client.post("/sdapi/v1/img2img", json={**payload, "inpainting_fill": 2}), 422, "inpainting_fill", "1"
    )


def test_numbers_are_read_as_a1111_reads_them(client: TestClient) -> None:
    """A1111's models are lax pydantic: numbers in strings and whole floats are taken; fractions for whole
    numbers, NaN and infinities are not."""
    want = a1111(client, "txt2img", **{**BASE, "cfg_scale": 5})["images"][0]
    lax = {**BASE, "steps": "3", "seed": "7", "width": 32.0, "height": "32", "cfg_scale": "5"}
    out = a1111(client, "txt2img", **lax)
    assert np.array_equal(pixels(out["images"][0]), pixels(want))
    assert out["parameters"]["steps"] == 3 and out["parameters"]["width"] == 32
    drawn = a1111(client, "txt2img", **{**BASE, "seed": "-1"})["info"]["seed"]
    assert isinstance(drawn, int) and drawn >= 0
    refused(client.post("/sdapi/v1/txt2img", json={**BASE, "steps": 2.5}), 422, "steps", "integer")
    refused(client.post("/sdapi/v1/txt2img", json={**BASE, "width": "32.5"}), 422, "width", "integer")
    refused(client.post("/sdapi/v1/txt2img", json={**BASE, "cfg_scale": "nan"}), 422, "cfg_scale", "finite")
    raw = json.dumps(BASE)[:-1] + ', "cfg_scale": Infinity}'
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    refused(r, 422, "cfg_scale", "finite")
    refused(client.post("/sdapi/v1/txt2img", json={**BASE, "seed": "seven"}), 422, "seed", "integer")


def test_a1111s_defaults_for_the_hires_strength_and_the_mask_blur(client: TestClient) -> None:
    hires = a1111(client, "txt2img", **BASE, enable_hr=True, hr_scale=2)
    assert record(hires["images"][0])["hires"]["strength"] == 0.75
    want = openai(client, **SAME, hires_scale=2, hires_strength=0.75)
    assert np.array_equal(pixels(hires["images"][0]), pixels(want[0]))
    source, mask = gradient(), square_mask()
    body = {**BASE, "init_images": [b64_png(source)], "mask": b64_png(mask), "inpaint_full_res": False}
    out = a1111(client, "img2img", **body, denoising_strength=0.8)
    assert record(out["images"][0])["feather"] == 4
    want = openai_edit(client, source, mask, prompt="a red circle", strength=0.8, feather=4, steps=3, seed=7)
    assert np.array_equal(pixels(out["images"][0]), pixels(want[0]))


def test_a1111_requests_wait_for_a_loading_model(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cfg_scale (which SillyTavern and webuiapi always send) is read by the model's kind of guidance: while
    the model loads such a request waits for it, as a /v1 job waits in the queue, instead of a 503."""
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return new_tiny()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny")
    answers: dict[str, Any] = {}
    source = b64_png(gradient())
    sent = [
        ("txt2img", "txt2img", {**BASE, "cfg_scale": 5}),
        ("img2img", "img2img", {**BASE, "cfg_scale": 5, "init_images": [source], "denoising_strength": 0.6}),
        # hr_resize_x is checked against the model's size multiple too
        ("hires", "txt2img", {**BASE, "cfg_scale": 5, "enable_hr": True, "hr_resize_x": 64}),
    ]

    def post(name: str, path: str, body: dict[str, Any]) -> None:
        answers[name] = client.post(f"/sdapi/v1/{path}", json=body)

    threads = [threading.Thread(target=post, args=args) for args in sent]
    try:
        assert client.get("/readyz").json()["status"] == "loading"
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert all(thread.is_alive() for thread in threads), {k: r.text for k, r in answers.items()}
    finally:
        loading.set()
    for thread in threads:
        thread.join(60)
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
    want = openai(client, **SAME, guidance=5)
    assert np.array_equal(pixels(answers["txt2img"].json()["images"][0]), pixels(want[0]))
    assert pixels(answers["hires"].json()["images"][0]).shape == (64, 64, 3)


def test_a_load_that_fails_ends_the_wait(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    loading = threading.Event()

    def broken_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        raise ValueError("the weights are gone")

    monkeypatch.setattr("pictor.loading.load", broken_load)
    client = make_client(None, model="tiny")
    answers: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: answers.update(r=client.post("/sdapi/v1/txt2img", json={**BASE, "cfg_scale": 5}))
    )
    thread.start()
    time.sleep(0.3)
    loading.set()
    thread.join(30)
    error = answers["r"]
    assert error.status_code == 503 and error.json()["error"] == "model_unavailable", error.text
    assert "the weights are gone" in error.json()["detail"]


def test_messages_say_what_to_send(
    make_client: Callable[..., TestClient], lora_dir: Path, fresh_tiny: Callable[[], Pipeline]
) -> None:
    client = make_client(fresh_tiny(), lora_dir=lora_dir)
    hires = {**BASE, "enable_hr": True}
    for x in (32, 65535):
        r = client.post("/sdapi/v1/txt2img", json={**hires, "hr_resize_x": x})
        refused(r, 422, "hr_resize_x", "larger than the first pass's width (32) and at most 4 times it (128)")
        assert "hires scale" not in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**hires, "height": 16, "hr_resize_y": 16})
    refused(r, 422, "hr_resize_y", "larger than the first pass's height (16) and at most 4 times it (64)")
    for weight in ("nan", "inf", "-inf"):
        r = client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": f"x <lora:style:{weight}>"})
        refused(r, 422, "prompt", "weight must be a finite number")
        assert "text encoder" not in r.json()["detail"]
    body = {**BASE, "init_images": [b64_png(gradient())], "mask": b64_png(square_mask())}
    for invert in (2, "yes", -1):
        r = client.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": invert})
        refused(r, 422, "inpainting_mask_invert", "must be 0 or 1 (or false / true)")
        assert ".bool" not in r.json()["detail"] and "literal" not in r.json()["detail"].lower()


def test_fields_a1111_has_not_are_not_echoed(client: TestClient) -> None:
    """SillyTavern sends its A1111 credentials in the body too (`auth`: "user:KEY"); A1111 drops fields it
    has not, and so does the answer's `parameters`."""
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "auth": f"user:{KEY}", "steps_typo": 3})
    assert r.status_code == 200, r.text
    assert KEY not in r.text
    parameters = r.json()["parameters"]
    assert "auth" not in parameters and "steps_typo" not in parameters and parameters["steps"] == 3
    assert json.loads(r.json()["info"])["ignored_fields"] == ["auth", "steps_typo"]  # the names only
    job = client.get(f"/v1/jobs/{json.loads(r.json()['info'])['job_id']}").json()
    assert KEY not in json.dumps(job)


# -- each mapping, so that a wrong one fails --------------------------------------------------------------


def test_seed_resize_from_is_width_then_height(client: TestClient) -> None:
    out = a1111(client, "txt2img", **BASE, seed_resize_from_w=48, seed_resize_from_h=16)
    assert record(out["images"][0])["seed_resize_from"] == [48, 16]
    assert (out["info"]["seed_resize_from_w"], out["info"]["seed_resize_from_h"]) == (48, 16)
    want = openai(client, **SAME, seed_resize_from="48x16")
    assert np.array_equal(pixels(out["images"][0]), pixels(want[0]))


def test_hr_resize_y_divides_by_the_height(client: TestClient) -> None:
    out = a1111(client, "txt2img", **{**BASE, "height": 16}, enable_hr=True, hr_resize_y=32)
    assert pixels(out["images"][0]).shape == (32, 64, 3) and record(out["images"][0])["hires"]["scale"] == 2
    want = openai(client, **{**SAME, "size": "32x16"}, hires_scale=2, hires_strength=0.75)
    assert np.array_equal(pixels(out["images"][0]), pixels(want[0]))
    x = a1111(client, "txt2img", **{**BASE, "height": 16}, enable_hr=True, hr_resize_x=64)
    assert np.array_equal(pixels(x["images"][0]), pixels(want[0]))


def test_hr_upscaler_none_is_a_lanczos_resize(client: TestClient) -> None:
    hires = {**BASE, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    lanczos = a1111(client, "txt2img", **hires, hr_upscaler="Lanczos")["images"][0]
    for name in ("None", "none", None):
        out = a1111(client, "txt2img", **hires, hr_upscaler=name)["images"][0]
        assert np.array_equal(pixels(out), pixels(lanczos)), name
    assert record(lanczos)["hires"]["upscaler"] == "lanczos"


def test_a_grey_mask_is_thresholded_above_128(client: TestClient) -> None:
    source = gradient()
    binary = square_mask()
    grey = np.where(np.asarray(binary) > 0, 129, 128).astype(np.uint8)  # just above / at the threshold
    body = {**BASE, "init_images": [b64_png(source)], "denoising_strength": 0.8, "inpaint_full_res": False}
    want = a1111(client, "img2img", **body, mask=b64_png(binary))["images"][0]
    got = a1111(client, "img2img", **body, mask=b64_png(Image.fromarray(grey)))["images"][0]
    assert np.array_equal(pixels(got), pixels(want))
    outside = np.asarray(binary) == 0
    assert np.array_equal(pixels(got)[outside], np.asarray(source)[outside])  # 128 is kept, not repainted


def test_a_mask_is_stretched_onto_a_picture_of_another_size(client: TestClient) -> None:
    source = rgb(32, 16)  # wide
    small = np.zeros((8, 16), np.uint8)  # a wide mask of half the size, its white box off-centre
    small[1:4, 2:12] = 255
    mask = Image.fromarray(small)
    body = {**BASE, "init_images": [b64_png(source)], "denoising_strength": 0.8, "inpaint_full_res": False}
    out = a1111(client, "img2img", **{**body, "width": None, "height": None}, mask=b64_png(mask))
    stretched = mask.resize((32, 16), Image.NEAREST)
    want = openai_edit(
        client, source, stretched, prompt="a red circle", strength=0.8, feather=4, steps=3, seed=7
    )
    assert np.array_equal(pixels(out["images"][0]), pixels(want[0]))


def test_inpainting_mask_invert_true(client: TestClient) -> None:
    source = gradient()
    body = {**BASE, "init_images": [b64_png(source)], "denoising_strength": 0.8, "inpaint_full_res": False}
    want = a1111(client, "img2img", **body, mask=b64_png(square_mask()))["images"][0]
    for invert in (True, 1, "true"):
        got = a1111(client, "img2img", **body, mask=b64_png(square_mask(white=False)),
                    inpainting_mask_invert=invert)["images"][0]  # fmt: skip
        assert np.array_equal(pixels(got), pixels(want)), invert
    kept = a1111(client, "img2img", **body, mask=b64_png(square_mask()), inpainting_mask_invert=False)
    assert np.array_equal(pixels(kept["images"][0]), pixels(want))


@pytest.mark.parametrize(
    ("prompt", "flags"),
    [
        ("a (red circle:1.3) on grass", {}),
        ("[a red circle:a blue square:0.5]", {"prompt_editing": True}),
        ("a red circle AND a blue square", {"composable": True}),
    ],
)
def test_prompt_syntax_is_read_as_a1111_reads_it(
    client: TestClient, prompt: str, flags: dict[str, bool]
) -> None:
    out = a1111(client, "txt2img", **{**BASE, "prompt": prompt})["images"][0]
    want = openai(client, **{**SAME, "prompt": prompt, **flags})[0]
    assert np.array_equal(pixels(out), pixels(want))
    off = {**SAME, "prompt": prompt, "prompt_weights": bool(flags)}  # the syntax read as plain text
    plain = openai(client, **off)[0]
    assert not np.array_equal(pixels(out), pixels(plain))


def test_subseed_minus_one_draws_a_variation_seed(client: TestClient) -> None:
    varied = {**BASE, "subseed": -1, "subseed_strength": 0.3}
    drawn = []
    for _ in range(2):
        out = a1111(client, "txt2img", **varied)
        subseed = out["info"]["subseed"]
        assert subseed not in (0, -1) and record(out["images"][0])["variation_seed"] == subseed
        drawn.append(subseed)
    assert drawn[0] != drawn[1]


def test_progress_skips_the_current_image_when_asked(
    make_client: Callable[..., TestClient], tiny: Pipeline
) -> None:
    held = PreviewGated(tiny)
    client = make_client(held)
    answers: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answers.update(r=client.post("/sdapi/v1/txt2img", json=BASE)))
    thread.start()
    try:
        assert held.shown.wait(30)
        shown = client.get("/sdapi/v1/progress").json()
        assert shown["current_image"] and base64.b64decode(shown["current_image"])[:2] == b"\xff\xd8"  # JPEG
        skipped = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
        assert skipped["current_image"] is None and skipped["state"]["job"] == shown["state"]["job"]
    finally:
        held.release.set()
    thread.join(30)
    assert answers["r"].status_code == 200


def test_interrupt_leaves_a_queued_a1111_job(make_client: Callable[..., TestClient], gated: Any) -> None:
    client = make_client(gated)
    answers: dict[str, Any] = {}

    def send(name: str, prompt: str) -> threading.Thread:
        body = {**BASE, "prompt": prompt, "steps": 4}
        thread = threading.Thread(
            target=lambda: answers.update({name: client.post("/sdapi/v1/txt2img", json=body)})
        )
        thread.start()
        return thread

    first = send("running", "a red circle")
    assert gated.gate.reached.wait(10)
    second = send("queued", "a blue square")
    wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2, what="a queued job")
    assert client.post("/sdapi/v1/interrupt").json() == {}
    gated.gate.armed = False
    gated.gate.release.set()
    first.join(30)
    second.join(30)
    assert answers["running"].status_code == 409
    assert answers["queued"].status_code == 200, answers["queued"].text
    assert len(answers["queued"].json()["images"]) == 1
