"""A1111's Extras endpoints (/sdapi/v1/extra-single-image, /extra-batch-images): A1111's sizes (a multiple
of 8 rounded down, resize_mode 1's cover-and-crop), its Lanczos, Nearest and None, the blend of a second
upscaler, the server's upscale model through the upscale job (the pixels of POST /v1/images/upscale, the
history's PNG the answer's), the batch's order, and the refusals in A1111's error shape."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from pictor.models.upscalers import CompactNet, CompactParams
from pictor.pipeline import Pipeline
from pictor.serve import a1111_postprocess as post
from pictor.serve.settings import Limits
from tests.serve.conftest import TEST_LIMITS, new_tiny
from tests.serve.test_a1111_api import KEY, b64_png, chunks, pixels, refused

NAME = "tiny-x2"
LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


@pytest.fixture(scope="module")
def upscaling(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny model with a tiny random x2 Real-ESRGAN compact net as the server's upscale model."""
    torch.manual_seed(0)
    net = CompactNet(CompactParams(features=8, convs=2, scale=2))
    path = tmp_path_factory.mktemp("upscaler") / f"{NAME}.safetensors"
    save_file(net.state_dict(), path)
    pipe = new_tiny()
    pipe.set_upscaler(path)
    return pipe


@pytest.fixture
def model_client(make_client: Callable[..., TestClient], upscaling: Pipeline) -> TestClient:
    return make_client(upscaling)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: resizes and models differ visibly on it."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 60, (height, width, 3))
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


def extras(client: TestClient, image: Image.Image, **body: Any) -> dict[str, Any]:
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(image), **body})
    assert r.status_code == 200, r.text
    return r.json()


def model_upscale(client: TestClient, image: Image.Image, scale: float) -> np.ndarray:
    """POST /v1/images/upscale's pixels."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    form = {"response_format": "b64_json", "scale": str(scale)}
    r = client.post("/v1/images/upscale", files={"image": ("p.png", buf.getvalue(), "image/png")}, data=form)
    assert r.status_code == 200, r.text
    return pixels(r.json()["data"][0]["b64_json"])


def jobs(client: TestClient) -> list[dict[str, Any]]:
    return client.get("/v1/jobs").json()["data"]


# -- A1111's sizes -------------------------------------------------------------------------------------------


def test_sizes_and_runs_are_a1111s() -> None:
    # Upscaler.upscale: int((w * scale) // 8 * 8); resize_mode 1 covers the target, then crops to it
    assert post.sizing(50, 30, 0, 2.0, 0, 0, True) == post.Sizing(2.0, (96, 56), None)
    assert post.sizing(64, 64, 0, 1.3, 0, 0, True).dest == (80, 80)  # 83.2 -> 80
    assert post.sizing(48, 32, 1, 2, 100, 60, True) == post.Sizing(100 / 48, (96, 64), (100, 60))
    assert post.sizing(48, 32, 1, 2, 100, 60, False).size == (96, 64)
    # the model runs until the picture covers the size aimed at (at most 3 times); once at scale 1, not below
    sizes = post.sizing(64, 64, 0, 4.1, 0, 0, True)
    assert sizes.dest == (256, 256) and post.model_runs((64, 64), sizes, 4) == 1  # pictor's own x4.1: twice
    assert post.model_runs((64, 64), post.sizing(64, 64, 0, 3.0, 0, 0, True), 2) == 2
    assert post.model_runs((64, 64), post.sizing(64, 64, 0, 1.0, 0, 0, True), 2) == 1
    assert post.model_runs((64, 64), post.sizing(64, 64, 1, 2, 32, 32, True), 2) == 0
    assert post.model_runs((8, 8), post.sizing(8, 8, 0, 16.0, 0, 0, True), 2) == 3


def test_lanczos_and_nearest_are_pillows_resizes_to_a1111s_size(client: TestClient) -> None:
    src = picture(50, 30)
    out = extras(client, src, upscaler_1="Lanczos", upscaling_resize=2)
    want = src.resize((100, 60), LANCZOS).resize((96, 56), LANCZOS)  # one run, then to the multiple of 8
    assert np.array_equal(pixels(out["image"]), np.asarray(want))
    assert out["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
    src = picture(32, 24)
    out = extras(client, src, upscaler_1="Nearest", upscaling_resize=3)
    assert np.array_equal(pixels(out["image"]), np.asarray(src.resize((96, 72), NEAREST)))
    text = chunks(out["image"])["postprocessing"]
    assert text == "Postprocess upscale by: 3.0, Postprocess upscaler: Nearest"


def test_none_leaves_the_picture_and_keeps_its_text_but_not_pictors_record(client: TestClient) -> None:
    body = {"prompt": "a red circle", "size": "32x32", "steps": 2, "seed": 3, "response_format": "b64_json"}
    made = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    out = client.post("/sdapi/v1/extra-single-image", json={"image": "data:image/png;base64," + made}).json()
    assert np.array_equal(pixels(out["image"]), pixels(made)) and out["html_info"] == "<p></p>"
    text = chunks(out["image"])
    assert text["parameters"] == chunks(made)["parameters"] and "pictor" not in text
    assert text["postprocessing"] == ""
    # a Lanczos result names its steps beside the picture's parameters, but no pictor record either
    r = client.post("/sdapi/v1/extra-single-image", json={"image": made, "upscaler_1": "Lanczos"})
    text = chunks(r.json()["image"])
    assert "pictor" not in text and text["parameters"] == chunks(made)["parameters"]
    # the default factor is A1111's unvalidated 2, written "2"; a 2 sent is a float, written "2.0", as there
    assert text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"


def test_resize_mode_1_covers_the_target_and_crops_to_it_as_a1111(client: TestClient) -> None:
    src = picture(48, 32)
    body = {"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 60, "upscaler_1": "Lanczos"}
    upscaled = src.resize((100, 66), LANCZOS).resize((96, 64), LANCZOS)  # x100/48 covers 100x60
    got = pixels(extras(client, src, **body)["image"])
    assert got.shape == (60, 100, 3)
    # pasted centred on black: 2 black columns each side, 2 rows cut off top and bottom
    assert not got[:, :2].any() and not got[:, 98:].any()
    assert np.array_equal(got[:, 2:98], np.asarray(upscaled)[2:62])
    out = extras(client, src, **body, upscaling_crop=False)
    assert np.array_equal(pixels(out["image"]), np.asarray(upscaled))
    # A1111's web UI sends its switches as 0 / 1: 0 is false here too
    assert np.array_equal(
        pixels(extras(client, src, **body, upscaling_crop=0)["image"]), np.asarray(upscaled)
    )
    assert out["html_info"] == "<p>Postprocess upscale to: 100x60, Postprocess upscaler: Lanczos</p>"
    cropped = extras(client, src, **body)["html_info"]
    assert cropped == (
        "<p>Postprocess upscale to: 100x60, Postprocess crop to: 100x60, Postprocess upscaler: Lanczos</p>"
    )


def test_upscaler_2_blends_in_at_its_visibility(client: TestClient) -> None:
    src = picture(40, 24)
    body = {"upscaler_1": "Lanczos", "upscaler_2": "Nearest", "upscaling_resize": 2}
    first = src.resize((80, 48), LANCZOS)
    blend = Image.blend(first, src.resize((80, 48), NEAREST), 0.3)
    out = extras(client, src, **body, extras_upscaler_2_visibility=0.3)
    assert np.array_equal(pixels(out["image"]), np.asarray(blend))
    assert out["html_info"].endswith("Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest</p>")
    alone = extras(client, src, **body)  # visibility 0 (A1111's default): upscaler_2 is not run
    assert np.array_equal(pixels(alone["image"]), np.asarray(first))
    assert "upscaler 2" not in alone["html_info"]


# -- the server's upscale model ----------------------------------------------------------------------------


def test_the_model_makes_the_upscale_endpoints_pixels_through_a_job(model_client: TestClient) -> None:
    src = picture(32, 32)
    names = [u["name"] for u in model_client.get("/sdapi/v1/upscalers").json()]
    assert NAME in names
    out = extras(model_client, src, upscaler_1=NAME, upscaling_resize=2)
    assert np.array_equal(pixels(out["image"]), model_upscale(model_client, src, 2))
    assert out["html_info"] == f"<p>Postprocess upscale by: 2.0, Postprocess upscaler: {NAME}</p>"
    # a job in the history, marked as the A1111 API's, whose image is the answer's PNG byte for byte
    job = next(j for j in jobs(model_client) if j["request"].get("a1111_extras"))
    assert job["status"] == "succeeded" and job["request"]["api"] == "a1111"
    stored = model_client.get(f"/v1/images/{job['results'][0]['image_id']}").content
    assert stored == base64.b64decode(out["image"])
    assert json.loads(chunks(out["image"])["pictor"])["upscale"]["upscaler"] == NAME


def test_the_model_at_a1111s_size_and_blended(model_client: TestClient) -> None:
    src = picture(30, 20, seed=1)
    out = extras(model_client, src, upscaler_1=NAME, upscaling_resize=2)  # 60x40 -> A1111's 56x40
    model = Image.fromarray(model_upscale(model_client, src, 2))
    want = model.resize((56, 40), LANCZOS)
    assert np.array_equal(pixels(out["image"]), np.asarray(want))
    record = json.loads(chunks(out["image"])["pictor"])["upscale"]
    assert (record["width"], record["height"]) == (56, 40) and record["a1111_extras"]["dest"] == [56, 40]
    job = next(j for j in jobs(model_client) if j["request"].get("a1111_extras"))
    assert (job["request"]["width"], job["request"]["height"]) == (56, 40)
    stored = model_client.get(f"/v1/images/{job['results'][0]['image_id']}").content
    assert stored == base64.b64decode(out["image"])  # the history keeps what was answered
    # the model as upscaler_2 under Lanczos, and resize_mode 1 cropping the model's picture
    body = {"upscaler_1": "Lanczos", "upscaler_2": NAME, "extras_upscaler_2_visibility": 0.5}
    blend = Image.blend(src.resize((60, 40), LANCZOS).resize((56, 40), LANCZOS), want, 0.5)
    assert np.array_equal(pixels(extras(model_client, src, **body)["image"]), np.asarray(blend))
    # x2.1 on 32x32 aims at 64x64 (67.2 rounded down to a multiple of 8): one run of the x2 model, as in
    # A1111, where pictor's own upscale to x2.1 runs it twice
    square = picture(32, 32, seed=2)
    out = extras(model_client, square, upscaler_1=NAME, upscaling_resize=2.1)
    assert np.array_equal(pixels(out["image"]), model_upscale(model_client, square, 2))
    body = {"upscaler_1": NAME, "resize_mode": 1, "upscaling_resize_w": 50, "upscaling_resize_h": 40}
    got = pixels(extras(model_client, src, **body)["image"])
    assert got.shape == (40, 50, 3) and np.array_equal(got, np.asarray(want)[:, 3:53])


def test_batch_answers_in_the_order_sent(model_client: TestClient) -> None:
    sources = [picture(32, 32, seed=0), picture(24, 16, seed=1), picture(40, 32, seed=2)]
    names = ["z.png", "a.png", "m.png"]  # A1111's API ignores the names: the answer keeps the order sent
    items = [{"data": b64_png(s), "name": n} for s, n in zip(sources, names, strict=True)]
    r = model_client.post("/sdapi/v1/extra-batch-images", json={"imageList": items, "upscaler_1": "Lanczos"})
    assert r.status_code == 200, r.text
    out = r.json()
    for got, src in zip(out["images"], sources, strict=True):
        assert np.array_equal(pixels(got), np.asarray(src.resize((src.width * 2, src.height * 2), LANCZOS)))
    assert out["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"
    r = model_client.post("/sdapi/v1/extra-batch-images", json={"imageList": items, "upscaler_1": NAME})
    assert r.status_code == 200, r.text
    for got, src in zip(r.json()["images"], sources, strict=True):
        assert np.array_equal(pixels(got), model_upscale(model_client, src, 2))


# -- refusals and auth --------------------------------------------------------------------------------------


def test_refusals_name_the_field(make_client: Callable[..., TestClient], client: TestClient) -> None:
    src = b64_png(picture(32, 32))
    path = "/sdapi/v1/extra-single-image"
    unknown = client.post(path, json={"image": src, "upscaler_1": NAME})  # a server without an upscale model
    refused(unknown, 422, "upscaler_1", "send one of None, Lanczos, Nearest")
    refused(client.post(path, json={"image": src, "upscaler_2": "ESRGAN_4x"}), 422, "upscaler_2", "Nearest")
    refused(client.post(path, json={"image": "%%%", "upscaler_1": "Lanczos"}), 422, "image", "base64")
    refused(client.post(path, json={"upscaler_1": "Lanczos"}), 422, "image", "send a picture")
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        refused(client.post(path, json={"image": src, field: 0.5}), 422, field, "no face restorer")
    refused(client.post(path, json={"image": src, "resize_mode": 2}), 422, "resize_mode", "")
    small = b64_png(picture(6, 6))
    refused(client.post(path, json={"image": small, "upscaler_1": "Lanczos", "upscaling_resize": 1}), 422,
            "upscaling_resize", "rounds down to 0")  # fmt: skip
    batch = {"imageList": [{"data": src, "name": "a"}, {"data": "%%%", "name": "b"}], "upscaler_1": "Lanczos"}
    refused(client.post("/sdapi/v1/extra-batch-images", json=batch), 422, "imageList", "imageList[1].data")
    assert client.get(path).status_code == 405
    # too large: refused before any work (nothing queued), on the model's runs too
    limited = make_client(None, limits=Limits(**{**TEST_LIMITS.__dict__, "max_picture_pixels": 100 * 100}))
    body = {"image": src, "upscaler_1": "Lanczos", "upscaling_resize": 4}
    refused(limited.post(path, json=body), 422, "upscaling_resize", "more than this server makes (10000)")
    body = {"image": src, "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 200}
    refused(limited.post(path, json=body), 422, "upscaling_resize_w", "more than this server makes")


def test_the_model_too_large_queues_nothing(
    make_client: Callable[..., TestClient], upscaling: Pipeline
) -> None:
    limits = Limits(**{**TEST_LIMITS.__dict__, "max_picture_pixels": 100 * 100})
    limited = make_client(upscaling, limits=limits)
    body = {"image": b64_png(picture(32, 32)), "upscaler_1": NAME, "upscaling_resize": 4}
    refused(limited.post("/sdapi/v1/extra-single-image", json=body), 422, "upscaling_resize", "10000")
    assert jobs(limited) == []


def test_auth_as_the_other_sdapi_endpoints(make_client: Callable[..., TestClient], tiny: Pipeline) -> None:
    keyed = make_client(tiny, api_key=KEY)
    body = {"image": b64_png(picture(16, 16)), "upscaler_1": "Lanczos"}
    missing = keyed.post("/sdapi/v1/extra-single-image", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic")
    assert keyed.post("/sdapi/v1/extra-single-image", json=body, auth=("webui", KEY)).status_code == 200
    batch = {"imageList": [{"data": body["image"], "name": "a"}]}
    assert keyed.post("/sdapi/v1/extra-batch-images", json=batch).status_code == 401
    assert keyed.post("/sdapi/v1/extra-batch-images", json=batch, auth=("webui", KEY)).status_code == 200


def test_openapi_lists_the_extras(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for name in ("extra-single-image", "extra-batch-images"):
        operation = paths[f"/sdapi/v1/{name}"]["post"]
        assert "422" in operation["responses"] and {"HTTPBasic": []} in operation["security"]
    unknown = client.post("/sdapi/v1/extra-nothing", json={})
    assert unknown.status_code == 404 and "extra-batch-images" in unknown.json()["detail"]


# -- review fixes: transparency, runs, caps, the pixel budget, interrupts ------------------------------------


@pytest.fixture(scope="module")
def upscaling_x4(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny model with a tiny random x4 compact net: A1111 runs it up to 3 times (x64)."""
    torch.manual_seed(1)
    net = CompactNet(CompactParams(features=8, convs=2, scale=4))
    path = tmp_path_factory.mktemp("upscaler4") / "tiny-x4.safetensors"
    save_file(net.state_dict(), path)
    pipe = new_tiny()
    pipe.set_upscaler(path)
    return pipe


def limited_client(make_client: Callable[..., TestClient], pipe: Pipeline | None, pixels: int) -> TestClient:
    return make_client(pipe, limits=Limits(**{**TEST_LIMITS.__dict__, "max_picture_pixels": pixels}))


def with_alpha_picture(width: int, height: int) -> Image.Image:
    rgba = picture(width, height, seed=5).convert("RGBA")
    alpha = np.asarray(picture(width, height, seed=6))[..., 0]
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def test_transparent_source_answers_rgb_and_reproduces_from_the_original(
    model_client: TestClient, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from pictor.cli import main

    src = with_alpha_picture(40, 60)
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat, Steps: 20")
    src.save(buf, format="PNG", pnginfo=info)
    data = base64.b64encode(buf.getvalue()).decode()
    rgb = src.convert("RGB")
    # Lanczos: RGB, as A1111's Extras, the source's own text kept
    r = model_client.post("/sdapi/v1/extra-single-image", json={"image": data, "upscaler_1": "Lanczos"})
    with Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))) as im:
        assert im.mode == "RGB" and im.text["parameters"] == "a cat, Steps: 20"
        assert np.array_equal(np.asarray(im), np.asarray(rgb.resize((80, 120), LANCZOS)))
    # the model, to 50x36 cropped: the answer (and the history's PNG) RGB, with A1111's own text
    body = {"image": data, "upscaler_1": NAME, "resize_mode": 1, "upscaling_resize_w": 50}
    r = model_client.post("/sdapi/v1/extra-single-image", json={**body, "upscaling_resize_h": 36})
    assert r.status_code == 200, r.text
    out = r.json()["image"]
    with Image.open(io.BytesIO(base64.b64decode(out))) as im:
        assert im.mode == "RGB" and im.size == (50, 36)
    text = chunks(out)
    want = f"Postprocess upscale to: 50x36, Postprocess crop to: 50x36, Postprocess upscaler: {NAME}"
    assert text["postprocessing"] == want and text["extras"] == want
    # `pictor reproduce --source ORIGINAL` takes the transparent original and makes the answered pixels
    original, result = tmp_path / "original.png", tmp_path / "result.png"
    original.write_bytes(buf.getvalue())
    result.write_bytes(base64.b64decode(out))
    capsys.readouterr()
    assert main(["reproduce", str(result), "--source", str(original), "-o", str(tmp_path / "again")]) == 0
    captured = capsys.readouterr()
    assert "the pixels are identical" in captured.err
    with Image.open(captured.out.strip()) as im:
        assert im.size == (50, 36) and np.array_equal(np.asarray(im.convert("RGB")), pixels(out))


def test_a_batch_whose_second_picture_is_too_large_queues_nothing(
    make_client: Callable[..., TestClient], upscaling: Pipeline
) -> None:
    limited = limited_client(make_client, upscaling, 100 * 100)
    items = [{"data": b64_png(picture(16, 16)), "name": "a"}, {"data": b64_png(picture(48, 48)), "name": "b"}]
    body = {"imageList": items, "upscaler_1": NAME, "upscaling_resize": 2}  # 96x96 fits, its run 96x96 too
    assert limited.post("/sdapi/v1/extra-batch-images", json=body).status_code == 200
    before = len(jobs(limited))
    body["upscaling_resize"] = 2.5  # 16x16 -> 40x40 fits; 48x48 -> 120x120 (two runs: 192x192) does not
    refused(limited.post("/sdapi/v1/extra-batch-images", json=body), 422, "upscaling_resize", "10000")
    assert len(jobs(limited)) == before


def test_an_interrupted_model_job_is_a_409(model_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = model_client.app.state.service  # type: ignore[attr-defined]
    submit = svc.submit

    def submit_and_interrupt(params: dict[str, Any], user: str | None) -> Any:
        job = submit(params, user)
        svc.manager.cancel(job.id)
        return job

    monkeypatch.setattr(svc, "submit", submit_and_interrupt)
    body = {"image": b64_png(picture(32, 32)), "upscaler_1": NAME}
    r = model_client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 409, r.text
    assert "interrupted" in r.json()["detail"]


def test_the_model_to_a_smaller_target_resizes_without_a_job(model_client: TestClient) -> None:
    src = picture(32, 32, seed=3)
    before = len(jobs(model_client))
    body = {"upscaler_1": NAME, "resize_mode": 1, "upscaling_resize_w": 16, "upscaling_resize_h": 16}
    out = extras(model_client, src, **body)
    assert np.array_equal(pixels(out["image"]), np.asarray(src.resize((16, 16), LANCZOS)))
    assert len(jobs(model_client)) == before  # A1111 does not run the model below scale 1


def test_an_x4_model_runs_three_times_as_a1111(
    make_client: Callable[..., TestClient], upscaling_x4: Pipeline
) -> None:
    client = make_client(upscaling_x4)
    src = picture(4, 4, seed=4)
    body = {"upscaler_1": "tiny-x4", "resize_mode": 1, "upscaling_resize_w": 200, "upscaling_resize_h": 200}
    out = extras(client, src, **body)  # x50: 16x16, 64x64 and 256x256 (x64, past pictor's x16), to 200x200
    once = Image.fromarray(model_upscale(client, src, 4))
    twice = Image.fromarray(model_upscale(client, once, 4))
    thrice = Image.fromarray(model_upscale(client, twice, 4))
    assert np.array_equal(pixels(out["image"]), np.asarray(thrice.resize((200, 200), LANCZOS)))
    job = next(j for j in jobs(client) if j["request"].get("a1111_extras"))
    assert job["request"]["a1111_extras"]["runs"] == 3 and job["request"]["scale"] == 64
    record = json.loads(chunks(out["image"])["pictor"])["upscale"]
    assert record["scale"] == 64 and record["a1111_extras"]["runs"] == 3


def test_the_batch_cap_and_the_pixel_budget(
    make_client: Callable[..., TestClient], client: TestClient
) -> None:
    item = {"data": b64_png(picture(32, 32)), "name": "a"}
    path = "/sdapi/v1/extra-batch-images"
    body = {"imageList": [item] * TEST_LIMITS.max_images, "upscaler_1": "Lanczos"}
    assert client.post(path, json=body).status_code == 200
    body["imageList"] = [item] * (TEST_LIMITS.max_images + 1)
    refused(client.post(path, json=body), 422, "imageList", f"max_images, {TEST_LIMITS.max_images}")
    # each 32x32 at x2 reads 1024 and makes 4096 pixels; the budget is twice max_picture_pixels (20000)
    limited = limited_client(make_client, None, 100 * 100)
    body = {"imageList": [item] * 3, "upscaler_1": "Lanczos"}
    assert limited.post(path, json=body).status_code == 200
    body["imageList"] = [item] * 4
    refused(limited.post(path, json=body), 422, "imageList", "imageList[3].data read and make 20480 pixels")


def test_pictures_on_the_way_are_held_to_the_limit(
    make_client: Callable[..., TestClient], upscaling: Pipeline
) -> None:
    path = "/sdapi/v1/extra-single-image"
    # Lanczos at x3 makes 99x99 (9801 pixels) on its way to 96x96 (9216)
    limited = limited_client(make_client, upscaling, 96 * 96)
    body = {"image": b64_png(picture(33, 33)), "upscaler_1": "Lanczos", "upscaling_resize": 3}
    refused(limited.post(path, json=body), 422, "upscaling_resize", "9801 pixels (on the way)")
    # the x2 model runs twice for x2.5 on 30x30 (120x120, 14400 pixels) on its way to 72x72 (5184)
    limited = limited_client(make_client, upscaling, 80 * 80)
    body = {"image": b64_png(picture(30, 30)), "upscaler_1": NAME, "upscaling_resize": 2.5}
    refused(limited.post(path, json=body), 422, "upscaling_resize", "14400 pixels (on the way, 2 run(s)")
    assert jobs(limited) == []


def test_names_are_checked_before_the_picture_and_quotes_keep_unicode(client: TestClient) -> None:
    path = "/sdapi/v1/extra-single-image"
    refused(client.post(path, json={"image": "%%%", "upscaler_1": "Bogus"}), 422, "upscaler_1", "Bogus")
    refused(client.post(path, json={"image": "%%%", "gfpgan_visibility": 1}), 422, "gfpgan_visibility", "")
    assert post._quote("café, au lait") == '"café, au lait"'
