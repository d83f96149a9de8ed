"""Upscale models through the server: `pictor serve --upscaler FILE` loads one with the model (the model card
names it); POST /v1/images/upscale and /v1/jobs/upscales run it as `upscale_image` does (size, pixels,
record; `pictor reproduce` of the result), through the job queue's history, events (one progress step per
tile), cancel, timeout and upload retention; a generation's hires_upscaler names it; and every misuse is a
400 that names its field (or says the server has no upscale model) and keeps nothing."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from pictor import cli
from pictor.checkpoint import sha256_file
from pictor.cli_args import build_parser
from pictor.cli_upscale import reproduce_upscale
from pictor.editing import eight_bit, image_info
from pictor.models.upscalers import CompactNet, CompactParams
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record
from pictor.reproduce import reproduce
from pictor.serve.pipeline_errors import api_message, field_of
from pictor.serve.server import serve
from pictor.serve.settings import Limits, ServeSettings
from pictor.upscaling import DEFAULT_OVERLAP, DEFAULT_TILE, upscale_image, upscale_problem
from tests.serve.conftest import (
    TEST_LIMITS,
    GatedPipeline,
    assert_refused,
    decode_images,
    new_tiny,
    upload_names,
    wait_for,
)
from tests.serve.test_api import sse_events

NAME = "tiny-x2"  # the upscale model's name: its file's, without the suffix
JOBS = "/v1/jobs/upscales"


@pytest.fixture(scope="module")
def upscaler_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Real-ESRGAN compact net (x2) with random weights, as a .safetensors file."""
    torch.manual_seed(0)
    net = CompactNet(CompactParams(features=8, convs=2, scale=2))
    path = tmp_path_factory.mktemp("upscaler") / f"{NAME}.safetensors"
    save_file(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def upscaling(upscaler_file: Path) -> Pipeline:
    """The tiny model with the tiny upscale model loaded (`pictor serve --upscaler` does this)."""
    pipe = new_tiny()
    pipe.set_upscaler(upscaler_file)
    return pipe


def picture(size: int = 32, seed: int = 0) -> Image.Image:
    """Gradients plus noise: a picture whose upscale shows the model's work."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 60, (size, size, 3))
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def upscale(client: TestClient, data: bytes | None, path: str = "/v1/images/upscale", **fields: Any) -> Any:
    files = {"image": ("picture.png", data, "image/png")} if data is not None else {}
    form = {"response_format": "b64_json", **{k: str(v) for k, v in fields.items()}}
    return client.post(path, files=files, data=form)


def pixels_of(image: Image.Image | Path) -> np.ndarray:
    with Image.open(image) if isinstance(image, Path) else image as im:
        return np.asarray(im)


def job_of(client: TestClient, response: Any) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{response.json()['job_id']}").json()


class GatedNet(torch.nn.Module):
    """An upscale net that waits at the gate before each tile (and sleeps `delay` seconds): an upscale that
    is certainly running, or a slow one."""

    def __init__(self, inner: Any, gate: Any, delay: float = 0.0) -> None:
        super().__init__()
        self.inner, self.gate, self.delay = inner, gate, delay

    @property
    def scale(self) -> int:
        return int(self.inner.scale)

    @property
    def params(self) -> Any:
        return self.inner.params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate(0, 0)
        time.sleep(self.delay)
        return self.inner(x)


class GatedUpscales(GatedPipeline):
    """The upscaling pipeline whose upscale model waits at the gate before each tile (generations too, as in
    GatedPipeline), and takes `delay` seconds a tile."""

    def __init__(self, inner: Pipeline, delay: float = 0.0) -> None:
        super().__init__(inner)
        self.delay = delay

    @property
    def upscaler(self) -> Any:
        real = self._inner.upscaler
        return dataclasses.replace(real, net=GatedNet(real.net, self.gate, self.delay))


# -- the model card and `pictor serve --upscaler` --------------------------------------------------------


def test_the_model_card_names_the_loaded_upscaler(
    make_client: Callable[..., TestClient], upscaling: Pipeline, upscaler_file: Path, client: TestClient
) -> None:
    ours = make_client(upscaling)
    (card,) = ours.get("/v1/models").json()["data"]
    want = {"name": NAME, "architecture": "Compact", "scale": 2, "sha256": sha256_file(upscaler_file)}
    assert card["upscaler"] == want
    assert ours.get(f"/v1/models/{card['id']}").json()["upscaler"] == want
    assert client.get("/v1/models").json()["data"][0]["upscaler"] is None  # a server without one


def test_serve_loads_the_upscaler_with_the_model(
    make_client: Callable[..., TestClient],
    upscaler_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    """`pictor serve --upscaler FILE`: the flag parses, reaches the settings, and the loaded model gets the
    upscaler (the card says null until then). While the model loads an upscale is a 503 (it loads with it),
    and a hires_upscaler that is not the file's name is refused at once."""
    got: list[ServeSettings] = []
    monkeypatch.setattr("pictor.serve.server.serve", lambda settings, log_level="info": got.append(settings))
    cli.main(["serve", "--model", "tiny", "--upscaler", str(upscaler_file)])
    assert got[0].upscaler == upscaler_file
    assert build_parser().parse_args(["serve"]).upscaler is None
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return new_tiny()

    monkeypatch.setattr("pictor.loading.load", slow_load)
    client = make_client(None, model="tiny", upscaler=upscaler_file)
    hires = {"prompt": "a", "size": "32x32", "steps": 2, "seed": 1, "hires_scale": 2.0, "hires_steps": 1}
    try:
        assert client.get("/v1/models").json()["data"][0]["upscaler"] is None  # still loading
        r = upscale(client, png(picture()))
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading", r.text
        assert "upscale model loads with it" in r.json()["error"]["message"] and r.headers["Retry-After"]
        assert_refused(
            client.post("/v1/jobs", json={**hires, "hires_upscaler": "4x-UltraSharp"}),
            "hires_upscaler",
            f"hires_upscaler '4x-UltraSharp' is not loaded ('{NAME}' is)",
        )
        queued = client.post("/v1/jobs", json={**hires, "hires_upscaler": NAME})
        assert queued.status_code == 202, queued.text
        assert not upload_names(client)
    finally:
        loading.set()
    done = wait_job(client, queued.json()["id"])
    assert done["status"] == "succeeded", done
    meta = client.get(f"/v1/images/{done['results'][0]['image_id']}/metadata").json()
    assert meta["record"]["hires"]["upscaler"] == NAME and f"Hires upscaler: {NAME}" in meta["parameters"]
    assert client.get("/v1/models").json()["data"][0]["upscaler"]["name"] == NAME
    assert upscale(client, png(picture())).status_code == 200


def test_a_bad_upscaler_file_fails_the_load_and_serve_checks_the_flag(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match=r"--upscaler .*nope\.safetensors: no such file"):
        serve(ServeSettings(data_dir=tmp_path / "data", model="tiny", upscaler=missing))  # before it listens
    broken = tmp_path / "not-an-upscaler.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, broken)
    monkeypatch.setattr("pictor.loading.load", lambda *_a, **_k: new_tiny())
    client = make_client(None, model="tiny", upscaler=broken)
    ready = wait_for(
        lambda: (r := client.get("/readyz")).json().get("status") == "error" and r.json(), what="the load"
    )
    assert f"--upscaler {broken}: not an upscale model" in ready["detail"], ready


# -- upscaling a picture ------------------------------------------------------------------------------


def test_an_upscale_draws_what_upscale_image_draws(
    make_client: Callable[..., TestClient], upscaling: Pipeline, upscaler_file: Path
) -> None:
    client = make_client(upscaling)
    source = picture()
    r = upscale(client, png(source))
    ((pixels, record),) = decode_images(r)
    assert upscaling.upscaler is not None
    assert pixels.shape == (64, 64, 3)
    assert np.array_equal(pixels, pixels_of(upscale_image(upscaling.upscaler, source)))
    assert record["upscale"] == {
        "upscaler": NAME,
        "architecture": "Compact",
        "file": str(upscaler_file),
        "sha256": sha256_file(upscaler_file),
        "model_scale": 2,
        "scale": 2.0,
        "tile": DEFAULT_TILE,
        "overlap": DEFAULT_OVERLAP,
        "width": 64,
        "height": 64,
    }
    assert record["source_image"] == image_info(np.asarray(source)) and "prompt" not in record
    assert job_of(client, r)["results"][0]["seed"] == 0  # a picture pictor did not make has no seed

    # A factor the model reaches in two runs, cut into tiles with overlap, Lanczos to the exact size
    ((pixels, record),) = decode_images(upscale(client, png(source), scale=3, tile=32, overlap=4))
    assert pixels.shape == (96, 96, 3)
    assert np.array_equal(pixels, pixels_of(upscale_image(upscaling.upscaler, source, 3.0, 32, 4)))
    up = record["upscale"]
    assert (up["scale"], up["tile"], up["overlap"], up["width"], up["height"]) == (3.0, 32, 4, 96, 96)

    # OpenAI's default answer is a URL; the metadata has A1111's Extras words
    r = client.post("/v1/images/upscale", files={"image": ("p.png", png(source), "image/png")})
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert set(item) == {"url"} and client.get(item["url"]).status_code == 200
    meta = client.get(f"/v1/images/{job_of(client, r)['results'][0]['image_id']}/metadata").json()
    assert meta["postprocessing"] == f"Postprocess upscale by: 2, Postprocess upscaler: {NAME}"
    assert meta["parameters"] == ""  # a picture pictor did not make: no generation to tell


def test_transparency_is_kept_and_sixteen_bit_pictures_are_scaled_not_clipped(
    make_client: Callable[..., TestClient], upscaling: Pipeline
) -> None:
    client = make_client(upscaling)
    assert upscaling.upscaler is not None
    rgba = picture().convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))))
    r = upscale(client, png(rgba))
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        assert im.mode == "RGBA"
        assert np.array_equal(np.asarray(im), pixels_of(upscale_image(upscaling.upscaler, rgba)))
        assert json.loads(im.text["pictor"])["source_image"] == image_info(np.asarray(rgba))
    grey = Image.fromarray(np.full((32, 32), 8000, np.uint16)).convert("I;16")  # 12 % grey
    ((pixels, _),) = decode_images(upscale(client, png(grey)))
    want = upscale_image(upscaling.upscaler, eight_bit(grey).convert("RGB"))
    assert np.array_equal(pixels, pixels_of(want)) and pixels.mean() < 128  # not clipped to white


def test_a_queued_upscale_is_a_job_with_per_tile_progress_and_reproduces(
    make_client: Callable[..., TestClient],
    upscaling: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """202 at once; the job's request says what it does; its events are one progress step per tile; the
    result is in the history; `pictor reproduce RESULT --source UPLOAD` makes the same pixels from the kept
    upload (and from the picture as sent)."""
    gated = GatedUpscales(upscaling)
    client = make_client(gated)
    source = picture(48, seed=3)
    r = upscale(client, png(source), path=JOBS, tile=32, overlap=8)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    request = job["request"]
    assert request["kind"] == "upscale" and request["upscaler"] == NAME and request["scale"] is None
    assert (request["width"], request["height"], request["tile"], request["overlap"]) == (96, 96, 32, 8)
    assert request["tiles"] == 4  # 48 pixels in tiles of 32: two by two
    assert upload_names(client) == [f"{request['image']}.png"]
    assert gated.gate.reached.wait(10)  # held before its first tile
    hub = client.app.state.service.manager.hub
    subscribe = hub.subscribe

    def subscribe_then_release(job_id: str) -> Any:  # the stream listens before the job goes on
        queue = subscribe(job_id)
        gated.gate.release.set()
        return queue

    monkeypatch.setattr(hub, "subscribe", subscribe_then_release)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        events = sse_events(stream.read().decode())
    progress = [(data["step"], data["total"]) for name, data in events if name == "progress"]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded" and done["progress"] == {"step": 4, "total": 4, "fraction": 1.0}
    assert client.get("/v1/jobs").json()["data"][0]["id"] == job["id"]  # in the history

    store = client.app.state.service.store
    result = store.image_path(done["results"][0]["image_id"])
    assert upscaling.upscaler is not None
    want = upscale_image(upscaling.upscaler, source, None, 32, 8)
    assert np.array_equal(pixels_of(result), pixels_of(want))
    upload = store.upload_path(request["image"])
    assert upload.is_file()  # kept with the succeeded job, for this:
    sent = tmp_path / "sent.png"
    sent.write_bytes(png(source))
    for given in (upload, sent):
        out = tmp_path / given.stem
        assert cli.main(["reproduce", str(result), "--source", str(given), "-o", str(out)]) == 0
        (again,) = out.glob("*.png")
        assert np.array_equal(pixels_of(again), pixels_of(result))


def test_an_upscale_of_a_pictor_image_keeps_its_record_and_reproduces(
    make_client: Callable[..., TestClient], upscaling: Pipeline, tmp_path: Path
) -> None:
    client = make_client(upscaling)
    body = {"prompt": "a red circle", "size": "32x32", "steps": 2, "seed": 5, "response_format": "b64_json"}
    raw = base64.b64decode(client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"])
    with Image.open(io.BytesIO(raw)) as im:
        source_record, source = json.loads(im.text["pictor"]), im.convert("RGB")
    r = upscale(client, raw)
    ((pixels, record),) = decode_images(r)
    assert upscaling.upscaler is not None
    assert np.array_equal(pixels, pixels_of(upscale_image(upscaling.upscaler, source)))
    assert {k: v for k, v in record.items() if k != "upscale"} == source_record
    assert record["upscale"]["upscaler"] == NAME and "source_image" not in record
    job = job_of(client, r)
    assert job["request"]["prompt"] == "a red circle" and job["results"][0]["seed"] == 5
    assert client.get("/v1/jobs", params={"q": "red circle"}).json()["total"] == 2  # found with its source
    store = client.app.state.service.store
    assert read_record(store.upload_path(job["request"]["image"])) == source_record  # the upload keeps it
    # `pictor reproduce`: the image generated again from its record, then upscaled as recorded
    result = store.image_path(job["results"][0]["image_id"])
    args = argparse.Namespace(image=str(result), out=str(tmp_path), upscaler=None, device="cpu", source=None)
    assert reproduce_upscale(args, read_record(result), lambda base: reproduce(upscaling, base)) == 0
    assert np.array_equal(pixels_of(tmp_path / f"{result.stem}-reproduced.png"), pixels_of(result))

    # An upscale of that upscale names its pixels; a damaged record is no record
    with Image.open(result) as im:
        first = im.convert("RGB")
    ((_, again),) = decode_images(upscale(client, png(first)))  # png() drops the text chunks...
    assert "prompt" not in again and again["source_image"] == image_info(np.asarray(first))
    ((_, again),) = decode_images(upscale(client, result.read_bytes()))  # ...this keeps them
    assert "prompt" not in again and again["source_image"] == image_info(np.asarray(first))
    limit = client.app.state.service.settings.limits.max_prompt_chars
    for unusable in (  # damaged, or a prompt longer than a request may send (the history would show it)
        {**source_record, "seed": "five"},
        {**source_record, "prompt": "a" * (limit + 1)},
        {**source_record, "negative_prompt": "b" * (limit + 1)},
    ):
        damaged = io.BytesIO()
        info = PngImagePlugin.PngInfo()
        info.add_itxt("pictor", json.dumps(unusable))
        source.save(damaged, format="PNG", pnginfo=info)
        r = upscale(client, damaged.getvalue())
        ((_, again),) = decode_images(r)
        assert "prompt" not in again and again["source_image"] == image_info(np.asarray(source))
        assert job_of(client, r)["request"]["prompt"] == ""


def test_a_generation_names_the_upscaler_as_its_hires_upscaler(
    make_client: Callable[..., TestClient], upscaling: Pipeline, upscaler_file: Path, tiny: Pipeline
) -> None:
    client = make_client(upscaling)
    settings = {"prompt": "a red circle", "seed": 1, "steps": 2, "hires_scale": 2.0, "hires_steps": 1}
    body = {**settings, "size": "32x32", "response_format": "b64_json"}
    ((pixels, record),) = decode_images(
        client.post("/v1/images/generations", json={**body, "hires_upscaler": NAME})
    )
    (direct,) = upscaling.generate(GenerationRequest(width=32, height=32, hires_upscaler=NAME, **settings))
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels, pixels_of(direct.image))
    assert record["hires"]["upscaler"] == NAME
    assert record["hires"]["upscaler_file"]["sha256"] == sha256_file(upscaler_file)
    ((lanczos, record),) = decode_images(
        client.post("/v1/images/generations", json={**body, "hires_upscaler": "lanczos"})
    )
    assert record["hires"]["upscaler"] == "lanczos" and not np.array_equal(lanczos, pixels)
    # the job keeps the resolved choice: the model's name, or None for Lanczos (so both spellings batch)
    jobs = client.get("/v1/jobs").json()["data"]
    assert [j["request"]["hires_upscaler"] for j in jobs] == [None, NAME]

    r = client.post("/v1/jobs", json={**body, "hires_upscaler": "4x-UltraSharp"})
    assert_refused(r, "hires_upscaler", f"hires_upscaler '4x-UltraSharp' is not loaded ('{NAME}' is)")
    assert "GET /v1/models" in r.json()["error"]["message"] and "--hires-upscaler" not in r.text
    r = client.post("/v1/jobs", json={"prompt": "a", "hires_upscaler": NAME})
    assert_refused(r, "hires_scale", "hires_upscaler need hires_scale")
    plain = make_client(tiny)  # a server without an upscale model
    r = plain.post("/v1/jobs", json={**body, "hires_upscaler": NAME})
    assert_refused(r, "hires_upscaler", f"hires_upscaler '{NAME}' is not loaded (none is)")
    assert "pictor serve --upscaler FILE" in r.json()["error"]["message"]


def test_the_pipelines_upscale_messages_name_their_field(upscaling: Pipeline, tiny: Pipeline) -> None:
    """The pipeline's own words for a hires_upscaler it refuses, and upscale_problem's, name the API's
    field (serve/pipeline_errors.py) and no flag of the CLI's."""
    for pipe, asked, loaded in ((upscaling, "nope", f"'{NAME}' is"), (tiny, NAME, "none is")):
        with pytest.raises(GenerationError) as info:
            pipe.resolve_request(GenerationRequest(prompt="a", hires_scale=2.0, hires_upscaler=asked))
        text = str(info.value)
        assert field_of(text) == "hires_upscaler", text
        api = api_message(text)
        assert api.startswith(f"hires_upscaler '{asked}' is not loaded ({loaded})"), api
        assert set(re.findall(r"--[a-z][a-z-]*", api)) <= {"--upscaler"}, api
    with pytest.raises(GenerationError) as info:
        upscaling.resolve_request(GenerationRequest(prompt="a", hires_upscaler=NAME))
    assert field_of(str(info.value)) == "hires_scale"
    assert api_message(str(info.value)).startswith("hires_strength, hires_steps and hires_upscaler need")
    for problem, field in (
        (upscale_problem(0.0, 512, 32), "scale"),
        (upscale_problem(None, 16, 0), "tile"),
        (upscale_problem(None, 64, 32), "overlap"),
    ):
        assert problem and field_of(problem) == field, problem


# -- what is refused -------------------------------------------------------------------------------------


def test_without_an_upscaler_the_endpoints_say_which_flag_loads_one(
    client: TestClient,
    make_client: Callable[..., TestClient],
    tiny: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for path in ("/v1/images/upscale", JOBS):
        r = upscale(client, png(picture()), path=path)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "no_upscaler" and "pictor serve --upscaler FILE" in error["message"], error
    assert not upload_names(client)
    # while a model without one loads: said at once, not after the load
    loading = threading.Event()

    def slow_load(model: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
        assert loading.wait(30)
        return tiny

    monkeypatch.setattr("pictor.loading.load", slow_load)
    loads = make_client(None, model="tiny")
    try:
        r = upscale(loads, png(picture()), path=JOBS)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_upscaler", r.text
    finally:
        loading.set()


def test_bad_fields_and_pictures_are_refused_by_name_and_keep_nothing(
    make_client: Callable[..., TestClient], upscaling: Pipeline
) -> None:
    client = make_client(upscaling)
    source = png(picture())
    for fields, param, words in (
        ({"scale": "0"}, "scale", "the upscale factor must be above 0 and at most 16"),
        ({"scale": "17"}, "scale", "at most 16"),
        ({"scale": "nan"}, "scale", "finite number"),
        ({"scale": "two"}, "scale", "valid number"),
        ({"tile": "16"}, "tile", "the tile size must be at least 32 pixels"),
        ({"tile": "2.5"}, "tile", "valid integer"),
        ({"tile": str(10**30)}, "tile", "less than or equal"),
        ({"tile": "1025"}, "tile", "less than or equal to 1024"),
        ({"overlap": "256"}, "overlap", "under half the tile (256)"),
        ({"tile": "64", "overlap": "-1"}, "overlap", "at least 0"),
        ({"response_format": "jpeg"}, "response_format", "'url' or 'b64_json'"),
        ({"strength": "0.5"}, "strength", "unknown field 'strength'; the upscale form takes"),
        ({"prompt": "bigger"}, "prompt", "unknown field 'prompt'"),
    ):
        for path in ("/v1/images/upscale", JOBS):
            assert_refused(upscale(client, source, path=path, **fields), param, words)
    for data, param, words in (
        (None, "image", "'image' is required"),
        (b"not a picture", "image", "not a readable PNG, JPEG or WebP image"),
    ):
        assert_refused(upscale(client, data), param, words)
    lists = client.post(
        "/v1/images/upscale", files=[("image[]", ("a.png", source, "image/png"))], data={"tile": "64"}
    )
    assert_refused(lists, "image", "takes one image")
    assert not upload_names(client)
    assert client.get("/v1/images/upscale").status_code == 405
    assert client.get(JOBS).headers["allow"] == "POST"

    # the result, and the largest picture the model makes on the way, within max_picture_pixels
    small = make_client(upscaling, limits=dataclasses.replace(TEST_LIMITS, max_picture_pixels=100 * 100))
    # the picture itself: to max_picture_pixels (the server's hires and upscaled images exceed max_pixels)
    assert_refused(
        upscale(small, png(picture(101))), "image", "image is 101x101 = 10201 pixels; the limit is 10000"
    )
    fits = upscale(small, png(picture(48)))  # 96x96 = 9216
    assert fits.status_code == 200, fits.text
    assert_refused(upscale(small, png(picture(64))), "scale", "upscaled to 128x128 is 16384 pixels, more")
    r = upscale(small, png(picture(64)), scale=1.5)  # 96x96, but the x2 model makes 128x128 first
    assert_refused(r, "scale", "and 16384 pixels on the way")
    bytes_cap = make_client(upscaling, limits=Limits(max_pixels=64 * 64, max_upload_bytes=1000))
    r = upscale(bytes_cap, png(picture(64)))
    assert r.status_code == 413 and r.json()["error"]["param"] == "image", r.text
    assert upload_names(small) == [f"{job_of(small, fits)['request']['image']}.png"]  # the one that ran


# -- cancel, failure, timeout, restart: the picture goes when nothing needs it ------------------------------


def test_a_cancelled_upscale_deletes_its_picture(
    make_client: Callable[..., TestClient], upscaling: Pipeline, wait_job: Callable[..., Any]
) -> None:
    gated = GatedUpscales(upscaling)
    client = make_client(gated)
    running = upscale(client, png(picture()), path=JOBS).json()
    assert gated.gate.reached.wait(10)  # running, held before its first tile
    queued = upscale(client, png(picture(seed=1)), path=JOBS).json()
    mine = {job["id"]: f"{job['request']['image']}.png" for job in (running, queued)}
    assert upload_names(client) == sorted(mine.values())
    assert client.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    assert upload_names(client) == [mine[running["id"]]]  # a queued one's picture goes at once
    assert client.delete(f"/v1/jobs/{running['id']}").json()["status"] == "cancelled"
    assert upload_names(client) == [mine[running["id"]]]  # a running one's once its run stops
    gated.gate.release.set()
    wait_for(lambda: not upload_names(client), what="the cancelled upscale's picture to go")
    assert wait_job(client, running["id"])["results"] == []
    assert not list(client.app.state.service.store.images_dir.rglob("*.png"))


def test_a_failed_or_timed_out_upscale_deletes_its_picture(
    make_client: Callable[..., TestClient],
    upscaling: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    wait_job: Callable[..., Any],
) -> None:
    slow = GatedUpscales(upscaling, delay=0.2)
    slow.gate.armed = False
    client = make_client(slow, job_timeout=0.3)
    r = upscale(client, png(picture(64)), tile=32, overlap=0)  # four tiles of 0.2 s: stopped after two
    assert r.status_code == 504 and r.json()["error"]["code"] == "job_timeout", r.text
    wait_for(lambda: not upload_names(client), what="the timed-out upscale's picture to go")
    assert not list(client.app.state.service.store.images_dir.rglob("*.png"))

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr("pictor.serve.upscale_runs.upscale_image", broken)
    r = upscale(client, png(picture()))
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed", r.text
    assert r.json()["error"]["message"] == "upscale failed: RuntimeError: the accelerator fell over"
    job = wait_job(client, upscale(client, png(picture()), path=JOBS).json()["id"])
    assert job["status"] == "failed" and job["error"]["type"] == "server_error", job
    wait_for(lambda: not upload_names(client), what="the failed upscales' pictures to go")


def test_a_restart_resumes_a_queued_upscale_and_keeps_a_succeeded_ones_picture(
    make_client: Callable[..., TestClient],
    upscaling: Pipeline,
    tiny: Pipeline,
    wait_job: Callable[..., Any],
) -> None:
    gated = GatedPipeline(upscaling)
    client = make_client(gated)
    client.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2})
    assert gated.gate.reached.wait(10)
    source = picture(seed=7)
    queued = upscale(client, png(source), path=JOBS).json()
    doomed = upscale(client, png(source), path=JOBS).json()
    make_client.close(client)  # the running generation finishes; the upscales stay queued

    again = make_client(upscaling)
    done = wait_job(again, queued["id"])
    assert done["status"] == "succeeded", done
    assert upscaling.upscaler is not None
    result = again.app.state.service.store.image_path(done["results"][0]["image_id"])
    assert np.array_equal(pixels_of(result), pixels_of(upscale_image(upscaling.upscaler, source)))
    kept = f"{done['request']['image']}.png"
    assert wait_job(again, doomed["id"])["status"] == "succeeded"
    assert again.delete(f"/v1/history/{doomed['id']}").status_code == 200  # its picture goes with it
    make_client.close(again)

    third = make_client(upscaling)  # the start sweeps the uploads no job needs: not a succeeded one's
    assert upload_names(third) == [kept]
    assert third.delete(f"/v1/history/{done['id']}").status_code == 200
    assert upload_names(third) == []

    # an upscale resumed on a server without its upscale model fails as the server's fault, and its
    # picture goes
    make_client.close(third)
    gated = GatedPipeline(upscaling)
    fourth = make_client(gated)
    fourth.post("/v1/jobs", json={"prompt": "hold the worker", "steps": 2})
    assert gated.gate.reached.wait(10)
    stranded = upscale(fourth, png(source), path=JOBS).json()
    hires = {"prompt": "a", "steps": 2, "hires_scale": 2, "hires_upscaler": NAME}
    stranded_hires = fourth.post("/v1/jobs", json=hires).json()  # a generation that needs it too
    make_client.close(fourth)
    fifth = make_client(tiny)
    for job in (stranded, stranded_hires):
        failed = wait_job(fifth, job["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "upscaler_unavailable", failed
        assert failed["error"]["type"] == "server_error" and "--upscaler" in failed["error"]["message"]
    wait_for(lambda: not upload_names(fifth), what="the stranded upscale's picture to go")
